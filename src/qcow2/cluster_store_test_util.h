// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Test helpers of the cluster store (cluster_store_test.cc, cluster_store_property_test.cc):
// an in-memory O_DIRECT-like file that aborts on any unaligned transfer, a watchdog that
// turns a deadlock into a failure, and random placements (Scenario) replayed into a store
// from several threads.

#ifndef ZQCOW_QCOW2_CLUSTER_STORE_TEST_UTIL_H_
#define ZQCOW_QCOW2_CLUSTER_STORE_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "io/aligned_buffer.h"
#include "io/file.h"
#include "testing/test_util.h"
#include "qcow2/cluster_store.h"

namespace zqcow::qcow2::store_test {

using Options = ClusterStore::Options;
using Strategy = ClusterStore::Strategy;

inline constexpr uint32_t kKiB = 1024;
inline constexpr uint32_t kMiB = 1024 * 1024;
inline constexpr auto kWatchdogTimeout = std::chrono::seconds(120);
inline constexpr uint8_t kMetadataPattern = 0xA5;

// Without the writer thread: the caller that finishes a cluster writes it before returning,
// so a test can look at the file right after the call.
inline Options Inline() {
  Options options;
  options.background_writer = false;
  return options;
}

// Aborts the process (with a message) if the test body does not finish in time: a deadlock
// must fail, not hang.
class Watchdog {
 public:
  explicit Watchdog(std::string what) : what_(std::move(what)) {
    thread_ = std::thread([this] {
      std::unique_lock lock(mutex_);
      if (!done_cv_.wait_for(lock, kWatchdogTimeout, [this] { return done_; })) {
        std::fprintf(stderr, "watchdog: %s did not finish (deadlock?)\n", what_.c_str());
        std::abort();
      }
    });
  }
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    done_cv_.notify_all();
    thread_.join();
  }

 private:
  std::string what_;
  std::mutex mutex_;
  std::condition_variable done_cv_;
  bool done_ = false;
  std::thread thread_;
};

// An in-memory File. When direct, every transfer must be aligned (offset, length, memory)
// or the process aborts. Counts writes, can fail the Nth write with EIO, and can run a hook
// before each write (outside its lock) so a test can hold a write in flight.
class MemoryFile final : public io::File {
 public:
  MemoryFile(size_t alignment, bool direct) : alignment_(direct ? alignment : 1), direct_(direct) {}

  Result<size_t> ReadAt(uint64_t offset, void* buffer, size_t length) override {
    CheckAligned("read", offset, buffer, length);
    std::lock_guard lock(mutex_);
    std::memset(buffer, 0, length);
    if (offset >= data_.size()) return size_t{0};
    const size_t available = std::min<size_t>(length, data_.size() - offset);
    std::memcpy(buffer, data_.data() + offset, available);
    return available;
  }

  Status WriteAt(uint64_t offset, const void* buffer, size_t length) override {
    CheckAligned("write", offset, buffer, length);
    if (before_write) before_write(offset);
    std::lock_guard lock(mutex_);
    ++writes_;
    if (fail_write_ != 0 && writes_ == fail_write_) {
      return Status::FromErrno(EIO, path_ + ": write of " + std::to_string(length) +
                                        " bytes at offset " + std::to_string(offset) + " failed");
    }
    if (data_.size() < offset + length) data_.resize(offset + length);
    std::memcpy(data_.data() + offset, buffer, length);
    write_log_.push_back({offset, length});
    return Status::OK();
  }

  Status Sync() override { return Status::OK(); }
  Result<uint64_t> Size() override {
    std::lock_guard lock(mutex_);
    return uint64_t{data_.size()};
  }
  Status Truncate(uint64_t size) override {
    std::lock_guard lock(mutex_);
    data_.resize(size);
    return Status::OK();
  }
  Status DropCache(uint64_t, uint64_t) override {
    drops_.fetch_add(1);
    return Status::OK();
  }
  Result<uint64_t> NextData(uint64_t offset) override { return offset; }
  Result<uint64_t> NextHole(uint64_t) override { return Size(); }
  bool direct_io() const override { return direct_; }
  size_t alignment() const override { return alignment_; }
  const std::string& path() const override { return path_; }

  // Test controls and observations.
  void FailWrite(uint64_t nth) {
    std::lock_guard lock(mutex_);
    fail_write_ = writes_ + nth;
  }
  void SetContents(std::vector<uint8_t> data) {
    std::lock_guard lock(mutex_);
    data_ = std::move(data);
  }
  std::vector<uint8_t> contents() const {
    std::lock_guard lock(mutex_);
    return data_;
  }
  uint64_t writes() const {
    std::lock_guard lock(mutex_);
    return writes_;
  }
  struct WriteRecord {
    uint64_t offset;
    size_t length;
  };
  std::vector<WriteRecord> write_log() const {
    std::lock_guard lock(mutex_);
    return write_log_;
  }
  uint64_t drops() const { return drops_.load(); }

  std::function<void(uint64_t offset)> before_write;  // set before use, never changed later

 private:
  void CheckAligned(const char* op, uint64_t offset, const void* buffer, size_t length) const {
    if (!direct_) return;
    if (offset % alignment_ != 0 || length % alignment_ != 0 ||
        reinterpret_cast<uintptr_t>(buffer) % alignment_ != 0) {
      std::fprintf(stderr, "unaligned direct %s: offset %llu length %zu buffer %p alignment %zu\n",
                   op, static_cast<unsigned long long>(offset), length, buffer, alignment_);
      std::abort();
    }
  }

  const size_t alignment_;
  const bool direct_;
  const std::string path_ = "/memory/test.img";
  mutable std::mutex mutex_;
  std::vector<uint8_t> data_;
  uint64_t writes_ = 0;
  uint64_t fail_write_ = 0;
  std::vector<WriteRecord> write_log_;
  std::atomic<uint64_t> drops_{0};
};

// One step of the placement's output: a compressed piece, or a cluster end.
struct Op {
  enum class Kind { kPiece, kClusterEnd } kind;
  uint64_t offset;  // piece start, or the host cluster
  uint32_t length;  // piece length, or the data end
};

// A random allocation: pieces laid out by a bump pointer that sometimes ends its cluster and
// jumps over one or two clusters (which hold "metadata" the store must never touch).
struct Scenario {
  uint32_t cluster_size = 0;
  std::vector<Op> ops;              // in allocation order
  std::vector<uint8_t> initial;     // file before the run (metadata clusters)
  std::vector<uint8_t> expected;    // file after every piece landed
  std::set<uint64_t> finished;      // clusters whose every byte up to the data end came
  uint64_t pieces_per_cluster = 0;  // Write() pieces after splitting per host cluster
};

inline uint32_t RandomPieceLength(std::mt19937_64& rng, uint32_t cluster_size) {
  // Mostly compressed-cluster sized pieces, sometimes tiny, sometimes up to a whole cluster.
  switch (rng() % 4) {
    case 0:
      return 1 + rng() % 64;
    case 1:
      return 1 + rng() % cluster_size;
    default:
      return 1 + rng() % std::max<uint32_t>(cluster_size / 8, 1);
  }
}

// Random bytes, eight per generator call (the tests also run under TSan, where byte loops
// are slow).
inline void FillRandom(std::mt19937_64& rng, uint8_t* out, size_t length) {
  while (length > 0) {
    const uint64_t word = rng();
    const size_t n = std::min(length, sizeof(word));
    std::memcpy(out, &word, n);
    out += n;
    length -= n;
  }
}

inline Scenario MakeScenario(uint32_t cluster_size, uint32_t data_clusters, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Scenario s;
  s.cluster_size = cluster_size;
  const uint64_t capacity =
      static_cast<uint64_t>(data_clusters) * 3 * cluster_size + 2 * cluster_size;
  s.initial.assign(capacity, 0);
  std::fill_n(s.initial.begin(), cluster_size, kMetadataPattern);
  s.expected = s.initial;
  auto cluster_of = [&](uint64_t offset) { return offset / cluster_size * cluster_size; };
  uint64_t bump = cluster_size;
  uint32_t used = 1;  // data clusters the placement has started
  bool fresh = true;  // bump sits at the start of a cluster that got nothing yet
  for (;;) {
    if (bump % cluster_size != 0) {
      if (used == data_clusters && rng() % 10 == 0) break;  // last cluster stays unfinished
      if (rng() % 6 == 0) {
        // The placement ends this cluster and moves to a non-contiguous one.
        const uint64_t cluster = cluster_of(bump);
        s.ops.push_back({Op::Kind::kClusterEnd, cluster, static_cast<uint32_t>(bump - cluster)});
        s.finished.insert(cluster);
        if (used == data_clusters) break;
        const uint32_t skip = 1 + rng() % 2;
        for (uint32_t i = 1; i <= skip; ++i) {
          const uint64_t metadata = cluster + static_cast<uint64_t>(i) * cluster_size;
          const uint8_t pattern = static_cast<uint8_t>(kMetadataPattern + i);
          std::fill_n(s.initial.begin() + metadata, cluster_size, pattern);
          std::fill_n(s.expected.begin() + metadata, cluster_size, pattern);
        }
        bump = cluster + (skip + 1) * static_cast<uint64_t>(cluster_size);
        ++used;
        fresh = true;
        continue;
      }
    } else if (!fresh) {
      // The previous cluster is exactly full; sometimes the placement says so (a no-op).
      if (rng() % 4 == 0) {
        s.ops.push_back({Op::Kind::kClusterEnd, bump - cluster_size, cluster_size});
      }
      if (used == data_clusters) break;
      ++used;
      fresh = true;
    }
    // Never run past the last data cluster.
    const uint64_t limit =
        cluster_of(bump) + static_cast<uint64_t>(cluster_size) * (1 + data_clusters - used);
    const uint32_t length = static_cast<uint32_t>(
        std::min<uint64_t>(RandomPieceLength(rng, cluster_size), limit - bump));
    FillRandom(rng, s.expected.data() + bump, length);
    s.ops.push_back({Op::Kind::kPiece, bump, length});
    const uint64_t end = bump + length;
    for (uint64_t c = cluster_of(bump); c < end; c += cluster_size) {
      ++s.pieces_per_cluster;
      if (c + cluster_size <= end) s.finished.insert(c);
    }
    used += static_cast<uint32_t>((cluster_of(end - 1) - cluster_of(bump)) / cluster_size);
    bump = end;
    fresh = false;
  }
  return s;
}

enum class Delivery {
  kAnyOrder,         // globally shuffled; the store is big enough to hold everything
  kPerThreadInOrder  // each thread keeps allocation order (as workers do); small cache
};

struct RunConfig {
  uint32_t threads = 1;
  Delivery delivery = Delivery::kAnyOrder;
  size_t max_clusters = 64;
  bool flushes = true;  // random concurrent Flush calls
  bool reads = true;    // read pieces back right after writing them
  bool assemble = true;  // else kWriteThrough
};

// Replays `s` into `cache` (a store) from `config.threads` threads; then Flush. Returns failures
// seen by the workers (as text) so the caller asserts in the main thread.
inline std::vector<std::string> Replay(const Scenario& s, ClusterStore* cache,
                                const RunConfig& config, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<Op>> per_thread(config.threads);
  if (config.delivery == Delivery::kAnyOrder) {
    std::vector<Op> shuffled = s.ops;
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    for (size_t i = 0; i < shuffled.size(); ++i)
      per_thread[i % config.threads].push_back(shuffled[i]);
  } else {
    for (const Op& op : s.ops) per_thread[rng() % config.threads].push_back(op);
  }
  std::mutex failures_mutex;
  std::vector<std::string> failures;
  auto fail = [&](std::string text) {
    std::lock_guard lock(failures_mutex);
    failures.push_back(std::move(text));
  };
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < config.threads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 thread_rng(seed * 1000 + t);
      std::vector<uint8_t> back;
      for (const Op& op : per_thread[t]) {
        if (op.kind == Op::Kind::kClusterEnd) {
          Status status = cache->SetClusterEnd(op.offset, op.length);
          if (!status.ok()) fail("SetClusterEnd: " + status.ToString());
          continue;
        }
        Status status = cache->Write(op.offset, {s.expected.data() + op.offset, op.length});
        if (!status.ok()) fail("Write: " + status.ToString());
        if (config.reads && thread_rng() % 8 == 0) {
          back.assign(op.length, 0);
          status = cache->Read(op.offset, back);
          if (!status.ok() ||
              !std::equal(back.begin(), back.end(), s.expected.begin() + op.offset)) {
            fail("Read back of piece at " + std::to_string(op.offset) + ": " + status.ToString());
          }
          // Metadata stays as it was.
          const uint32_t probe = 1 + thread_rng() % std::min<uint32_t>(600, s.cluster_size);
          back.assign(probe, 0);
          status = cache->Read(s.cluster_size - probe, back);
          if (!status.ok() || std::any_of(back.begin(), back.end(),
                                          [](uint8_t b) { return b != kMetadataPattern; })) {
            fail("Read of metadata: " + status.ToString());
          }
        }
        if (config.flushes && thread_rng() % 16 == 0) {
          status = cache->Flush();
          if (!status.ok()) fail("Flush: " + status.ToString());
        }
        if (thread_rng() % 4 == 0) std::this_thread::yield();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  Status status = cache->Flush();
  if (!status.ok()) fail("final Flush: " + status.ToString());
  return failures;
}

// The file equals `expected`; beyond it (zero padding up to the alignment) only zeros.
inline void ExpectFileMatches(const std::vector<uint8_t>& file, const std::vector<uint8_t>& expected,
                       const std::string& label) {
  const size_t common = std::min(file.size(), expected.size());
  size_t first_difference = common;
  const bool same = common == 0 || std::memcmp(file.data(), expected.data(), common) == 0;
  for (size_t i = 0; !same && i < common; ++i) {
    if (file[i] != expected[i]) {
      first_difference = i;
      break;
    }
  }
  EXPECT_EQ(first_difference, common) << label << ": first difference at byte " << first_difference;
  for (size_t i = common; i < expected.size(); ++i) {
    if (expected[i] != 0) {
      ADD_FAILURE() << label << ": file too short, byte " << i << " missing";
      break;
    }
  }
  if (file.size() == common) return;
  const std::vector<uint8_t> zeros(file.size() - common, 0);
  if (std::memcmp(file.data() + common, zeros.data(), zeros.size()) == 0) return;
  for (size_t i = common; i < file.size(); ++i) {
    if (file[i] != 0) {
      ADD_FAILURE() << label << ": non-zero byte " << i << " beyond the expected contents";
      break;
    }
  }
}

inline uint32_t DataClustersFor(uint32_t cluster_size) {
  if (cluster_size >= 2 * kMiB) return 3;
  if (cluster_size >= 64 * kKiB) return 10;
  return 24;
}

struct Geometry {
  uint32_t cluster_size;
  size_t alignment;
};

inline void PrintTo(const Geometry& geometry, std::ostream* out) {
  *out << "cluster " << geometry.cluster_size << " alignment " << geometry.alignment;
}

}  // namespace zqcow::qcow2::store_test

#endif  // ZQCOW_QCOW2_CLUSTER_STORE_TEST_UTIL_H_
