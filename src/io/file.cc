// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// What every File shares: the one-after-another batch defaults and the io_uring probe.

#include "io/file.h"

#include <liburing.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "io/aligned_buffer.h"

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

Status ReadAnyRange(File& file, uint64_t offset, std::span<uint8_t> out) {
  if (out.empty()) return Status::OK();
  const size_t alignment = std::max<size_t>(file.alignment(), 1);
  const bool aligned = offset % alignment == 0 && out.size() % alignment == 0 &&
                       reinterpret_cast<uintptr_t>(out.data()) % alignment == 0;
  if (!file.direct_io() || aligned) {
    Result<size_t> read = file.ReadAt(offset, out.data(), out.size());
    return read.ok() ? Status::OK() : read.status();
  }
  const uint64_t start = AlignDown(offset, alignment);
  const uint64_t end = AlignUp(offset + out.size(), alignment);
  AlignedBuffer bounce(end - start, std::max(alignment, kBufferAlignment));
  Result<size_t> read = file.ReadAt(start, bounce.data(), bounce.size());
  if (!read.ok()) return read.status();
  std::memcpy(out.data(), bounce.data() + (offset - start), out.size());
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
