// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "io/uring_batch.h"

#include <liburing.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <vector>

// liburing maps its rings with raw system calls that ThreadSanitizer does not intercept.
// When one thread's ring is unmapped and a later thread's ring is mapped at the same
// address, TSan takes the new owner's writes for a race with the old owner's. The
// annotations below order the two lifetimes explicitly (they cost nothing otherwise).
#if defined(__SANITIZE_THREAD__)
#define ZQCOW_IO_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ZQCOW_IO_TSAN 1
#endif
#endif
#ifdef ZQCOW_IO_TSAN
extern "C" void __tsan_acquire(void* address);
extern "C" void __tsan_release(void* address);
#endif

namespace zqcow::io {

namespace {

#ifdef ZQCOW_IO_TSAN
char g_ring_lifetimes;
void RingMapped() { __tsan_acquire(&g_ring_lifetimes); }
void RingUnmapping() { __tsan_release(&g_ring_lifetimes); }
#else
void RingMapped() {}
void RingUnmapping() {}
#endif

// This thread's ring, created on first use. A ring that failed is dropped and set up again
// on the next batch.
class ThreadRing {
 public:
  ThreadRing() = default;
  ThreadRing(const ThreadRing&) = delete;
  ThreadRing& operator=(const ThreadRing&) = delete;
  ~ThreadRing() { Discard(); }

  // Null when io_uring cannot be set up.
  struct io_uring* Get() {
    if (!ready_) {
      ready_ = io_uring_queue_init(kUringQueueDepth, &ring_, 0) == 0;
      if (ready_) RingMapped();
    }
    return ready_ ? &ring_ : nullptr;
  }
  void Discard() {
    if (ready_) {
      RingUnmapping();
      io_uring_queue_exit(&ring_);
    }
    ready_ = false;
  }

 private:
  struct io_uring ring_ {};
  bool ready_ = false;
};

thread_local ThreadRing t_ring;

// One submission moves at most this much (an SQE length is 32 bits); larger requests
// continue as short transfers do.
constexpr size_t kMaxSubmissionBytes = size_t{1} << 30;

bool IsRetryable(int err) { return err == EINTR || err == EAGAIN; }

class BatchRun {
 public:
  BatchRun(const TransferTarget& target, Direction direction, std::span<const IoRequest> requests)
      : target_(target),
        direction_(direction),
        requests_(requests),
        done_(requests.size(), 0),
        finished_(requests.size(), false) {
    for (size_t i = 0; i < requests.size(); ++i) {
      if (requests[i].length == 0) {
        finished_[i] = true;
      } else {
        to_submit_.push_back(i);
      }
    }
  }

  Status Run() {
    struct io_uring* ring = t_ring.Get();
    if (ring != nullptr && !RunOnRing(ring)) {
      // The ring itself failed (not a request): drop it and finish below without it.
      t_ring.Discard();
    }
    if (first_error_.ok()) FinishSynchronously();
    return first_error_;
  }

 private:
  // Returns false when the ring failed; every request the kernel took has completed then.
  bool RunOnRing(struct io_uring* ring) {
    unsigned in_flight = 0;  // prepared SQEs whose completion has not been reaped
    while (in_flight > 0 || (first_error_.ok() && !to_submit_.empty())) {
      while (first_error_.ok() && !to_submit_.empty() && in_flight < kUringQueueDepth) {
        struct io_uring_sqe* sqe = io_uring_get_sqe(ring);
        if (sqe == nullptr) break;
        Prepare(sqe, to_submit_.front());
        to_submit_.pop_front();
        ++in_flight;
      }
      if (in_flight == 0) {  // nothing could be queued: waiting would block forever
        RequeueUnfinished();
        return false;
      }
      int rc = io_uring_submit_and_wait(ring, 1);
      if (rc < 0 && !IsRetryable(-rc) && -rc != EBUSY) {
        // Wait for what the kernel already took, then give up on this ring. Requests that
        // were prepared but never consumed go back to the synchronous path.
        unsigned taken = in_flight - io_uring_sq_ready(ring);
        Reap(ring, &taken, /*wait=*/true);
        RequeueUnfinished();
        return false;
      }
      unsigned reaped = in_flight;
      Reap(ring, &reaped, /*wait=*/false);
      in_flight = reaped;
    }
    return true;
  }

  void Prepare(struct io_uring_sqe* sqe, size_t index) {
    const IoRequest& request = requests_[index];
    uint8_t* bytes = static_cast<uint8_t*>(request.buffer) + done_[index];
    const auto length =
        static_cast<unsigned>(std::min(request.length - done_[index], kMaxSubmissionBytes));
    const uint64_t offset = request.offset + done_[index];
    if (direction_ == Direction::kRead) {
      io_uring_prep_read(sqe, target_.fd, bytes, length, offset);
    } else {
      io_uring_prep_write(sqe, target_.fd, bytes, length, offset);
    }
    io_uring_sqe_set_data64(sqe, index);
  }

  // Consumes completions, decrementing *outstanding for each. With `wait`, blocks until
  // *outstanding reaches zero (or waiting fails); otherwise takes only what is ready.
  void Reap(struct io_uring* ring, unsigned* outstanding, bool wait) {
    while (*outstanding > 0) {
      struct io_uring_cqe* cqe = nullptr;
      int rc = wait ? io_uring_wait_cqe(ring, &cqe) : io_uring_peek_cqe(ring, &cqe);
      if (rc == -EINTR && wait) continue;
      if (rc != 0) return;
      const auto index = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
      const int res = cqe->res;
      io_uring_cqe_seen(ring, cqe);
      --*outstanding;
      Complete(index, res);
    }
  }

  void Complete(size_t index, int res) {
    const IoRequest& request = requests_[index];
    if (res < 0) {
      if (IsRetryable(-res)) {
        to_submit_.push_back(index);
      } else if (first_error_.ok()) {
        first_error_ = TransferError(target_, direction_, request.offset, request.length, -res);
      }
      return;
    }
    if (res == 0) {
      if (direction_ == Direction::kRead) {
        FinishRead(index);
      } else if (first_error_.ok()) {
        first_error_ = TransferError(target_, direction_, request.offset, request.length, EIO);
      }
      return;
    }
    done_[index] += static_cast<size_t>(res);
    if (done_[index] == request.length) {
      finished_[index] = true;
    } else if (DirectReadHitEof(target_, direction_, done_[index])) {
      FinishRead(index);
    } else {
      to_submit_.push_back(index);  // short transfer: resubmit the remainder
    }
  }

  // End of file: the rest of the buffer reads as zeros.
  void FinishRead(size_t index) {
    const IoRequest& request = requests_[index];
    std::memset(static_cast<uint8_t*>(request.buffer) + done_[index], 0,
                request.length - done_[index]);
    finished_[index] = true;
  }

  void RequeueUnfinished() {
    to_submit_.clear();
    for (size_t i = 0; i < requests_.size(); ++i) {
      if (!finished_[i]) to_submit_.push_back(i);
    }
  }

  void FinishSynchronously() {
    for (size_t index : to_submit_) {
      const IoRequest& request = requests_[index];
      Result<size_t> moved = TransferAll(target_, direction_, request.offset, request.buffer,
                                         request.length, done_[index]);
      if (!moved.ok()) {
        first_error_ = moved.status();
        return;
      }
      finished_[index] = true;
    }
    to_submit_.clear();
  }

  const TransferTarget& target_;
  const Direction direction_;
  const std::span<const IoRequest> requests_;
  std::vector<size_t> done_;  // bytes moved so far, per request
  std::vector<bool> finished_;
  std::deque<size_t> to_submit_;  // requests (or their remainders) waiting for submission
  Status first_error_;
};

}  // namespace

Status UringTransferBatch(const TransferTarget& target, Direction direction,
                          std::span<const IoRequest> requests) {
  if (requests.empty()) return Status::OK();
  return BatchRun(target, direction, requests).Run();
}

}  // namespace zqcow::io
