// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/raw_target.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <utility>

#include "convert/source.h"
#include "convert/target.h"
#include "io/aligned_buffer.h"
#include "io/file.h"
#include "io/image_lock.h"

namespace zqcow::convert {

// The NBD kind lives in raw_target_nbd.cc.
Result<std::unique_ptr<RawTarget>> OpenNbdRawTarget(const std::string& uri,
                                                    const ConvertOptions& options,
                                                    uint64_t virtual_size);
// A zero-filled buffer for writing zeros, shared (never written to).
const uint8_t* ZeroBlock();
uint64_t ZeroBlockSize();

namespace {

constexpr uint64_t kZeroBlockBytes = uint64_t{1} << 20;

// Tells what a zero range costs on an in-place file or device: how it is zeroed.
enum class ZeroMode : uint8_t { kNothing, kPunch, kBlkZeroOut, kWrite };

class FileRawTarget final : public RawTarget {
 public:
  FileRawTarget(std::string target, TargetPaths paths, bool created, std::unique_ptr<io::File> file,
                int plain_fd, ZeroMode zero_mode, uint64_t virtual_size)
      : RawTarget(std::move(target), virtual_size),
        paths_(std::move(paths)),
        created_(created),
        file_(std::move(file)),
        plain_fd_(plain_fd),
        zero_mode_(zero_mode) {}
  ~FileRawTarget() override { (void)CloseIncomplete(); }

  size_t write_alignment() const override { return file_ ? file_->alignment() : 1; }

  Status Write(uint64_t offset, std::span<const uint8_t> data) override {
    const size_t align = write_alignment();
    const uint64_t aligned = data.size() / align * align;
    if (aligned > 0) ZQ_RETURN_IF_ERROR(file_->WriteAt(offset, data.data(), aligned));
    if (aligned < data.size()) {  // the unaligned tail at the virtual size
      ZQ_RETURN_IF_ERROR(PlainWrite(offset + aligned, data.data() + aligned, data.size() - aligned));
    }
    return Status::OK();
  }

  Status WriteZeroes(uint64_t offset, uint64_t length) override {
    switch (zero_mode_.load(std::memory_order_relaxed)) {
      case ZeroMode::kNothing:
        return Status::OK();
      case ZeroMode::kPunch:
        if (::fallocate(plain_fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        static_cast<off_t>(offset), static_cast<off_t>(length)) == 0 ||
            ::fallocate(plain_fd_, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                        static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) {
          return Status::OK();
        }
        if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL) {
          return Status::FromErrno(errno, ZeroContext(offset, length));
        }
        zero_mode_.store(ZeroMode::kWrite, std::memory_order_relaxed);
        break;
      case ZeroMode::kBlkZeroOut: {
        uint64_t range[2] = {offset, length};
        if (::ioctl(plain_fd_, BLKZEROOUT, range) == 0) return Status::OK();
        if (errno != EOPNOTSUPP && errno != ENOTTY && errno != EINVAL) {
          return Status::FromErrno(errno, ZeroContext(offset, length));
        }
        zero_mode_.store(ZeroMode::kWrite, std::memory_order_relaxed);
        break;
      }
      case ZeroMode::kWrite:
        break;
    }
    return WriteZeroBytes(offset, length);
  }

  Status Flush() override {
    if (file_ == nullptr) return Status::OK();
    return file_->Sync();
  }

  Status Close() override {
    if (file_ == nullptr) return Status::OK();
    ZQ_RETURN_IF_ERROR(file_->Sync());
    file_.reset();
    CloseFd();
    if (created_) ZQ_RETURN_IF_ERROR(CommitTarget(paths_));
    return Status::OK();
  }

  Status CloseIncomplete() override {
    if (file_ == nullptr) return Status::OK();
    file_.reset();
    CloseFd();
    // A raw file cannot say it is incomplete: a partial one never stays.
    if (created_) (void)::unlink(paths_.partial.c_str());
    return Status::OK();
  }

 private:
  std::string ZeroContext(uint64_t offset, uint64_t length) const {
    return file_->path() + ": zeroing " + std::to_string(length) + " bytes at offset " +
           std::to_string(offset) + " failed";
  }
  void CloseFd() {
    if (plain_fd_ >= 0) ::close(plain_fd_);
    plain_fd_ = -1;
  }
  Status PlainWrite(uint64_t offset, const uint8_t* data, uint64_t length) {
    while (length > 0) {
      const ssize_t done = ::pwrite(plain_fd_, data, length, static_cast<off_t>(offset));
      if (done < 0 && errno == EINTR) continue;
      if (done <= 0) {
        return Status::FromErrno(done < 0 ? errno : ENOSPC,
                                 file_->path() + ": write of " + std::to_string(length) +
                                     " bytes at offset " + std::to_string(offset) + " failed");
      }
      data += done;
      offset += static_cast<uint64_t>(done);
      length -= static_cast<uint64_t>(done);
    }
    return Status::OK();
  }
  Status WriteZeroBytes(uint64_t offset, uint64_t length) {
    while (length > 0) {
      const uint64_t piece = std::min(length, ZeroBlockSize());
      ZQ_RETURN_IF_ERROR(Write(offset, {ZeroBlock(), piece}));
      offset += piece;
      length -= piece;
    }
    return Status::OK();
  }

  const TargetPaths paths_;
  const bool created_;  // a new file at paths_.partial, renamed onto DST by Close
  std::unique_ptr<io::File> file_;
  int plain_fd_;  // buffered descriptor: unaligned tails, fallocate, BLKZEROOUT
  std::atomic<ZeroMode> zero_mode_;
};

Status TooSmall(const std::string& target, uint64_t size, uint64_t virtual_size) {
  return Status::InvalidArgument(target + ": target is too small (" + std::to_string(size) +
                                 " bytes) for the source (" + std::to_string(virtual_size) +
                                 " bytes)");
}

}  // namespace

const uint8_t* ZeroBlock() {
  static const io::AlignedBuffer* const zeros = new io::AlignedBuffer(kZeroBlockBytes);
  return zeros->data();
}
uint64_t ZeroBlockSize() { return kZeroBlockBytes; }

Result<std::unique_ptr<RawTarget>> OpenRawTarget(const std::string& target,
                                                 const ConvertOptions& options,
                                                 uint64_t virtual_size) {
  if (options.target_is_zero && !options.no_create) {
    return Status::InvalidArgument(target + ": --target-is-zero needs -n");
  }
  if (IsNbdUri(target)) return OpenNbdRawTarget(target, options, virtual_size);

  struct stat st {};
  const bool exists = ::stat(target.c_str(), &st) == 0;
  const bool in_place = options.no_create || (exists && S_ISBLK(st.st_mode));
  TargetPaths paths = TargetFiles(target);
  io::FileOptions file_options;
  file_options.writable = true;
  file_options.direct_io = options.target_io.direct_io;
  std::string path = target;
  if (in_place) {
    if (!exists) {
      return Status::NotFound(target + ": target does not exist (-n uses an existing target)");
    }
    if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
      return Status::NotSupported(target + ": not a regular file, block device or NBD export");
    }
  } else {
    ZQ_ASSIGN_OR_RETURN(paths, PlanTarget(target, options));
    path = paths.partial;
    struct stat partial {};
    if (::lstat(path.c_str(), &partial) == 0) {
      if (!options.overwrite) {
        return Status::AlreadyExists(path + ": an interrupted conversion left this partial file "
                                            "(use --force to discard it)");
      }
      ZQ_RETURN_IF_ERROR(io::CheckNotInUse(path));
      if (::unlink(path.c_str()) != 0) return Status::FromErrno(errno, path + ": remove");
    }
    file_options.create = true;
    file_options.exclusive = true;
  }
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<io::File> file, io::OpenFile(path, file_options));
  ZQ_ASSIGN_OR_RETURN(uint64_t size, file->Size());
  if (in_place && size < virtual_size) return TooSmall(target, size, virtual_size);
  if (!in_place) {
    Status sized = file->Truncate(virtual_size);  // all holes: the zeros cost nothing
    if (!sized.ok()) {
      file.reset();
      (void)::unlink(path.c_str());
      return sized;
    }
  }
  const int plain_fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (plain_fd < 0) {
    const int err = errno;
    if (!in_place) (void)::unlink(path.c_str());
    return Status::FromErrno(err, path + ": open failed");
  }
  ZeroMode zero_mode = ZeroMode::kNothing;
  if (options.sparse_size == 0) {
    zero_mode = ZeroMode::kWrite;  // -S 0: fully allocated
  } else if (in_place && !options.target_is_zero) {
    zero_mode = S_ISBLK(st.st_mode) ? ZeroMode::kBlkZeroOut : ZeroMode::kPunch;
  }
  return std::unique_ptr<RawTarget>(std::make_unique<FileRawTarget>(
      target, std::move(paths), !in_place, std::move(file), plain_fd, zero_mode, virtual_size));
}

}  // namespace zqcow::convert
