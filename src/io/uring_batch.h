// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Internal to src/io: submits a batch of positional transfers through io_uring.
//
// Each thread has its own ring (thread_local, created on first use, kUringQueueDepth
// entries); batches larger than that go through in rounds. Short completions are resubmitted
// for the remainder, -EINTR/-EAGAIN completions are retried, reads that reach end of file are
// zero-filled. When no ring can be set up (or the ring fails), the remaining work runs
// through the plain positional loop, so the result is the same either way.

#ifndef ZQCOW_IO_URING_BATCH_H_
#define ZQCOW_IO_URING_BATCH_H_

#include <span>

#include "io/file.h"
#include "io/transfer.h"

namespace zqcow::io {

inline constexpr unsigned kUringQueueDepth = 64;

// REQUIRES: with target.direct, every request is aligned (checked by the caller).
// Every request has finished (completed or failed) when this returns, so the buffers are
// free again. Returns the first error seen; requests not yet submitted when it occurred are
// not started.
Status UringTransferBatch(const TransferTarget& target, Direction direction,
                          std::span<const IoRequest> requests);

}  // namespace zqcow::io

#endif  // ZQCOW_IO_URING_BATCH_H_
