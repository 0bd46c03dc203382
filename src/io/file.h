// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The file layer: one abstract File with a POSIX implementation (buffered or O_DIRECT, with
// an io_uring batch path behind a runtime check) and a fault-injecting wrapper for tests.
//
// Contracts shared by every implementation:
// - ReadAt/WriteAt transfer the whole range or fail; short transfers and EINTR are looped
//   over inside the implementation. ReadAt past end of file fills the rest with zeros and
//   reports how many bytes really came from the file.
// - When direct_io() is true, offset, length and buffer address of every ReadAt/WriteAt
//   must be multiples of alignment(); implementations assert this (in every build type:
//   an unaligned O_DIRECT write is a bug, not an input error).
// - Errors name the file path, the operation and the offset, e.g.
//   "/t/out.qcow2: write of 65536 bytes at offset 1048576 failed: No space left on device".
// - All methods may be called from several threads at once (positional I/O only).

#ifndef ZQCOW_IO_FILE_H_
#define ZQCOW_IO_FILE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "io/image_lock.h"
#include "zqcow/status.h"

namespace zqcow::io {

// One positional transfer inside a batch.
struct IoRequest {
  uint64_t offset = 0;
  void* buffer = nullptr;  // for writes the buffer is only read
  size_t length = 0;
};

class File {
 public:
  virtual ~File() = default;

  // Reads [offset, offset+length). Bytes past end of file read as zero. Returns how many
  // bytes were read from the file itself (< length only at end of file).
  virtual Result<size_t> ReadAt(uint64_t offset, void* buffer, size_t length) = 0;
  virtual Status WriteAt(uint64_t offset, const void* buffer, size_t length) = 0;

  // Several independent transfers; an io_uring implementation submits them together.
  // The default runs them one after another. Fails with the first error.
  virtual Status ReadBatch(std::span<const IoRequest> requests);
  virtual Status WriteBatch(std::span<const IoRequest> requests);

  // fdatasync: everything written before is durable when this returns OK.
  virtual Status Sync() = 0;
  virtual Result<uint64_t> Size() = 0;
  virtual Status Truncate(uint64_t size) = 0;
  // Drops the file's pages from the page cache (posix_fadvise DONTNEED); a hint only.
  virtual Status DropCache(uint64_t offset, uint64_t length) = 0;
  // Next data/hole at or after offset (SEEK_DATA / SEEK_HOLE); when the file system cannot
  // tell, NextData returns offset and NextHole returns the file size.
  virtual Result<uint64_t> NextData(uint64_t offset) = 0;
  virtual Result<uint64_t> NextHole(uint64_t offset) = 0;

  virtual bool direct_io() const = 0;
  // Required alignment of offset, length and memory for direct I/O; 1 for buffered files.
  virtual size_t alignment() const = 0;
  virtual const std::string& path() const = 0;
};

struct FileOptions {
  bool writable = false;
  bool create = false;     // create if missing
  bool exclusive = false;  // with create: fail with kAlreadyExists if it exists (O_EXCL)
  bool truncate = false;   // O_TRUNC
  bool direct_io = false;  // O_DIRECT
  bool sync_writes = false;  // O_DSYNC: each write is durable when it completes
  // Batches go through io_uring when the kernel allows it (one ring per calling thread);
  // otherwise, or when false, they run one transfer after another.
  bool use_io_uring = true;
  // QEMU's image locks (io/image_lock.h), taken before anything else happens to the file
  // (a truncating open truncates only once they are held): by default kWrite for a
  // writable open, kRead for a read-only one; kShared reads beside a writer (-U).
  ImageLock lock = ImageLock::kAuto;
};

// Opens a regular file or block device (anything else that exists, a FIFO, a character
// device or a directory, is kNotSupported without being opened). With direct_io, discovers
// the alignment through statx(STATX_DIOALIGN), then BLKSSZGET for block devices, falling
// back to 4096; fails with kNotSupported naming the path when the file system refuses
// O_DIRECT. Other failures map
// errno to a code (ENOENT -> kNotFound, EEXIST -> kAlreadyExists, ...) with a message
// "<path>: open failed: <strerror>". A lock conflict fails the open with LockImage's error
// and leaves the file untouched. REQUIRES: truncate only together with writable.
Result<std::unique_ptr<File>> OpenFile(const std::string& path, const FileOptions& options);

// Reads any range (offset, length and buffer unaligned) of `file`: directly when the file
// is buffered or the range happens to be aligned, otherwise through an aligned bounce
// buffer covering the range. Bytes past end of file read as zeros.
Status ReadAnyRange(File& file, uint64_t offset, std::span<uint8_t> out);

// True when io_uring can be set up in this process (probed once). ZQCOW_DISABLE_IO_URING=1
// in the environment makes it false (read on every call), so tests and users can force the
// plain loop; the results are the same either way.
bool IoUringAvailable();

}  // namespace zqcow::io

#endif  // ZQCOW_IO_FILE_H_
