// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A raw file or block device as a Source: holes come from SEEK_DATA / SEEK_HOLE.

#include <algorithm>
#include <utility>

#include "convert/source.h"

namespace zqcow::convert {

namespace {

class RawSource final : public Source {
 public:
  RawSource(std::unique_ptr<io::File> file, uint64_t size)
      : file_(std::move(file)), path_(file_->path()), size_(size) {}

  const std::string& path() const override { return path_; }
  const char* format() const override { return "raw"; }
  uint64_t size() const override { return size_; }
  size_t read_alignment() const override { return file_ ? file_->alignment() : 1; }

  Result<std::vector<ByteRange>> DataRanges(uint64_t offset, uint64_t length) override {
    std::vector<ByteRange> ranges;
    const uint64_t end = std::min(offset + length, size_);
    uint64_t pos = offset;
    while (pos < end) {
      ZQ_ASSIGN_OR_RETURN(uint64_t data, file_->NextData(pos));
      if (data >= end) break;
      ZQ_ASSIGN_OR_RETURN(uint64_t hole, file_->NextHole(data));
      // A hole at or before `data` would mean the file changed under us; treat the rest as
      // data rather than loop forever.
      if (hole <= data) hole = end;
      hole = std::min(hole, end);
      ranges.push_back({data, hole - data});
      pos = hole;
    }
    return ranges;
  }

  Status Read(std::span<const io::IoRequest> requests) override {
    return file_->ReadBatch(requests);
  }

  Status Close() override {
    file_.reset();
    return Status::OK();
  }

 private:
  std::unique_ptr<io::File> file_;
  const std::string path_;
  const uint64_t size_;
};

}  // namespace

std::unique_ptr<Source> MakeRawSource(std::unique_ptr<io::File> file, uint64_t size) {
  return std::make_unique<RawSource>(std::move(file), size);
}

}  // namespace zqcow::convert
