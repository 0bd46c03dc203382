// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "qcow2/backing.h"

#include <algorithm>
#include <array>
#include <utility>

#include "format/header.h"
#include "format/probe.h"
#include "io/file.h"
#include "qcow2/qcow2_image.h"

namespace zqcow::qcow2 {

namespace {

using format::kFormatQcow2;
using format::kFormatRaw;

class Qcow2Backing final : public BackingFile {
 public:
  Qcow2Backing(std::string path, std::unique_ptr<Image> image)
      : path_(std::move(path)), image_(std::move(image)), size_(image_->virtual_size()) {}
  ~Qcow2Backing() override { (void)Close(); }

  const std::string& path() const override { return path_; }
  const std::string& format() const override { return format_; }
  uint64_t size() const override { return size_; }
  std::vector<std::string> files() const override {
    std::vector<std::string> chain = image_->Info().backing_chain;
    chain.insert(chain.begin(), path_);
    return chain;
  }
  Status Read(uint64_t offset, std::span<uint8_t> out) override {
    return image_->Read(offset, out);
  }
  Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length) override {
    return image_->Map(offset, length);
  }
  Status Close() override { return image_->Close(); }

 private:
  const std::string path_;
  const std::string format_{kFormatQcow2};
  std::unique_ptr<Image> image_;
  const uint64_t size_;
};

class RawBacking final : public BackingFile {
 public:
  RawBacking(std::unique_ptr<io::File> file, uint64_t size) : file_(std::move(file)), size_(size) {}

  const std::string& path() const override { return file_->path(); }
  const std::string& format() const override { return format_; }
  uint64_t size() const override { return size_; }
  std::vector<std::string> files() const override { return {file_->path()}; }
  Status Read(uint64_t offset, std::span<uint8_t> out) override {
    return io::ReadAnyRange(*file_, offset, out);
  }
  Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length) override {
    std::vector<MapExtent> extents;
    const uint64_t end = offset + length;
    uint64_t pos = offset;
    while (pos < end) {
      ZQ_ASSIGN_OR_RETURN(uint64_t data, file_->NextData(pos));
      data = std::clamp(data, pos, end);
      if (data > pos) {
        extents.push_back({pos, data - pos, MapExtent::Kind::kZero, pos});
        pos = data;
        if (pos == end) break;
      }
      ZQ_ASSIGN_OR_RETURN(uint64_t hole, file_->NextHole(pos));
      hole = hole <= pos ? end : std::min(hole, end);  // never loop without progress
      extents.push_back({pos, hole - pos, MapExtent::Kind::kData, pos});
      pos = hole;
    }
    return extents;
  }
  Status Close() override { return Status::OK(); }

 private:
  std::unique_ptr<io::File> file_;
  const std::string format_{kFormatRaw};
  const uint64_t size_;
};

}  // namespace

std::string ResolveBackingName(const std::string& image_path, const std::string& name) {
  if (name.starts_with('/')) return name;
  const size_t slash = image_path.rfind('/');
  if (slash == std::string::npos) return name;
  return image_path.substr(0, slash + 1) + name;
}

Result<std::string> ProbeFileFormat(io::File& file) {
  ZQ_ASSIGN_OR_RETURN(uint64_t size, file.Size());
  std::array<uint8_t, format::kProbeBytes> head{};
  const size_t length = static_cast<size_t>(std::min<uint64_t>(size, head.size()));
  ZQ_RETURN_IF_ERROR(io::ReadAnyRange(file, 0, std::span<uint8_t>(head).first(length)));
  return std::string(
      format::ProbeImageFormat(std::span<const uint8_t>(head).first(length), size, file.path()));
}

std::string BackingFormatOf(const format::Header& header) {
  for (const format::HeaderExtension& extension : header.extensions) {
    if (extension.type == format::kExtBackingFormat) {
      return std::string(extension.data.begin(), extension.data.end());
    }
  }
  return "";
}

Result<std::unique_ptr<BackingFile>> OpenBackingFile(const std::string& image_path,
                                                     const std::string& name,
                                                     const std::string& format, const IoOptions& io,
                                                     int depth) {
  const std::string path = ResolveBackingName(image_path, name);
  const std::string what = image_path + ": backing file '" + name + "'";
  if (depth > kMaxBackingDepth) {
    return Status::NotSupported(what + ": backing chain deeper than " +
                                std::to_string(kMaxBackingDepth) + " images (does it loop?)");
  }
  if (!format.empty()) ZQ_RETURN_IF_ERROR(format::CheckReadableFormat(what, format));
  // io::OpenFile refuses anything but regular files and block devices before opening it:
  // a name from a hostile image cannot make us open a FIFO (which blocks).
  io::FileOptions file_options;
  file_options.direct_io = io.direct_io;
  file_options.use_io_uring = io.use_io_uring;
  if (io.force_share) file_options.lock = io::ImageLock::kShared;
  Result<std::unique_ptr<io::File>> opened = io::OpenFile(path, file_options);
  if (!opened.ok() && file_options.direct_io &&
      opened.status().code() == Status::Code::kNotSupported) {
    file_options.direct_io = false;  // a file system without O_DIRECT: read it buffered
    opened = io::OpenFile(path, file_options);
  }
  if (!opened.ok()) return opened.status().WithPrefix(what);
  std::unique_ptr<io::File> file = std::move(opened).value();

  std::string detected = format;
  if (detected.empty()) {
    // No backing format extension: probed as QEMU probes it. A vmdk, vdi... read as raw
    // would give the overlay wrong data.
    Result<std::string> probed = ProbeFileFormat(*file);
    if (!probed.ok()) return probed.status().WithPrefix(what);
    detected = std::move(probed).value();
    ZQ_RETURN_IF_ERROR(format::CheckReadableFormat(what, detected));
  }
  if (detected != kFormatQcow2) {
    ZQ_ASSIGN_OR_RETURN(uint64_t size, file->Size());
    return std::unique_ptr<BackingFile>(std::make_unique<RawBacking>(std::move(file), size));
  }
  file.reset();
  OpenOptions options;
  options.writable = false;
  options.io = io;
  // Errors name the backing image itself (and, deeper down, the file that names a missing
  // or broken one); prefixing every level would repeat the chain.
  Result<std::unique_ptr<Image>> image = OpenImageChain(path, options, depth);
  if (!image.ok()) return image.status();
  return std::unique_ptr<BackingFile>(
      std::make_unique<Qcow2Backing>(path, std::move(image).value()));
}

}  // namespace zqcow::qcow2
