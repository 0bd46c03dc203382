// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Sources wrapped for qemu-img convert's --salvage (read errors become zeros, counted) and
// -r (a bandwidth limit on the reads).

#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>

#include "convert/source.h"

namespace zqcow::convert {

namespace {

// QEMU's sector: the unit --salvage retries (and gives up on) when a read fails.
constexpr size_t kSalvagePiece = 512;

class SalvagingSource final : public ForwardingSource {
 public:
  SalvagingSource(std::unique_ptr<Source> base, SalvageCounters* counters)
      : ForwardingSource(std::move(base)), counters_(counters) {}

  Status Read(std::span<const io::IoRequest> requests) override {
    if (base().Read(requests).ok()) return Status::OK();
    for (const io::IoRequest& request : requests) {
      if (base().Read(std::span<const io::IoRequest>(&request, 1)).ok()) continue;
      ReadInPieces(request);
    }
    return Status::OK();
  }

 private:
  void ReadInPieces(const io::IoRequest& request) {
    const size_t piece = std::max(kSalvagePiece, read_alignment());
    auto* out = static_cast<uint8_t*>(request.buffer);
    bool previous_failed = false;
    for (size_t done = 0; done < request.length; done += piece) {
      const size_t length = std::min(piece, request.length - done);
      const io::IoRequest part{request.offset + done, out + done, length};
      if (base().Read(std::span<const io::IoRequest>(&part, 1)).ok()) {
        previous_failed = false;
        continue;
      }
      std::memset(out + done, 0, length);
      counters_->bytes += length;
      if (!previous_failed) ++counters_->errors;
      previous_failed = true;
    }
  }

  SalvageCounters* counters_;
};

// Virtual scheduling: each read is given the next `length / rate` seconds of the link, and
// its thread sleeps until that slot has passed. Idle time builds up at most one second of
// credit (a burst); at the start there is none.
class RateLimitedSource final : public ForwardingSource {
 public:
  using Clock = std::chrono::steady_clock;

  RateLimitedSource(std::unique_ptr<Source> base, uint64_t bytes_per_second,
                    const std::atomic<bool>* cancel)
      : ForwardingSource(std::move(base)),
        bytes_per_second_(static_cast<double>(bytes_per_second)),
        cancel_(cancel),
        next_free_(Clock::now()) {}

  Status Read(std::span<const io::IoRequest> requests) override {
    uint64_t bytes = 0;
    for (const io::IoRequest& request : requests) bytes += request.length;
    Clock::time_point wake;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const Clock::time_point now = Clock::now();
      next_free_ = std::max(next_free_, now - std::chrono::seconds(1));
      next_free_ += std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(static_cast<double>(bytes) / bytes_per_second_));
      wake = next_free_;
    }
    // In slices, so that a cancelled conversion does not wait out a long slot.
    while (Clock::now() < wake) {
      if (cancel_ != nullptr && cancel_->load(std::memory_order_relaxed)) {
        return Status::Interrupted(path() + ": read cancelled");
      }
      std::this_thread::sleep_until(std::min(wake, Clock::now() + kSleepSlice));
    }
    return ForwardingSource::Read(requests);
  }

 private:
  static constexpr std::chrono::milliseconds kSleepSlice{100};
  const double bytes_per_second_;
  const std::atomic<bool>* const cancel_;
  std::mutex mutex_;
  Clock::time_point next_free_;
};

}  // namespace

std::unique_ptr<Source> SalvageReadErrors(std::unique_ptr<Source> source,
                                          SalvageCounters* counters) {
  return std::make_unique<SalvagingSource>(std::move(source), counters);
}

std::unique_ptr<Source> LimitReadRate(std::unique_ptr<Source> source, uint64_t bytes_per_second,
                                      const std::atomic<bool>* cancel) {
  return std::make_unique<RateLimitedSource>(std::move(source), bytes_per_second, cancel);
}

}  // namespace zqcow::convert
