// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/resume.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "testing/test_util.h"

namespace zqcow::convert {
namespace {

using zqcow::testing::TempDir;

// A source with fixed data ranges, for SkipPresentRanges.
class FixedSource final : public Source {
 public:
  FixedSource(std::string path, std::vector<ByteRange> data)
      : path_(std::move(path)), data_(std::move(data)) {}
  const std::string& path() const override { return path_; }
  const char* format() const override { return "raw"; }
  uint64_t size() const override { return 1 << 20; }
  size_t read_alignment() const override { return 1; }
  Result<std::vector<ByteRange>> DataRanges(uint64_t, uint64_t) override { return data_; }
  Status Read(std::span<const io::IoRequest>) override { return Status::OK(); }
  Status Close() override { return Status::OK(); }

 private:
  std::string path_;
  std::vector<ByteRange> data_;
};

std::vector<std::pair<uint64_t, uint64_t>> Pairs(const std::vector<ByteRange>& ranges) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (const ByteRange& r : ranges) out.emplace_back(r.offset, r.end());
  return out;
}

TEST(ResumeTest, SkipPresentRangesLeavesOutWhatThePartialImageHolds) {
  auto source = SkipPresentRanges(
      std::make_unique<FixedSource>("s", std::vector<ByteRange>{{0, 100}, {200, 100}, {400, 50}}),
      {{0, 10}, {50, 20}, {90, 150}, {290, 5}, {420, 100}});
  auto ranges = source->DataRanges(0, 1000);
  ASSERT_TRUE(ranges.ok());
  const std::vector<std::pair<uint64_t, uint64_t>> expected = {
      {10, 50}, {70, 90}, {240, 290}, {295, 300}, {400, 420}};
  EXPECT_EQ(Pairs(*ranges), expected);
  // A source whose every range is present: nothing left to read.
  auto all = SkipPresentRanges(std::make_unique<FixedSource>("s", std::vector<ByteRange>{{0, 64}}),
                               {{0, 128}});
  auto none = all->DataRanges(0, 1000);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST(ResumeTest, RecordRoundTripsAnyPath) {
  TempDir dir;
  const std::string path = dir.File("r.info");
  const ResumeRecord record = {{"virtual_size", "1048576"},
                               {"source.0.path", "/odd\\name\nwith=newline"},
                               {"backing_file", ""}};
  ASSERT_TRUE(WriteResumeRecord(path, record).ok());
  // Never overwritten: it is created exclusively.
  EXPECT_EQ(WriteResumeRecord(path, record).code(), Status::Code::kAlreadyExists);
  auto read = ReadResumeRecord(path);
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  EXPECT_EQ(*read, record);
}

TEST(ResumeTest, MalformedRecordsAreRefusedNamingTheFile) {
  TempDir dir;
  const std::string path = dir.File("r.info");
  for (const std::string& text : {std::string(""), std::string("something else\n"),
                                  std::string("zqcow-partial 1\nno equals sign\n"),
                                  std::string("zqcow-partial 1\nkey=bad escape \\x\n"),
                                  std::string("zqcow-partial 1\nkey=unterminated")}) {
    SCOPED_TRACE(text);
    zqcow::testing::WriteWholeFile(path, std::vector<uint8_t>(text.begin(), text.end()));
    auto read = ReadResumeRecord(path);
    ASSERT_FALSE(read.ok());
    EXPECT_EQ(read.status().code(), Status::Code::kCorruption);
    EXPECT_NE(read.status().message().find(path), std::string::npos);
  }
}

ResumeRecord Record(const std::string& type, const std::string& mtime) {
  ResumeRecord record = {{"virtual_size", "1048576"},
                         {"cluster_size", "65536"},
                         {"source.files", "1"},
                         {"source.0.path", "/dev/sdz"},
                         {"source.0.type", type}};
  if (type == "file") {
    record.insert(record.end(), {{"source.0.dev", "1"},
                                 {"source.0.ino", "2"},
                                 {"source.0.size", "1048576"},
                                 {"source.0.mtime_ns", mtime},
                                 {"source.0.ctime_ns", "5"}});
  }
  return record;
}

TEST(ResumeTest, ABlockDeviceSourceNeedsTheUsersWord) {
  const ResumeRecord device = Record("block", "");
  Status refused = CheckResumable(device, device, "p", /*source_unchanged=*/false);
  EXPECT_EQ(refused.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(refused.message().find("--source-unchanged"), std::string::npos) << refused.message();
  EXPECT_TRUE(CheckResumable(device, device, "p", /*source_unchanged=*/true).ok());
  // The user's word covers a device, never a regular file that changed.
  Status changed = CheckResumable(Record("file", "3"), Record("file", "4"), "p", true);
  EXPECT_EQ(changed.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(changed.message().find("modification time"), std::string::npos) << changed.message();
  EXPECT_TRUE(CheckResumable(Record("file", "3"), Record("file", "3"), "p", false).ok());
  // A file where a device was (or the other way round) is not the same source.
  EXPECT_FALSE(CheckResumable(device, Record("file", "3"), "p", true).ok());
  ResumeRecord other_option = device;
  other_option[1].second = "131072";
  Status options = CheckResumable(device, other_option, "p", true);
  EXPECT_NE(options.message().find("cluster_size"), std::string::npos) << options.message();
}

}  // namespace
}  // namespace zqcow::convert
