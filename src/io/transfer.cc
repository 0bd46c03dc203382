// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "io/transfer.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace zqcow::io {

namespace {

const char* DirectionName(Direction direction) {
  return direction == Direction::kRead ? "read" : "write";
}

}  // namespace

Status TransferError(const TransferTarget& target, Direction direction, uint64_t offset,
                     size_t length, int err) {
  std::string context = *target.path;
  context += ": ";
  context += DirectionName(direction);
  context +=
      " of " + std::to_string(length) + " bytes at offset " + std::to_string(offset) + " failed";
  return Status::FromErrno(err, context);
}

void CheckDirectAlignment(const TransferTarget& target, Direction direction, uint64_t offset,
                          const void* buffer, size_t length) {
  if (!target.direct) return;
  const uint64_t alignment = target.alignment;
  const auto address = reinterpret_cast<uintptr_t>(buffer);
  if (offset % alignment == 0 && length % alignment == 0 && address % alignment == 0) return;
  std::fprintf(stderr,
               "zqcow: FATAL: %s: unaligned O_DIRECT %s of %zu bytes at offset %llu, buffer %p "
               "(alignment %zu)\n",
               target.path->c_str(), DirectionName(direction), length,
               static_cast<unsigned long long>(offset), buffer, target.alignment);
  std::abort();
}

Result<size_t> TransferAll(const TransferTarget& target, Direction direction, uint64_t offset,
                           void* buffer, size_t length, size_t done) {
  auto* bytes = static_cast<uint8_t*>(buffer);
  while (done < length) {
    const ssize_t moved =
        direction == Direction::kRead
            ? ::pread(target.fd, bytes + done, length - done, static_cast<off_t>(offset + done))
            : ::pwrite(target.fd, bytes + done, length - done, static_cast<off_t>(offset + done));
    if (moved < 0) {
      if (errno == EINTR) continue;
      return TransferError(target, direction, offset, length, errno);
    }
    if (moved == 0) {
      if (direction == Direction::kRead) break;  // end of file
      // A write that makes no progress would loop forever; the kernel reports none of
      // these without an errno, so call it an I/O error.
      return TransferError(target, direction, offset, length, EIO);
    }
    done += static_cast<size_t>(moved);
    if (DirectReadHitEof(target, direction, done)) break;
  }
  if (direction == Direction::kRead && done < length) std::memset(bytes + done, 0, length - done);
  return done;
}

}  // namespace zqcow::io
