// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Image lifecycle: reopen and append, CloseIncomplete, refcount table growth, a bounded
// metadata cache, sparse and huge virtual sizes, zeroes/discard, write failures, and
// malformed images refused with clear errors.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <string>
#include <vector>

#include "format/endian.h"
#include "format/header.h"
#include "format/types.h"
#include "io/fault_file.h"
#include "io/file.h"
#include "qcow2/image_test_util.h"
#include "qcow2/qcow2_image.h"
#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow::qcow2 {
namespace {

using testing::ExpectCleanAndEqual;
using testing::NewCompressor;
using testing::RawTwin;
using zqcow::testing::DataKind;
using zqcow::testing::MakeData;
using zqcow::testing::QemuImgCheck;
using zqcow::testing::ReadWholeFile;
using zqcow::testing::RunCommand;
using zqcow::testing::ShellQuote;
using zqcow::testing::TempDir;

constexpr size_t kIncompatibleOffset = 72;
constexpr size_t kRefcountTableOffset = 48;

uint64_t HeaderField64(const std::string& path, size_t offset) {
  auto bytes = ReadWholeFile(path);
  EXPECT_GE(bytes.size(), offset + 8);
  return bytes.size() >= offset + 8 ? format::LoadBE64(bytes.data() + offset) : 0;
}

std::unique_ptr<Image> CreateOrDie(const std::string& path, const CreateOptions& options,
                                   const IoOptions& io = IoOptions()) {
  auto created = Image::Create(path, options, io);
  EXPECT_TRUE(created.ok()) << created.status().ToString();
  return created.ok() ? std::move(created).value() : nullptr;
}

std::unique_ptr<Image> OpenOrDie(const std::string& path, bool writable) {
  OpenOptions options;
  options.writable = writable;
  auto opened = Image::Open(path, options);
  EXPECT_TRUE(opened.ok()) << opened.status().ToString();
  return opened.ok() ? std::move(opened).value() : nullptr;
}

void WriteClusters(Image* image, RawTwin* raw, uint64_t first, uint64_t count, uint64_t seed) {
  auto compressor = NewCompressor(image->compression());
  const uint64_t cs = image->cluster_size();
  for (uint64_t c = first; c < first + count; ++c) {
    auto data = MakeData(c % 3 ? DataKind::kText : DataKind::kMixed, cs, seed + c);
    Status s = testing::WriteCluster(image, compressor.get(), c * cs, data);
    ASSERT_TRUE(s.ok()) << s.ToString();
    raw->Write(c * cs, data);
  }
}

TEST(ImageLifecycleTest, ReopenAndAppendStaysClean) {
  TempDir dir;
  const std::string path = dir.File("a.qcow2");
  CreateOptions options;
  options.virtual_size = 40 * 65536;
  options.compression = Compression::kZstd;
  RawTwin raw(dir.File("a.raw"), options.virtual_size);
  {
    auto image = CreateOrDie(path, options);
    ASSERT_TRUE(image);
    WriteClusters(image.get(), &raw, 0, 10, 1);
    ASSERT_TRUE(image->Close().ok());
  }
  ExpectCleanAndEqual(path, raw);
  for (int round = 0; round < 2; ++round) {
    auto image = OpenOrDie(path, true);
    ASSERT_TRUE(image);
    EXPECT_TRUE(image->Info().dirty);
    WriteClusters(image.get(), &raw, 10 + round * 10, 10, 100 + round);
    WriteClusters(image.get(), &raw, 2 + round, 3, 200 + round);  // overwrite old ones
    Status s = image->Close();
    ASSERT_TRUE(s.ok()) << s.ToString();
    ExpectCleanAndEqual(path, raw);
  }
  EXPECT_EQ(HeaderField64(path, kIncompatibleOffset) & format::kIncompatDirty, 0u);
}

TEST(ImageLifecycleTest, CloseIncompleteLeavesDirtyBitAndImageConsistent) {
  TempDir dir;
  const std::string path = dir.File("i.qcow2");
  CreateOptions options;
  options.virtual_size = 16 * 65536;
  RawTwin raw(dir.File("i.raw"), options.virtual_size);
  auto image = CreateOrDie(path, options);
  ASSERT_TRUE(image);
  EXPECT_NE(HeaderField64(path, kIncompatibleOffset) & format::kIncompatDirty, 0u);
  WriteClusters(image.get(), &raw, 0, 8, 7);
  ASSERT_TRUE(image->CloseIncomplete().ok());
  EXPECT_TRUE(image->Close().ok());  // idempotent after close
  EXPECT_NE(HeaderField64(path, kIncompatibleOffset) & format::kIncompatDirty, 0u);
  auto info = RunCommand("qemu-img info --output=json " + ShellQuote(path));
  EXPECT_NE(info.output.find("\"dirty-flag\": true"), std::string::npos) << info.output;
  ExpectCleanAndEqual(path, raw, /*incomplete=*/true);
  // Reopen, finish, close: clean.
  auto reopened = OpenOrDie(path, true);
  ASSERT_TRUE(reopened);
  WriteClusters(reopened.get(), &raw, 8, 8, 9);
  ASSERT_TRUE(reopened->Close().ok());
  EXPECT_EQ(HeaderField64(path, kIncompatibleOffset) & format::kIncompatDirty, 0u);
  ExpectCleanAndEqual(path, raw);
}

TEST(ImageLifecycleTest, RefcountTableGrows) {
  TempDir dir;
  const std::string path = dir.File("g.qcow2");
  CreateOptions options;
  options.virtual_size = 16 * 512;
  options.cluster_size = 512;
  options.refcount_bits = 64;  // 64 clusters per refcount block
  RawTwin raw(dir.File("g.raw"), options.virtual_size);
  IoOptions io;
  io.metadata_cache_bytes = 1;
  auto image = CreateOrDie(path, options, io);
  ASSERT_TRUE(image);
  const uint64_t table_before = HeaderField64(path, kRefcountTableOffset);
  // Every rewrite of a compressed cluster allocates fresh bytes: thousands of host
  // clusters, far beyond what the initial table covers.
  for (int round = 0; round < 1500; ++round) {
    WriteClusters(image.get(), &raw, 0, 16, static_cast<uint64_t>(round) * 16);
  }
  ASSERT_TRUE(image->Close().ok());
  EXPECT_NE(HeaderField64(path, kRefcountTableOffset), table_before)
      << RunCommand("ls -l " + ShellQuote(path) + "; qemu-img check " + ShellQuote(path)).output;
  ExpectCleanAndEqual(path, raw);
}

TEST(ImageLifecycleTest, TinyMetadataCacheManyL2Tables) {
  TempDir dir;
  const std::string path = dir.File("m.qcow2");
  CreateOptions options;
  options.virtual_size = 4096 * 512 + 100;
  options.cluster_size = 512;
  options.refcount_bits = 16;
  RawTwin raw(dir.File("m.raw"), options.virtual_size);
  IoOptions io;
  io.metadata_cache_bytes = 1;
  auto image = CreateOrDie(path, options, io);
  ASSERT_TRUE(image);
  auto compressor = NewCompressor(image->compression());
  for (uint64_t c = 0; c < 4096; c += 3) {
    auto data = MakeData(c % 5 ? DataKind::kText : DataKind::kRandom, 512, c);
    ASSERT_TRUE(testing::WriteCluster(image.get(), compressor.get(), c * 512, data).ok());
    raw.Write(c * 512, data);
  }
  ASSERT_TRUE(image->WriteZeroes(100 * 512, 300 * 512).ok());
  raw.Zero(100 * 512, 300 * 512);
  ASSERT_TRUE(image->Discard(1000 * 512, 500 * 512).ok());
  raw.Zero(1000 * 512, 500 * 512);
  auto map = image->Map(100 * 512, 300 * 512);
  ASSERT_TRUE(map.ok());
  ASSERT_EQ(map->size(), 1u);
  EXPECT_EQ((*map)[0].kind, MapExtent::Kind::kZero);
  std::vector<uint8_t> back(options.virtual_size);
  ASSERT_TRUE(image->Read(0, back).ok());
  EXPECT_TRUE(back == raw.data());
  ASSERT_TRUE(image->Close().ok());
  ExpectCleanAndEqual(path, raw);
}

TEST(ImageLifecycleTest, SparseSixGibWithDataAtBothEnds) {
  TempDir dir;
  const std::string path = dir.File("s.qcow2");
  const std::string raw_path = dir.File("s.raw");
  CreateOptions options;
  options.virtual_size = 6ull << 30;
  auto image = CreateOrDie(path, options);
  ASSERT_TRUE(image);
  auto head = MakeData(DataKind::kText, 3 * 65536, 1);
  auto tail = MakeData(DataKind::kMixed, 65536, 2);
  auto compressor = NewCompressor(image->compression());
  for (int i = 0; i < 3; ++i) {
    std::vector<uint8_t> cluster(head.begin() + i * 65536, head.begin() + (i + 1) * 65536);
    ASSERT_TRUE(testing::WriteCluster(image.get(), compressor.get(), i * 65536ull, cluster).ok());
  }
  ASSERT_TRUE(image->Write(options.virtual_size - 65536, tail).ok());
  ASSERT_TRUE(image->Close().ok());
  {
    int fd = ::open(raw_path.c_str(), O_CREAT | O_WRONLY | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(options.virtual_size)), 0);
    ASSERT_EQ(::pwrite(fd, head.data(), head.size(), 0), static_cast<ssize_t>(head.size()));
    ASSERT_EQ(
        ::pwrite(fd, tail.data(), tail.size(), static_cast<off_t>(options.virtual_size - 65536)),
        static_cast<ssize_t>(tail.size()));
    ::close(fd);
  }
  auto check = QemuImgCheck(path);
  EXPECT_EQ(check.exit_code, 0) << check.output;
  auto compare = zqcow::testing::QemuImgCompare(raw_path, "raw", path, "qcow2");
  EXPECT_EQ(compare.exit_code, 0) << compare.output;
}

uint64_t RssBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

TEST(ImageLifecycleTest, OneTebibyteImageStaysSmallInMemory) {
  TempDir dir;
  const std::string path = dir.File("t.qcow2");
  CreateOptions options;
  options.virtual_size = 1ull << 40;
  const uint64_t rss_before = RssBytes();
  auto image = CreateOrDie(path, options);
  ASSERT_TRUE(image);
  auto compressor = NewCompressor(image->compression());
  auto data = MakeData(DataKind::kText, 65536, 5);
  // One cluster in every 4 GiB: a thousand L2 tables and their refcounts.
  for (uint64_t offset = 0; offset < options.virtual_size; offset += 4ull << 30) {
    ASSERT_TRUE(testing::WriteCluster(image.get(), compressor.get(), offset, data).ok());
  }
  std::vector<uint8_t> back(65536);
  ASSERT_TRUE(image->Read(options.virtual_size - (4ull << 30), back).ok());
  EXPECT_TRUE(back == data);
  auto map = image->Map(0, options.virtual_size);
  ASSERT_TRUE(map.ok());
  EXPECT_EQ(map->size(), 2 * 256u);
  if (!zqcow::testing::kSanitizerBuild) {
    EXPECT_LT(RssBytes() - std::min(RssBytes(), rss_before), 64ull << 20);
  }
  ASSERT_TRUE(image->Close().ok());
  auto check = QemuImgCheck(path);
  EXPECT_EQ(check.exit_code, 0) << check.output;
}

TEST(ImageLifecycleTest, FailedWriteIsStickyAndKeepsDirtyBit) {
  TempDir dir;
  const std::string path = dir.File("f.qcow2");
  auto controller = std::make_shared<io::FaultController>();
  CreateOptions options;
  options.virtual_size = 16 * 65536;
  auto image = testing::CreateFaultyImage(path, options, IoOptions(), controller);
  ASSERT_NE(image, nullptr);
  controller->FailNth(io::FaultController::Op::kWrite, 1, ENOSPC);
  auto data = MakeData(DataKind::kRandom, 65536, 3);
  Status s = image->Write(0, data);
  EXPECT_TRUE(s.IsNoSpace()) << s.ToString();
  EXPECT_NE(s.message().find(path), std::string::npos) << s.message();
  controller->FailNth(io::FaultController::Op::kWrite, 0, 0);
  EXPECT_FALSE(image->Write(65536, data).ok());
  EXPECT_FALSE(image->Flush().ok());
  EXPECT_FALSE(image->Close().ok());
  EXPECT_NE(HeaderField64(path, kIncompatibleOffset) & format::kIncompatDirty, 0u);
  auto check = QemuImgCheck(path);
  EXPECT_NE(check.exit_code, 2) << check.output;  // leaks at most, never corruption
}

TEST(ImageLifecycleTest, MalformedImagesAreRefusedWithClearErrors) {
  TempDir dir;
  OpenOptions options;
  // Not a qcow2 file.
  const std::string junk = dir.File("junk.qcow2");
  zqcow::testing::WriteWholeFile(junk, std::vector<uint8_t>(4096, 0x41));
  auto opened = Image::Open(junk, options);
  ASSERT_FALSE(opened.ok());
  EXPECT_NE(opened.status().message().find(junk), std::string::npos) << opened.status().message();
  EXPECT_EQ(opened.status().message().find('\n'), std::string::npos);
  // Missing file.
  opened = Image::Open(dir.File("missing.qcow2"), options);
  EXPECT_TRUE(opened.status().IsNotFound()) << opened.status().ToString();
  // Backing file missing: opened writable.
  const std::string base = dir.File("base.qcow2");
  const std::string overlay = dir.File("overlay.qcow2");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 " + ShellQuote(base) + " 1M").exit_code, 0);
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 -F qcow2 -b " + ShellQuote(base) + " " +
                       ShellQuote(overlay))
                .exit_code,
            0);
  // Read through (backing_test.cc) and written (overlay_test.cc), but never without its
  // backing file.
  ASSERT_EQ(rename(base.c_str(), (base + ".away").c_str()), 0);
  OpenOptions writable = options;
  writable.writable = true;
  opened = Image::Open(overlay, writable);
  ASSERT_FALSE(opened.ok());
  EXPECT_TRUE(opened.status().IsNotFound()) << opened.status().ToString();
  EXPECT_NE(opened.status().message().find("backing file"), std::string::npos)
      << opened.status().message();
  ASSERT_EQ(rename((base + ".away").c_str(), base.c_str()), 0);
  // L1 table pointing past the end of the file.
  const std::string bad_l1 = dir.File("badl1.qcow2");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 " + ShellQuote(bad_l1) + " 1G").exit_code, 0);
  auto bytes = ReadWholeFile(bad_l1);
  format::StoreBE64(bytes.data() + 40, 1ull << 40);
  zqcow::testing::WriteWholeFile(bad_l1, bytes);
  opened = Image::Open(bad_l1, options);
  ASSERT_FALSE(opened.ok());
  EXPECT_NE(opened.status().message().find(bad_l1), std::string::npos) << opened.status().message();
  // Existing file without overwrite.
  CreateOptions create;
  create.virtual_size = 65536;
  auto created = Image::Create(base, create);
  EXPECT_EQ(created.status().code(), Status::Code::kAlreadyExists) << created.status().ToString();
  EXPECT_EQ(RunCommand("qemu-img check " + ShellQuote(base)).exit_code, 0);  // untouched
}

}  // namespace
}  // namespace zqcow::qcow2

namespace zqcow::qcow2 {
namespace {

// Regression: the L1 size computation overflowed for sizes within one L1 entry's span of
// 2^64, creating an image with l1_size 0 that nothing could write or open.
TEST(ImageLifecycleTest, VirtualSizesNear2To64AreRefused) {
  TempDir dir;
  for (uint64_t size : {~uint64_t{0} - 4095, uint64_t{1} << 63}) {
    CreateOptions options;
    options.virtual_size = size;
    auto created = Image::Create(dir.File("huge.qcow2"), options);
    ASSERT_FALSE(created.ok()) << size;
    EXPECT_EQ(created.status().code(), Status::Code::kInvalidArgument);
    EXPECT_NE(created.status().message().find("huge.qcow2"), std::string::npos);
  }
  EXPECT_EQ(format::Geometry{16}.l1_size_for(~uint64_t{0}), uint64_t{1} << 35);
}

}  // namespace
}  // namespace zqcow::qcow2
