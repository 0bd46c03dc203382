// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The backing file of an image opened read-only: what the image's unallocated clusters
// read as, like `qemu-img convert` and `qemu-img compare` see an overlay. A qcow2 backing
// file may have a backing file of its own; the whole chain is opened read-only with the
// I/O options of the image on top. Raw backing files are read directly.
//
// Where the name points: an absolute name as is, a relative one relative to the directory
// of the image that names it (as QEMU resolves it). The format comes from the image's
// backing format header extension ("qcow2" or "raw"); without one, the file is probed as
// qemu-img probes it (format/probe.h) and any format but qcow2 and raw is refused.
//
// Threading: Read and Map may be called from several threads at once.

#ifndef ZQCOW_QCOW2_BACKING_H_
#define ZQCOW_QCOW2_BACKING_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "format/header.h"
#include "io/file.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::qcow2 {

// Backing chains deeper than this are refused (a chain that names itself ends here too).
inline constexpr int kMaxBackingDepth = 32;

class BackingFile {
 public:
  virtual ~BackingFile() = default;
  // The resolved path and "qcow2" / "raw".
  virtual const std::string& path() const = 0;
  virtual const std::string& format() const = 0;
  // Guest bytes it holds; an overlay reads zeros beyond them.
  virtual uint64_t size() const = 0;
  // This file and, below it, the files of its own backing chain.
  virtual std::vector<std::string> files() const = 0;
  // REQUIRES: offset + out.size() <= size().
  virtual Status Read(uint64_t offset, std::span<uint8_t> out) = 0;
  // Extents of [offset, offset + length) as this file's own Map says them (depth 0 = this
  // file). A raw file: kData where it has data, kZero for holes (host offset = guest
  // offset). REQUIRES: offset + length <= size().
  virtual Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length) = 0;
  virtual Status Close() = 0;
};

// The backing format header extension's text ("qcow2", "raw", ...); "" without one.
std::string BackingFormatOf(const format::Header& header);

// The format of `file` as qemu-img would detect it: format::ProbeImageFormat on its first
// bytes (any offset alignment; O_DIRECT files are read through a bounce buffer).
Result<std::string> ProbeFileFormat(io::File& file);

// Where backing file `name`, as named by the image at `image_path`, is: an absolute name as
// is, a relative one relative to the image's directory (as QEMU resolves it).
std::string ResolveBackingName(const std::string& image_path, const std::string& name);

// Opens backing file `name`, as named by the image at `image_path` whose backing format
// extension says `format` ("" when it has none). `depth` is the number of images above the
// one being opened (1 for the backing file of the top image). Errors name the image, the
// backing file and the cause: kNotFound when it does not exist, kNotSupported for other
// formats (named by the extension or detected) or a chain deeper than kMaxBackingDepth.
Result<std::unique_ptr<BackingFile>> OpenBackingFile(const std::string& image_path,
                                                     const std::string& name,
                                                     const std::string& format, const IoOptions& io,
                                                     int depth);

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_BACKING_H_
