// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Writable overlays: Image::Create with a backing file names it in the header (with the
// backing format extension) the way qemu-img info reads it; every write path keeps the
// backing data where the guest did not write and hides it where the guest wrote or zeroed:
// partial writes copy the rest of the cluster from the backing file, WriteZeroes and
// Discard make zero clusters (even where the overlay has no L2 table yet), and an overlay
// larger than its backing file reads zeros beyond the backing file's end. qemu-img compare
// (which reads through the chain) against a raw twin is the judge.

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qcow2/image_test_util.h"
#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow::qcow2 {
namespace {

using testing::ExpectCleanAndEqual;
using testing::ImageOptions;
using testing::RawTwin;
using zqcow::testing::MakeData;
using zqcow::testing::RunCommand;
using zqcow::testing::ShellQuote;
using zqcow::testing::TempDir;

// A base image of `size` bytes of random data written by zqcow; returns its contents.
std::vector<uint8_t> MakeBase(const std::string& path, uint64_t size, uint32_t cluster_size) {
  auto created = Image::Create(path, ImageOptions(size, cluster_size, Compression::kZlib));
  EXPECT_TRUE(created.ok()) << created.status().ToString();
  if (!created.ok()) return {};
  std::vector<uint8_t> data = MakeData(zqcow::testing::DataKind::kRandom, size, 7);
  EXPECT_TRUE((*created)->Write(0, data).ok());
  EXPECT_TRUE((*created)->Close().ok());
  return data;
}

std::unique_ptr<Image> CreateOverlay(const std::string& path, uint64_t size, uint32_t cluster_size,
                                     const std::string& backing) {
  CreateOptions options = ImageOptions(size, cluster_size, Compression::kZlib);
  options.backing_file = backing;
  auto created = Image::Create(path, options);
  EXPECT_TRUE(created.ok()) << created.status().ToString();
  return created.ok() ? std::move(created).value() : nullptr;
}

TEST(OverlayTest, CreateNamesTheBackingFileAsGivenAndReadsThroughIt) {
  TempDir dir;
  constexpr uint32_t kCluster = 65536;
  constexpr uint64_t kBaseSize = 3 * kCluster + 1024;  // QEMU sees sizes in whole sectors
  const std::vector<uint8_t> base = MakeBase(dir.File("base.qcow2"), kBaseSize, kCluster);
  // Relative to the overlay's directory, as QEMU resolves it.
  auto overlay = CreateOverlay(dir.File("top.qcow2"), kBaseSize + 5120, kCluster, "base.qcow2");
  ASSERT_NE(overlay, nullptr);
  std::vector<uint8_t> read(kBaseSize + 5120, 0xee);
  ASSERT_TRUE(overlay->Read(0, read).ok());
  EXPECT_TRUE(std::equal(base.begin(), base.end(), read.begin()));
  EXPECT_TRUE(std::all_of(read.begin() + kBaseSize, read.end(), [](uint8_t b) { return b == 0; }));
  EXPECT_EQ(overlay->Info().backing_file, "base.qcow2");
  ASSERT_TRUE(overlay->Close().ok());

  auto info = RunCommand("qemu-img info --output=json " + ShellQuote(dir.File("top.qcow2")));
  ASSERT_EQ(info.exit_code, 0) << info.output;
  auto json = nlohmann::json::parse(info.output);
  EXPECT_EQ(json["backing-filename"], "base.qcow2");
  EXPECT_EQ(json["backing-filename-format"], "qcow2");
  auto own = ReadImageInfo(dir.File("top.qcow2"));
  ASSERT_TRUE(own.ok()) << own.status().ToString();
  EXPECT_EQ(own->backing_file, "base.qcow2");
  EXPECT_EQ(own->backing_format, "qcow2");
  EXPECT_EQ(zqcow::testing::QemuImgCheck(dir.File("top.qcow2")).exit_code, 0);
  RawTwin twin(dir.File("twin.raw"), kBaseSize + 5120);
  twin.Write(0, base);
  ExpectCleanAndEqual(dir.File("top.qcow2"), twin);
}

class OverlayWriteTest : public ::testing::TestWithParam<uint32_t> {};

// Every write path on an overlay, checked against a raw twin through qemu-img compare.
TEST_P(OverlayWriteTest, WritesKeepOrHideTheBackingDataExactlyWhereTheGuestSays) {
  TempDir dir;
  const uint32_t cluster = GetParam();
  // The backing file spans several L2 tables' worth at 512-byte clusters (64 entries each).
  // Not multiples of the cluster size (whole sectors: QEMU truncates sizes to them).
  const uint64_t base_size = 150 * uint64_t{cluster} + (cluster > 512 ? 1536 : 0);
  const uint64_t size = base_size + 3 * uint64_t{cluster} + (cluster > 512 ? 2560 : 0);
  const std::vector<uint8_t> base = MakeBase(dir.File("base.qcow2"), base_size, cluster);
  auto overlay = CreateOverlay(dir.File("top.qcow2"), size, cluster, dir.File("base.qcow2"));
  ASSERT_NE(overlay, nullptr);
  RawTwin twin(dir.File("twin.raw"), size);
  twin.Write(0, base);
  auto write = [&](uint64_t offset, std::vector<uint8_t> bytes) {
    ASSERT_TRUE(overlay->Write(offset, bytes).ok()) << offset;
    twin.Write(offset, bytes);
  };
  auto zero = [&](uint64_t offset, uint64_t length) {
    ASSERT_TRUE(overlay->WriteZeroes(offset, length).ok()) << offset;
    twin.Zero(offset, length);
  };
  // Copy-on-write: a few bytes inside a backing cluster keep the rest of it.
  write(cluster + 100, {1, 2, 3, 4, 5});
  // A single byte at the very start of another one.
  write(5 * uint64_t{cluster}, {0xab});
  // Zeros over backing data: whole clusters (no L2 table in the overlay yet for the far
  // ones), a partial cluster, and whole + partial together.
  zero(10 * uint64_t{cluster}, 2 * uint64_t{cluster});
  zero(140 * uint64_t{cluster}, 3 * uint64_t{cluster});
  zero(20 * uint64_t{cluster} + 10, 50);
  zero(30 * uint64_t{cluster} + 7, 2 * uint64_t{cluster});
  // Discard over backing data reads as zeros too (a discard must never expose it).
  ASSERT_TRUE(overlay->Discard(40 * uint64_t{cluster}, cluster).ok());
  twin.Zero(40 * uint64_t{cluster}, cluster);
  // A whole compressed cluster replaces backing data.
  auto compressor = testing::NewCompressor(Compression::kZlib);
  std::vector<uint8_t> text = MakeData(zqcow::testing::DataKind::kText, cluster, 3);
  ASSERT_TRUE(
      testing::WriteCluster(overlay.get(), compressor.get(), 50 * uint64_t{cluster}, text).ok());
  twin.Write(50 * uint64_t{cluster}, text);
  // Across the backing file's end (its last partial cluster) and beyond it.
  write(base_size - 10, std::vector<uint8_t>(30, 0x77));
  write(size - 5, {9, 9, 9, 9, 9});
  // Zeros over the last (partial) cluster of the backing file and beyond.
  zero(149 * uint64_t{cluster}, 2 * uint64_t{cluster} + 50);
  // Reads agree before and after reopening it writable.
  std::vector<uint8_t> read(size);
  ASSERT_TRUE(overlay->Read(0, read).ok());
  EXPECT_TRUE(read == twin.data());
  ASSERT_TRUE(overlay->Close().ok());
  ExpectCleanAndEqual(dir.File("top.qcow2"), twin);

  OpenOptions writable;
  writable.writable = true;
  auto reopened = Image::Open(dir.File("top.qcow2"), writable);
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  overlay = std::move(reopened).value();
  write(60 * uint64_t{cluster} + 3, {4, 4});
  zero(70 * uint64_t{cluster}, cluster);
  ASSERT_TRUE(overlay->Close().ok());
  ExpectCleanAndEqual(dir.File("top.qcow2"), twin);
}

INSTANTIATE_TEST_SUITE_P(ClusterSizes, OverlayWriteTest, ::testing::Values(512u, 65536u));

TEST(OverlayTest, MissingBackingFileFailsTheCreateAndLeavesNoFile) {
  TempDir dir;
  CreateOptions options = ImageOptions(1 << 20, 65536, Compression::kZlib);
  options.backing_file = "missing.qcow2";
  auto again = Image::Create(dir.File("top2.qcow2"), options);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), Status::Code::kNotFound) << again.status().ToString();
  EXPECT_NE(again.status().message().find("missing.qcow2"), std::string::npos);
  struct stat st {};
  EXPECT_NE(stat(dir.File("top2.qcow2").c_str(), &st), 0);
}

// An overlay qemu-img made (raw backing file) opens writable; a partial write copies the
// rest of its cluster from the backing file.
TEST(OverlayTest, QemuOverlayOpensWritableAndCopiesOnWrite) {
  TempDir dir;
  const std::string backing = dir.File("backing.raw");
  const std::string path = dir.File("overlay.qcow2");
  const std::vector<uint8_t> base = MakeData(zqcow::testing::DataKind::kRandom, 1 << 20, 5);
  zqcow::testing::WriteWholeFile(backing, base);
  auto made = RunCommand("qemu-img create -q -f qcow2 -F raw -b " + ShellQuote(backing) + " " +
                         ShellQuote(path));
  ASSERT_EQ(made.exit_code, 0) << made.output;
  OpenOptions writable;
  writable.writable = true;
  auto image = Image::Open(path, writable);
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  RawTwin twin(dir.File("twin.raw"), 1 << 20);
  twin.Write(0, base);
  ASSERT_TRUE((*image)->Write(70000, std::vector<uint8_t>{1, 2, 3}).ok());
  twin.Write(70000, {1, 2, 3});
  ASSERT_TRUE((*image)->WriteZeroes(196608, 65536).ok());
  twin.Zero(196608, 65536);
  ASSERT_TRUE((*image)->Close().ok());
  ExpectCleanAndEqual(path, twin);
}

}  // namespace
}  // namespace zqcow::qcow2
