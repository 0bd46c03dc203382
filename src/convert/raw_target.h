// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Raw output (`convert -O raw`, `restore`): DST is a regular file, a block device or an NBD
// export (through libnbd), written at guest offsets. The pipeline hands it data with Write
// and zero ranges with WriteZeroes; the target makes zeros as cheaply as it can:
//   new file (created here)   nothing: it was truncated to the virtual size, so holes
//   -n --target-is-zero       nothing (the user's word)
//   existing file (-n)        fallocate(PUNCH_HOLE), else ZERO_RANGE, else written zeros
//   block device              BLKZEROOUT, else written zeros
//   NBD export                NBD write-zeroes with the fast-zero flag where the server
//                             supports it, else plain write-zeroes, else written zeros
//   sparse_size 0 (-S 0)      always written (files and devices) / write-zeroes without
//                             holes (NBD): the output is fully allocated
// A new file appears only whole, like a qcow2 target: it is written to DST.zqcow-partial
// and renamed onto DST by Close() once synced (CloseIncomplete removes it). Block devices,
// NBD exports and -n files are written in place.

#ifndef ZQCOW_CONVERT_RAW_TARGET_H_
#define ZQCOW_CONVERT_RAW_TARGET_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "zqcow/convert.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::convert {

// The Image the pipeline writes (Write, WriteZeroes, Flush, Close, CloseIncomplete); the
// rest of the Image interface is refused.
class RawTarget : public Image {
 public:
  RawTarget(std::string target, uint64_t virtual_size)
      : target_(std::move(target)), virtual_size_(virtual_size) {}

  // Offset and length of Write must be multiples of this, except a write ending at the
  // virtual size (the tail goes through a buffered descriptor).
  virtual size_t write_alignment() const = 0;

  ImageInfo Info() const override {
    ImageInfo info;
    info.virtual_size = virtual_size_;
    return info;
  }
  uint64_t virtual_size() const override { return virtual_size_; }
  uint32_t cluster_size() const override { return 0; }
  Compression compression() const override { return Compression::kZlib; }
  Status Read(uint64_t, std::span<uint8_t>) override { return Unsupported("read"); }
  Status WriteCompressed(uint64_t, std::span<const uint8_t>) override {
    return Unsupported("compressed write");
  }
  Status Discard(uint64_t, uint64_t) override { return Unsupported("discard"); }
  Result<std::vector<MapExtent>> Map(uint64_t, uint64_t) override { return Unsupported("map"); }

 protected:
  const std::string& target() const { return target_; }

 private:
  Status Unsupported(const char* what) const {
    return Status::NotSupported(target_ + ": raw target: no " + what);
  }

  const std::string target_;
  const uint64_t virtual_size_;
};

// Opens (or creates) DST for `virtual_size` guest bytes as options say: no_create (-n:
// it must exist and hold at least virtual_size bytes), target_is_zero, sparse_size,
// target_io.direct_io (-t none), overwrite (--force, for a new file). Errors name DST in
// one line: exists (without --force), missing or too small (-n), read-only, not a file,
// block device or NBD export, cannot connect.
Result<std::unique_ptr<RawTarget>> OpenRawTarget(const std::string& target,
                                                 const ConvertOptions& options,
                                                 uint64_t virtual_size);

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_RAW_TARGET_H_
