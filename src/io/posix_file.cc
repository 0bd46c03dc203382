// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The POSIX File: positional I/O on one descriptor, buffered or O_DIRECT, with batches going
// through io_uring when the kernel allows it.

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "io/file.h"
#include "io/transfer.h"
#include "io/uring_batch.h"

namespace zqcow::io {

namespace {

constexpr mode_t kCreateMode = 0644;
// Alignment assumed for O_DIRECT when neither statx nor the block device tells.
constexpr size_t kFallbackDirectAlignment = 4096;

// statx(STATX_DIOALIGN) arrived in Linux 6.1; older headers lack the constant and the
// fields, so the call goes through the raw system call with the kernel's layout.
constexpr uint32_t kStatxDioAlign = 0x00002000U;  // STATX_DIOALIGN
struct KernelStatxTimestamp {
  int64_t tv_sec;
  uint32_t tv_nsec;
  int32_t reserved;
};
struct KernelStatx {
  uint32_t stx_mask;
  uint32_t stx_blksize;
  uint64_t stx_attributes;
  uint32_t stx_nlink;
  uint32_t stx_uid;
  uint32_t stx_gid;
  uint16_t stx_mode;
  uint16_t spare0;
  uint64_t stx_ino;
  uint64_t stx_size;
  uint64_t stx_blocks;
  uint64_t stx_attributes_mask;
  KernelStatxTimestamp stx_atime, stx_btime, stx_ctime, stx_mtime;
  uint32_t stx_rdev_major, stx_rdev_minor, stx_dev_major, stx_dev_minor;
  uint64_t stx_mnt_id;
  uint32_t stx_dio_mem_align;
  uint32_t stx_dio_offset_align;
  uint64_t spare3[12];
};
static_assert(sizeof(KernelStatx) == 256, "struct statx is 256 bytes in the kernel ABI");

bool IsPowerOfTwo(uint64_t value) { return value != 0 && (value & (value - 1)) == 0; }

// Alignment O_DIRECT needs on `fd`: statx DIOALIGN (the larger of memory and offset
// alignment), then the logical block size of a block device, then 4096.
size_t DiscoverDirectAlignment(int fd, bool block_device) {
#ifdef SYS_statx
  KernelStatx stx{};
  if (::syscall(SYS_statx, fd, "", AT_EMPTY_PATH, kStatxDioAlign, &stx) == 0 &&
      (stx.stx_mask & kStatxDioAlign) != 0 && stx.stx_dio_offset_align != 0) {
    const size_t alignment = std::max(stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    if (IsPowerOfTwo(alignment)) return alignment;
  }
#endif
  if (block_device) {
    int logical_block_size = 0;
    if (::ioctl(fd, BLKSSZGET, &logical_block_size) == 0 && logical_block_size > 0 &&
        IsPowerOfTwo(static_cast<uint64_t>(logical_block_size))) {
      return static_cast<size_t>(logical_block_size);
    }
  }
  return kFallbackDirectAlignment;
}

class PosixFile final : public File {
 public:
  PosixFile(std::string path, int fd, const FileOptions& options, size_t alignment,
            bool block_device)
      : path_(std::move(path)),
        fd_(fd),
        use_io_uring_(options.use_io_uring),
        block_device_(block_device) {
    target_.fd = fd_;
    target_.path = &path_;
    target_.direct = options.direct_io;
    target_.alignment = alignment;
  }
  ~PosixFile() override { ::close(fd_); }
  PosixFile(const PosixFile&) = delete;
  PosixFile& operator=(const PosixFile&) = delete;

  Result<size_t> ReadAt(uint64_t offset, void* buffer, size_t length) override {
    CheckDirectAlignment(target_, Direction::kRead, offset, buffer, length);
    return TransferAll(target_, Direction::kRead, offset, buffer, length, 0);
  }

  Status WriteAt(uint64_t offset, const void* buffer, size_t length) override {
    CheckDirectAlignment(target_, Direction::kWrite, offset, buffer, length);
    // TransferAll never writes into the buffer of a write.
    Result<size_t> written =
        TransferAll(target_, Direction::kWrite, offset, const_cast<void*>(buffer), length, 0);
    return written.status();
  }

  Status ReadBatch(std::span<const IoRequest> requests) override {
    return Batch(Direction::kRead, requests);
  }
  Status WriteBatch(std::span<const IoRequest> requests) override {
    return Batch(Direction::kWrite, requests);
  }

  Status Sync() override {
    while (::fdatasync(fd_) != 0) {
      if (errno != EINTR) return Status::FromErrno(errno, path_ + ": fdatasync failed");
    }
    return Status::OK();
  }

  Result<uint64_t> Size() override {
    if (block_device_) {
      uint64_t size = 0;
      if (::ioctl(fd_, BLKGETSIZE64, &size) != 0) {
        return Status::FromErrno(errno, path_ + ": reading the block device size failed");
      }
      return size;
    }
    struct stat st {};
    if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, path_ + ": fstat failed");
    return static_cast<uint64_t>(st.st_size);
  }

  Status Truncate(uint64_t size) override {
    while (::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
      if (errno != EINTR) {
        return Status::FromErrno(errno,
                                 path_ + ": truncate to " + std::to_string(size) + " failed");
      }
    }
    return Status::OK();
  }

  Status DropCache(uint64_t offset, uint64_t length) override {
    // Dirty pages are not dropped by the advice: write them back first.
    constexpr unsigned kWriteBackAndWait =
        SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
    if (::sync_file_range(fd_, static_cast<off_t>(offset), static_cast<off_t>(length),
                          kWriteBackAndWait) != 0 &&
        errno != ESPIPE && errno != EINVAL) {
      return Status::FromErrno(errno, path_ + ": sync_file_range failed");
    }
    const int err = ::posix_fadvise(fd_, static_cast<off_t>(offset), static_cast<off_t>(length),
                                    POSIX_FADV_DONTNEED);
    if (err != 0 && err != ESPIPE) {
      return Status::FromErrno(err, path_ + ": posix_fadvise(DONTNEED) failed");
    }
    return Status::OK();
  }

  Result<uint64_t> NextData(uint64_t offset) override { return Seek(offset, SEEK_DATA); }
  Result<uint64_t> NextHole(uint64_t offset) override { return Seek(offset, SEEK_HOLE); }

  bool direct_io() const override { return target_.direct; }
  size_t alignment() const override { return target_.direct ? target_.alignment : 1; }
  const std::string& path() const override { return path_; }

 private:
  Status Batch(Direction direction, std::span<const IoRequest> requests) {
    for (const IoRequest& request : requests) {
      CheckDirectAlignment(target_, direction, request.offset, request.buffer, request.length);
    }
    if (use_io_uring_ && IoUringAvailable()) {
      return UringTransferBatch(target_, direction, requests);
    }
    return direction == Direction::kRead ? File::ReadBatch(requests) : File::WriteBatch(requests);
  }

  Result<uint64_t> Seek(uint64_t offset, int whence) {
    const off_t found = ::lseek(fd_, static_cast<off_t>(offset), whence);
    if (found >= 0) return static_cast<uint64_t>(found);
    const int err = errno;
    if (err != ENXIO && err != EINVAL && err != EOPNOTSUPP) {
      return Status::FromErrno(err, path_ + ": lseek(" +
                                        (whence == SEEK_DATA ? "SEEK_DATA" : "SEEK_HOLE") + ", " +
                                        std::to_string(offset) + ") failed");
    }
    ZQ_ASSIGN_OR_RETURN(uint64_t size, Size());
    if (err == ENXIO) return size;  // at or past end of file: no more data, hole at EOF
    // The file system cannot tell: everything is data up to end of file.
    if (whence == SEEK_DATA) return std::min(offset, size);
    return size;
  }

  const std::string path_;
  const int fd_;
  const bool use_io_uring_;
  const bool block_device_;
  TransferTarget target_;
};

}  // namespace

Result<std::unique_ptr<File>> OpenFile(const std::string& path, const FileOptions& options) {
  if (options.truncate && !options.writable) {
    return Status::InvalidArgument(path + ": truncating needs the file opened writable");
  }
  int flags = O_CLOEXEC | (options.writable ? O_RDWR : O_RDONLY);
  if (options.create) flags |= O_CREAT;
  if (options.create && options.exclusive) flags |= O_EXCL;
  // O_TRUNC would truncate before the image locks are taken: truncate after taking them.
  if (options.direct_io) flags |= O_DIRECT;
  if (options.sync_writes) flags |= O_DSYNC;

  // Whether this open may create the file, so that a refused O_DIRECT does not leave an
  // empty file behind.
  struct stat before {};
  const bool existed = ::stat(path.c_str(), &before) == 0;
  // Only files and block devices: a FIFO (a pipe, /dev/stdin) would block the open or be
  // read as an empty disk, and a character device has no size.
  if (existed && !S_ISREG(before.st_mode) && !S_ISBLK(before.st_mode)) {
    return Status::NotSupported(path + ": not a regular file or block device");
  }

  int fd = -1;
  do {
    fd = ::open(path.c_str(), flags, kCreateMode);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    const int err = errno;
    if (err == EINVAL && options.direct_io) {
      if (options.create && !existed) ::unlink(path.c_str());
      return Status::NotSupported(
          path + ": the file system does not support O_DIRECT (open failed: " + std::strerror(err) +
          ")");
    }
    return Status::FromErrno(err, path + ": open failed");
  }

  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return Status::FromErrno(err, path + ": fstat failed");
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    return Status::FromErrno(EISDIR, path + ": open failed");
  }
  const ImageLock lock = options.lock != ImageLock::kAuto ? options.lock
                         : options.writable               ? ImageLock::kWrite
                                                          : ImageLock::kRead;
  Status locked = LockImage(fd, path, lock);
  if (!locked.ok()) {
    ::close(fd);
    return locked;
  }
  if (options.truncate && S_ISREG(st.st_mode)) {  // O_TRUNC ignores devices too
    while (::ftruncate(fd, 0) != 0) {
      if (errno != EINTR) {
        const int err = errno;
        ::close(fd);
        return Status::FromErrno(err, path + ": truncate failed");
      }
    }
  }
  const bool block_device = S_ISBLK(st.st_mode);
  const size_t alignment = options.direct_io ? DiscoverDirectAlignment(fd, block_device) : 1;
  return std::unique_ptr<File>(
      std::make_unique<PosixFile>(path, fd, options, alignment, block_device));
}

}  // namespace zqcow::io
