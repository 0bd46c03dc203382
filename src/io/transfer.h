// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Internal to src/io: the one place where positional reads and writes are looped over
// (short transfers, EINTR, end of file), the O_DIRECT alignment assertion, and the error
// text every transfer failure uses. Shared by the plain POSIX path and the io_uring path.

#ifndef ZQCOW_IO_TRANSFER_H_
#define ZQCOW_IO_TRANSFER_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "zqcow/status.h"

namespace zqcow::io {

enum class Direction : uint8_t { kRead, kWrite };

// What a transfer needs to know about the open file. Does not own the descriptor.
struct TransferTarget {
  int fd = -1;
  const std::string* path = nullptr;  // for error messages; outlives the target
  bool direct = false;                // opened with O_DIRECT
  size_t alignment = 1;               // required alignment when direct
};

// "<path>: read of N bytes at offset O failed: <strerror(err)>", code from errno.
Status TransferError(const TransferTarget& target, Direction direction, uint64_t offset,
                     size_t length, int err);

// With O_DIRECT, aborts the process with a message unless offset, length and buffer address
// are multiples of the alignment (in every build type: that is a bug in the caller).
void CheckDirectAlignment(const TransferTarget& target, Direction direction, uint64_t offset,
                          const void* buffer, size_t length);

// Moves bytes [done, length) of the request at `offset`, looping over short transfers and
// EINTR. Reads stop at end of file and zero-fill the rest of the buffer. Returns the total
// number of bytes moved to or from the file (including the `done` already moved before).
// For writes, success means all `length` bytes were written.
Result<size_t> TransferAll(const TransferTarget& target, Direction direction, uint64_t offset,
                           void* buffer, size_t length, size_t done);

// True when a direct read that has moved `done` bytes so far has certainly reached end of
// file: the kernel returns a partial block only there.
inline bool DirectReadHitEof(const TransferTarget& target, Direction direction, size_t done) {
  return direction == Direction::kRead && target.direct && done % target.alignment != 0;
}

}  // namespace zqcow::io

#endif  // ZQCOW_IO_TRANSFER_H_
