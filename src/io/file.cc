// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// What every File shares: the one-after-another batch defaults and the io_uring probe.

#include "io/file.h"

#include <liburing.h>

#include <cstdlib>
#include <cstring>

namespace zqcow::io {

namespace {

// Set to "1" to make IoUringAvailable() false, so that the fallback path can be exercised.
constexpr const char* kDisableIoUringEnv = "ZQCOW_DISABLE_IO_URING";
constexpr unsigned kProbeQueueDepth = 2;

bool ProbeIoUring() {
  struct io_uring ring;
  if (io_uring_queue_init(kProbeQueueDepth, &ring, 0) != 0) return false;
  io_uring_queue_exit(&ring);
  return true;
}

}  // namespace

Status File::ReadBatch(std::span<const IoRequest> requests) {
  for (const IoRequest& request : requests) {
    Result<size_t> read = ReadAt(request.offset, request.buffer, request.length);
    if (!read.ok()) return read.status();
  }
  return Status::OK();
}

Status File::WriteBatch(std::span<const IoRequest> requests) {
  for (const IoRequest& request : requests) {
    ZQ_RETURN_IF_ERROR(WriteAt(request.offset, request.buffer, request.length));
  }
  return Status::OK();
}

bool IoUringAvailable() {
  // The environment is read on every call (cheap) so that a test can switch the fallback on;
  // the kernel probe runs once per process.
  const char* disable = std::getenv(kDisableIoUringEnv);
  if (disable != nullptr && std::strcmp(disable, "1") == 0) return false;
  static const bool available = ProbeIoUring();
  return available;
}

}  // namespace zqcow::io
