// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Opening a source: format detection by the qcow2 magic, and the checks that give a clear
// error when the format given does not match the file.

#include "convert/source.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "io/aligned_buffer.h"

namespace zqcow::convert {

namespace {

constexpr std::array<uint8_t, 4> kQcow2Magic = {'Q', 'F', 'I', 0xfb};
constexpr const char* kFormatRaw = "raw";
constexpr const char* kFormatQcow2 = "qcow2";

// Makes sure a failure names the source file.
Status NameFile(const Status& status, const std::string& path) {
  if (status.ok() || status.message().find(path) != std::string::npos) return status;
  return status.WithPrefix(path);
}

// Whether the file starts with the qcow2 magic. Reads one aligned block (O_DIRECT-safe).
Result<bool> HasQcow2Magic(io::File& file, uint64_t size) {
  if (size < kQcow2Magic.size()) return false;
  const size_t alignment = std::max<size_t>(file.alignment(), io::kBufferAlignment);
  io::AlignedBuffer block(alignment, alignment);
  ZQ_ASSIGN_OR_RETURN(size_t got, file.ReadAt(0, block.data(), block.size()));
  if (got < kQcow2Magic.size()) return false;
  return std::memcmp(block.data(), kQcow2Magic.data(), kQcow2Magic.size()) == 0;
}

}  // namespace

Result<std::unique_ptr<Source>> OpenSource(const std::string& path, const SourceOptions& options) {
  if (IsNbdUri(path)) return OpenNbdSource(path, options);
  const std::string& format = options.format;
  const bool direct_io = options.direct_io;
  if (!format.empty() && format != kFormatRaw && format != kFormatQcow2) {
    return Status::InvalidArgument(path + ": unknown source format '" + format +
                                   "' (expected raw or qcow2)");
  }
  io::FileOptions file_options;
  file_options.direct_io = direct_io;
  Result<std::unique_ptr<io::File>> opened = io::OpenFile(path, file_options);
  if (!opened.ok()) return NameFile(opened.status(), path);
  std::unique_ptr<io::File> file = std::move(opened).value();
  Result<uint64_t> size = file->Size();
  if (!size.ok()) return NameFile(size.status(), path);

  if (format != kFormatRaw) {
    Result<bool> is_qcow2 = HasQcow2Magic(*file, *size);
    if (!is_qcow2.ok()) return NameFile(is_qcow2.status(), path);
    if (*is_qcow2) {
      file.reset();  // the image opens the file itself
      Result<std::unique_ptr<Source>> source = OpenQcow2Source(path, direct_io);
      if (!source.ok()) return NameFile(source.status(), path);
      return source;
    }
    if (format == kFormatQcow2) {
      return Status::InvalidArgument(path + ": not a qcow2 image (no QFI\\xfb magic at offset 0)");
    }
  }
  return MakeRawSource(std::move(file), *size);
}

Result<std::vector<MapExtent>> Source::Map(uint64_t offset, uint64_t length) {
  ZQ_ASSIGN_OR_RETURN(std::vector<ByteRange> data, DataRanges(offset, length));
  std::vector<MapExtent> extents;
  uint64_t pos = offset;
  auto add = [&extents](uint64_t start, uint64_t stop, MapExtent::Kind kind) {
    if (start < stop) extents.push_back({start, stop - start, kind, start, 0});
  };
  for (const ByteRange& range : data) {
    add(pos, range.offset, MapExtent::Kind::kZero);
    add(range.offset, range.end(), MapExtent::Kind::kData);
    pos = range.end();
  }
  add(pos, offset + length, MapExtent::Kind::kZero);
  return extents;
}

}  // namespace zqcow::convert
