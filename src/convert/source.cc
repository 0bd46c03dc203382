// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Opening a source: format detection as qemu-img probes (format/probe.h), and the checks
// that give a clear error when the file is of a format zqcow does not read or the format
// given does not match the file.

#include "convert/source.h"

#include <utility>

#include "format/probe.h"
#include "qcow2/backing.h"

namespace zqcow::convert {

namespace {
constexpr uint64_t kRawSectorSize = 512;
}  // namespace

namespace {

using format::kFormatQcow2;
using format::kFormatRaw;

// Makes sure a failure names the source file.
Status NameFile(const Status& status, const std::string& path) {
  if (status.ok() || status.message().find(path) != std::string::npos) return status;
  return status.WithPrefix(path);
}

}  // namespace

Result<std::unique_ptr<Source>> OpenSource(const std::string& path, const SourceOptions& options) {
  if (IsNbdUri(path)) {
    if (options.has_snapshot()) {
      return Status::InvalidArgument(path + ": an NBD export has no internal snapshots (-s/-l)");
    }
    return OpenNbdSource(path, options);
  }
  const std::string& requested = options.format;
  const bool direct_io = options.direct_io;
  if (!requested.empty() && requested != kFormatRaw && requested != kFormatQcow2) {
    return Status::InvalidArgument(path + ": unknown source format '" + requested +
                                   "' (expected raw or qcow2)");
  }
  io::FileOptions file_options;
  file_options.direct_io = direct_io;
  if (options.force_share) file_options.lock = io::ImageLock::kShared;
  Result<std::unique_ptr<io::File>> opened = io::OpenFile(path, file_options);
  if (!opened.ok()) return NameFile(opened.status(), path);
  std::unique_ptr<io::File> file = std::move(opened).value();
  Result<uint64_t> size = file->Size();
  if (!size.ok()) return NameFile(size.status(), path);

  // "-f raw" reads the bytes as they are, whatever they look like.
  if (requested != kFormatRaw) {
    Result<std::string> detected = qcow2::ProbeFileFormat(*file);
    if (!detected.ok()) return NameFile(detected.status(), path);
    ZQ_RETURN_IF_ERROR(format::CheckReadableFormat(path, *detected));
    if (requested == kFormatQcow2 && *detected != kFormatQcow2) {
      return Status::InvalidArgument(path + ": not a qcow2 image (it probes as raw)");
    }
    if (*detected == kFormatQcow2) {
      file.reset();  // the image opens the file itself
      Result<std::unique_ptr<Source>> source = OpenQcow2Source(path, options);
      if (!source.ok()) return NameFile(source.status(), path);
      return source;
    }
  }
  if (options.has_snapshot()) {
    return Status::InvalidArgument(path + ": a raw image has no internal snapshots (-s/-l)");
  }
  // qemu-img sees a raw file as whole 512-byte sectors: its virtual size rounds up, and
  // the padding reads as zeros (so a file and its conversion compare without a size note).
  return MakeRawSource(std::move(file), (*size + kRawSectorSize - 1) / kRawSectorSize * kRawSectorSize);
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
