// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Read-only access to the guest contents of a raw file/block device, a qcow2 image or an
// NBD export, for `info`, `compare` and `map`: a convert::Source (the one source interface
// the converter reads through too) plus the padded reads and zero ranges the tools need.

#ifndef ZQCOW_TOOLS_GUEST_SOURCE_H_
#define ZQCOW_TOOLS_GUEST_SOURCE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "convert/source.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::cli {

using convert::ByteRange;

class GuestSource {
 public:
  // `format` is "" (detect), "raw" or "qcow2" (see ResolveFormat; an NBD URI is read as
  // raw). A qcow2 image reads through its backing chain. force_share: read an image another
  // process writes (-U). `bitmap`: the dirty bitmap an NBD source is asked to export (see
  // convert::SourceOptions::bitmap).
  static Result<std::unique_ptr<GuestSource>> Open(const std::string& path,
                                                   const std::string& format,
                                                   bool force_share = false,
                                                   const std::string& bitmap = "");

  const std::string& path() const { return source_->path(); }
  std::string format() const { return source_->format(); }
  uint64_t size() const { return source_->size(); }
  bool is_nbd() const { return convert::IsNbdUri(path()); }
  convert::Source& source() { return *source_; }

  // Reads guest bytes at [offset, offset + out.size()); bytes at or past size() read as
  // zeros.
  Status ReadPadded(uint64_t offset, std::span<uint8_t> out);
  // Ranges inside [offset, offset + length) known to read as zeros (holes, unallocated and
  // zero clusters, and everything at or past size()), sorted and merged. Ranges not listed
  // may still hold zeros.
  Result<std::vector<ByteRange>> ZeroRanges(uint64_t offset, uint64_t length);
  // Extents of [offset, offset + length), REQUIRES: offset + length <= size(). For raw
  // sources: kData (host_offset = guest offset) and kZero for holes.
  Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length) {
    return source_->Map(offset, length);
  }

 private:
  explicit GuestSource(std::unique_ptr<convert::Source> source) : source_(std::move(source)) {}

  std::unique_ptr<convert::Source> source_;
};

}  // namespace zqcow::cli

#endif  // ZQCOW_TOOLS_GUEST_SOURCE_H_
