// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A qcow2 image as a Source, opened read-only through the public Image API (which reads
// through its backing chain): Map() tells which guest ranges are unallocated or zero in
// the whole chain so they are skipped without reading.

#include <algorithm>
#include <cstring>
#include <utility>

#include "convert/source.h"
#include "zqcow/image.h"

namespace zqcow::convert {

namespace {

class Qcow2Source final : public Source {
 public:
  Qcow2Source(std::unique_ptr<Image> image, std::string path)
      : image_(std::move(image)), path_(std::move(path)), size_(image_->virtual_size()) {}

  ~Qcow2Source() override { (void)Close(); }

  const std::string& path() const override { return path_; }
  const char* format() const override { return "qcow2"; }
  uint64_t size() const override { return size_; }
  // Image::Read takes any range and buffer; the image does its own aligned I/O.
  size_t read_alignment() const override { return 1; }

  std::vector<std::string> files() const override {
    std::vector<std::string> files = image_->Info().backing_chain;
    files.insert(files.begin(), path_);
    return files;
  }

  // Image::Read is thread-safe, and decompressing is the expensive part of reading.
  bool parallel_reads() const override { return true; }

  Result<std::vector<ByteRange>> DataRanges(uint64_t offset, uint64_t length) override {
    std::vector<ByteRange> ranges;
    const uint64_t end = std::min(offset + length, size_);
    if (offset >= end) return ranges;
    // Map resolves unallocated clusters through the backing chain: data anywhere in it is
    // kData or kCompressed; what is unallocated all the way down reads as zeros.
    ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> extents, image_->Map(offset, end - offset));
    for (const MapExtent& extent : extents) {
      if (extent.kind != MapExtent::Kind::kData && extent.kind != MapExtent::Kind::kCompressed) {
        continue;
      }
      const uint64_t start = std::max(extent.guest_offset, offset);
      const uint64_t stop = std::min(extent.guest_offset + extent.length, end);
      if (start >= stop) continue;
      if (!ranges.empty() && ranges.back().end() == start) {
        ranges.back().length += stop - start;
      } else {
        ranges.push_back({start, stop - start});
      }
    }
    return ranges;
  }

  // The image's own map: unallocated, zero, data and compressed clusters, with the depth
  // in the backing chain they come from.
  Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length) override {
    return image_->Map(offset, length);
  }

  Status Read(std::span<const io::IoRequest> requests) override {
    for (const io::IoRequest& request : requests) {
      auto* out = static_cast<uint8_t*>(request.buffer);
      const uint64_t inside =
          request.offset >= size_ ? 0 : std::min<uint64_t>(request.length, size_ - request.offset);
      if (inside > 0) {
        ZQ_RETURN_IF_ERROR(image_->Read(request.offset, std::span<uint8_t>(out, inside)));
      }
      if (inside < request.length) std::memset(out + inside, 0, request.length - inside);
    }
    return Status::OK();
  }

  Status Close() override {
    if (!image_) return Status::OK();
    Status status = image_->Close();
    image_.reset();
    return status;
  }

 private:
  std::unique_ptr<Image> image_;
  const std::string path_;
  const uint64_t size_;
};

}  // namespace

Result<std::unique_ptr<Source>> OpenQcow2Source(const std::string& path,
                                                const SourceOptions& source_options) {
  OpenOptions options;
  options.writable = false;
  options.io.direct_io = source_options.direct_io;
  options.io.force_share = source_options.force_share;
  options.snapshot = source_options.snapshot;
  options.snapshot_id = source_options.snapshot_id;
  options.snapshot_name = source_options.snapshot_name;
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Image> image, Image::Open(path, options));
  return std::unique_ptr<Source>(std::make_unique<Qcow2Source>(std::move(image), path));
}

}  // namespace zqcow::convert
