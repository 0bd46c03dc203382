// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Read-only access to the guest contents of a raw file/block device or a qcow2 image, for
// `compare` and `map`: sized reads and the map of which ranges read as zeros.

#ifndef ZQCOW_TOOLS_GUEST_SOURCE_H_
#define ZQCOW_TOOLS_GUEST_SOURCE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::cli {

// A half-open guest byte range [begin, end).
struct ByteRange {
  uint64_t begin = 0;
  uint64_t end = 0;
};

class GuestSource {
 public:
  // `format` is "raw" or "qcow2" (see ResolveFormat). A qcow2 image reads through its
  // backing chain. force_share: read a qcow2 image another process writes (-U).
  static Result<std::unique_ptr<GuestSource>> Open(const std::string& path,
                                                   const std::string& format,
                                                   bool force_share = false);
  virtual ~GuestSource() = default;

  const std::string& path() const { return path_; }
  const std::string& format() const { return format_; }
  virtual uint64_t size() const = 0;

  // Reads guest bytes at [offset, offset + out.size()); bytes at or past size() read as
  // zeros.
  Status ReadPadded(uint64_t offset, std::span<uint8_t> out);
  // Ranges inside [offset, offset + length) known to read as zeros (holes, unallocated and
  // zero clusters, and everything at or past size()), sorted and merged. Ranges not listed
  // may still hold zeros.
  Result<std::vector<ByteRange>> ZeroRanges(uint64_t offset, uint64_t length);
  // Extents of [offset, offset + length), REQUIRES: offset + length <= size(). For raw
  // sources: kData (host_offset = guest offset) and kZero for holes.
  virtual Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length) = 0;

 protected:
  GuestSource(std::string path, std::string format)
      : path_(std::move(path)), format_(std::move(format)) {}
  // REQUIRES: offset + out.size() <= size().
  virtual Status Read(uint64_t offset, std::span<uint8_t> out) = 0;

 private:
  std::string path_;
  std::string format_;
};

}  // namespace zqcow::cli

#endif  // ZQCOW_TOOLS_GUEST_SOURCE_H_
