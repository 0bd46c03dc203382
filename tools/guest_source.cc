// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "guest_source.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "cli_common.h"

namespace zqcow::cli {
namespace {

// A raw file or block device read with pread; holes found with SEEK_DATA/SEEK_HOLE.
class RawSource final : public GuestSource {
 public:
  RawSource(std::string path, int fd, uint64_t size)
      : GuestSource(std::move(path), std::string(kFormatRaw)), fd_(fd), size_(size) {}
  ~RawSource() override { close(fd_); }

  uint64_t size() const override { return size_; }

  Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length) override {
    std::vector<MapExtent> extents;
    uint64_t end = offset + length;
    uint64_t pos = offset;
    while (pos < end) {
      off_t data = lseek(fd_, static_cast<off_t>(pos), SEEK_DATA);
      uint64_t data_start;
      if (data < 0) {
        if (errno == ENXIO) {
          data_start = end;  // no data after pos: the rest is a hole
        } else {
          // SEEK_DATA unsupported: report everything as data.
          extents.push_back({pos, end - pos, MapExtent::Kind::kData, pos});
          return extents;
        }
      } else {
        data_start = std::min<uint64_t>(static_cast<uint64_t>(data), end);
      }
      if (data_start > pos) {
        extents.push_back({pos, data_start - pos, MapExtent::Kind::kZero, pos});
        pos = data_start;
        if (pos >= end) break;
      }
      off_t hole = lseek(fd_, static_cast<off_t>(pos), SEEK_HOLE);
      uint64_t data_end = hole < 0 ? end : std::min<uint64_t>(static_cast<uint64_t>(hole), end);
      if (data_end <= pos) data_end = end;  // defensive: never loop forever
      extents.push_back({pos, data_end - pos, MapExtent::Kind::kData, pos});
      pos = data_end;
    }
    return extents;
  }

 protected:
  Status Read(uint64_t offset, std::span<uint8_t> out) override {
    size_t done = 0;
    while (done < out.size()) {
      ssize_t n =
          pread(fd_, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, fmt::format("{}: read at offset {}", path(), offset));
      }
      if (n == 0) {  // the file shrank: the rest reads as zeros
        std::fill(out.begin() + static_cast<ptrdiff_t>(done), out.end(), 0);
        break;
      }
      done += static_cast<size_t>(n);
    }
    return Status::OK();
  }

 private:
  int fd_;
  uint64_t size_;
};

class Qcow2Source final : public GuestSource {
 public:
  Qcow2Source(std::string path, std::unique_ptr<Image> image)
      : GuestSource(std::move(path), std::string(kFormatQcow2)), image_(std::move(image)) {}
  ~Qcow2Source() override { (void)image_->Close(); }

  uint64_t size() const override { return image_->virtual_size(); }
  Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length) override {
    return image_->Map(offset, length);
  }

 protected:
  Status Read(uint64_t offset, std::span<uint8_t> out) override {
    return image_->Read(offset, out);
  }

 private:
  std::unique_ptr<Image> image_;
};

}  // namespace

Result<std::unique_ptr<GuestSource>> GuestSource::Open(const std::string& path,
                                                       const std::string& format,
                                                       bool force_share) {
  if (format == kFormatQcow2) {
    OpenOptions options;
    options.writable = false;
    options.io.force_share = force_share;
    ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Image> image, Image::Open(path, options));
    return std::unique_ptr<GuestSource>(new Qcow2Source(path, std::move(image)));
  }
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, path);
  off_t end = lseek(fd, 0, SEEK_END);  // also the size of a block device
  if (end < 0) {
    int err = errno;
    close(fd);
    return Status::FromErrno(err, fmt::format("{}: cannot find its size", path));
  }
  return std::unique_ptr<GuestSource>(new RawSource(path, fd, static_cast<uint64_t>(end)));
}

Status GuestSource::ReadPadded(uint64_t offset, std::span<uint8_t> out) {
  uint64_t inside = offset >= size() ? 0 : std::min<uint64_t>(out.size(), size() - offset);
  if (inside > 0) ZQ_RETURN_IF_ERROR(Read(offset, out.first(inside)));
  std::fill(out.begin() + static_cast<ptrdiff_t>(inside), out.end(), 0);
  return Status::OK();
}

Result<std::vector<ByteRange>> GuestSource::ZeroRanges(uint64_t offset, uint64_t length) {
  std::vector<ByteRange> ranges;
  uint64_t end = offset + length;
  uint64_t inside_end = std::min(end, std::max(offset, size()));
  auto add = [&ranges](uint64_t begin, uint64_t stop) {
    if (begin >= stop) return;
    if (!ranges.empty() && ranges.back().end == begin) {
      ranges.back().end = stop;
    } else {
      ranges.push_back({begin, stop});
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
