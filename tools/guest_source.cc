// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "guest_source.h"

#include <algorithm>

#include "cli_common.h"

namespace zqcow::cli {

Result<std::unique_ptr<GuestSource>> GuestSource::Open(const std::string& path,
                                                       const std::string& format,
                                                       bool force_share,
                                                       const std::string& bitmap) {
  convert::SourceOptions options;
  options.bitmap = bitmap;
  options.force_share = force_share;
  if (convert::IsNbdUri(path)) {
    options.format = format;
  } else {
    ZQ_ASSIGN_OR_RETURN(options.format, ResolveFormat(path, format));
  }
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<convert::Source> source, convert::OpenSource(path, options));
  return std::unique_ptr<GuestSource>(new GuestSource(std::move(source)));
}

Status GuestSource::ReadPadded(uint64_t offset, std::span<uint8_t> out) {
  if (out.empty()) return Status::OK();
  // The tools open their sources buffered: read_alignment() is 1, any range reads.
  const io::IoRequest request{offset, out.data(), out.size()};
  return source_->Read({&request, 1});
}

Result<std::vector<ByteRange>> GuestSource::ZeroRanges(uint64_t offset, uint64_t length) {
  std::vector<ByteRange> ranges;
  uint64_t end = offset + length;
  uint64_t inside_end = std::min(end, std::max(offset, size()));
  auto add = [&ranges](uint64_t begin, uint64_t stop) {
    if (begin >= stop) return;
    if (!ranges.empty() && ranges.back().end() == begin) {
      ranges.back().length += stop - begin;
    } else {
      ranges.push_back({begin, stop - begin});
    }
  };
  if (inside_end > offset) {
    ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> extents, Map(offset, inside_end - offset));
    for (const MapExtent& e : extents) {
      if (e.kind == MapExtent::Kind::kUnallocated || e.kind == MapExtent::Kind::kZero) {
        uint64_t begin = std::max(e.guest_offset, offset);
        uint64_t stop = std::min(e.guest_offset + e.length, inside_end);
        add(begin, stop);
      }
    }
  }
  add(std::max(offset, inside_end), end);
  return ranges;
}

}  // namespace zqcow::cli
