// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Images of formats zqcow does not read (vmdk, vdi, vhdx, vpc, qed, luks, qcow v1,
// parallels), made by qemu-img from a raw disk: every subcommand that detects a format
// (convert, compare, info, map, check) refuses them with one line naming the format, where
// zqcow once read their container bytes as a raw disk. `-f raw` still reads any file as
// raw. An overlay whose backing file is of such a format is refused too.

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

#include "testing/test_util.h"

namespace zqcow {
namespace {

using testing::CommandResult;
using testing::DataKind;
using testing::ReadWholeFile;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;
using testing::WriteRawImage;
using testing::WriteWholeFile;
using testing::ZqcowBinary;

constexpr uint64_t kDiskSize = 1 << 20;
constexpr int kExitCompareError = 2;

CommandResult Zqcow(const std::string& args) { return RunCommand(ZqcowBinary() + " " + args); }
std::string Q(const std::string& path) { return ShellQuote(path); }

struct Foreign {
  std::string name;    // test name and file name
  std::string format;  // what qemu-img (and zqcow) call it
  std::string create;  // qemu-img convert options making it from the raw disk
};
void PrintTo(const Foreign& f, std::ostream* os) { *os << f.name; }

// LUKS needs a secret; a short PBKDF time keeps the test fast.
const char* const kLuks = "--object secret,id=s0,data=x -O luks -o key-secret=s0,iter-time=10";

std::vector<Foreign> Formats() {
  return {
      {"vmdk_flat", "vmdk", "-O vmdk -o subformat=monolithicFlat"},
      {"vmdk_sparse", "vmdk", "-O vmdk -o subformat=monolithicSparse"},
      {"vmdk_stream", "vmdk", "-O vmdk -o subformat=streamOptimized"},
      {"vdi", "vdi", "-O vdi"},
      {"vhdx", "vhdx", "-O vhdx"},
      {"vpc", "vpc", "-O vpc"},
      {"qed", "qed", "-O qed"},
      {"luks", "luks", kLuks},
      {"qcow1", "qcow", "-O qcow"},
      {"parallels", "parallels", "-O parallels"},
  };
}

class ForeignFormatTest : public ::testing::TestWithParam<Foreign> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu()) << "qemu-img/qemu-io missing: run scripts/setup";
    raw_ = dir_.File("disk.raw");
    WriteRawImage(raw_, kDiskSize, DataKind::kMixed, 7);
    image_ = dir_.File(GetParam().name + ".img");
    auto r = RunCommand("qemu-img convert -f raw " + GetParam().create + " " + Q(raw_) + " " +
                        Q(image_));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    // The control: qemu-img detects the format zqcow must name.
    r = RunCommand("qemu-img info --output=json " + Q(image_));
    ASSERT_NE(r.output.find("\"format\": \"" + GetParam().format + "\""), std::string::npos)
        << r.output;
  }

  // A failure of one line on stderr that names the file and the format.
  void ExpectRefused(const CommandResult& r, const std::string& what) {
    EXPECT_NE(r.exit_code, 0) << what << ": " << r.output;
    EXPECT_NE(r.output.find("image format '" + GetParam().format + "'"), std::string::npos)
        << what << ": " << r.output;
    EXPECT_NE(r.output.find("not supported"), std::string::npos) << what << ": " << r.output;
    EXPECT_NE(r.output.find(image_), std::string::npos) << what << ": " << r.output;
  }

  TempDir dir_;
  std::string raw_;
  std::string image_;
};

TEST_P(ForeignFormatTest, ConvertRefusesAndLeavesNoTarget) {
  const std::string target = dir_.File("out.qcow2");
  ExpectRefused(Zqcow("convert -c " + Q(image_) + " " + Q(target)), "convert");
  EXPECT_FALSE(std::filesystem::exists(target)) << "a target was left behind";
  ExpectRefused(Zqcow("convert -O qcow2 " + Q(image_) + " " + Q(target)), "convert (normal)");
  EXPECT_FALSE(std::filesystem::exists(target));
}

TEST_P(ForeignFormatTest, InfoMapCheckCompareRefuse) {
  ExpectRefused(Zqcow("info " + Q(image_)), "info");
  ExpectRefused(Zqcow("info --output=json " + Q(image_)), "info json");
  ExpectRefused(Zqcow("map " + Q(image_)), "map");
  ExpectRefused(Zqcow("check " + Q(image_)), "check");
  CommandResult r = Zqcow("compare " + Q(image_) + " " + Q(raw_));
  ExpectRefused(r, "compare A");
  EXPECT_EQ(r.exit_code, kExitCompareError) << r.output;
  r = Zqcow("compare " + Q(raw_) + " " + Q(image_));
  ExpectRefused(r, "compare B");
  EXPECT_EQ(r.exit_code, kExitCompareError) << r.output;
}

TEST_P(ForeignFormatTest, RawFormatReadsTheBytesAsTheyAre) {
  const std::string target = dir_.File("bytes.qcow2");
  CommandResult r = Zqcow("convert -c -f raw " + Q(image_) + " " + Q(target));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = testing::QemuImgCompare(image_, "raw", target, "qcow2");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  r = Zqcow("compare -f raw -F qcow2 " + Q(image_) + " " + Q(target));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  r = Zqcow("info -f raw " + Q(image_));
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

INSTANTIATE_TEST_SUITE_P(Formats, ForeignFormatTest, ::testing::ValuesIn(Formats()),
                         [](const ::testing::TestParamInfo<Foreign>& info) {
                           return info.param.name;
                         });

// An overlay reads its unallocated clusters from its backing file: a vmdk backing file read
// as raw would give it the vmdk's container bytes. Without a backing format extension the
// backing file is probed (and refused); with one naming vmdk it is refused at once.
class ForeignBackingTest : public ::testing::TestWithParam<bool> {};

TEST_P(ForeignBackingTest, OverlayOverVmdkIsRefused) {
  const bool with_backing_format = GetParam();
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  const std::string raw = dir.File("disk.raw");
  WriteRawImage(raw, kDiskSize, DataKind::kMixed, 9);
  const std::string base = dir.File("base.vmdk");
  const std::string top = dir.File("top.qcow2");
  auto r = RunCommand("qemu-img convert -f raw -O vmdk -o subformat=monolithicFlat " + Q(raw) +
                      " " + Q(base) + " && qemu-img create -q -f qcow2 -b base.vmdk -F vmdk " +
                      Q(top) + " && qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' " + Q(top));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  if (!with_backing_format) {
    // Turn the backing format extension (0xe2792aca) into a type nobody defines: QEMU
    // ignores it, and so the image has no backing format (as images written before QEMU
    // required one).
    std::vector<uint8_t> bytes = ReadWholeFile(top);
    const uint8_t type[4] = {0xe2, 0x79, 0x2a, 0xca};
    auto found = std::search(bytes.begin() + 104, bytes.begin() + 4096, type, type + 4);
    ASSERT_NE(found, bytes.begin() + 4096);
    found[0] = 0x0f;
    WriteWholeFile(top, bytes);
    r = RunCommand("qemu-img info " + Q(top));
    ASSERT_EQ(r.output.find("backing file format"), std::string::npos) << r.output;
  }
  auto expect_refused = [&](const CommandResult& result, const std::string& what) {
    EXPECT_NE(result.exit_code, 0) << what << ": " << result.output;
    EXPECT_NE(result.output.find("image format 'vmdk' is not supported"), std::string::npos)
        << what << ": " << result.output;
    EXPECT_NE(result.output.find("base.vmdk"), std::string::npos) << what << ": " << result.output;
  };
  const std::string target = dir.File("out.qcow2");
  expect_refused(Zqcow("convert -c " + Q(top) + " " + Q(target)), "convert");
  EXPECT_FALSE(std::filesystem::exists(target));
  expect_refused(Zqcow("compare " + Q(top) + " " + Q(raw)), "compare");
  expect_refused(Zqcow("map " + Q(top)), "map");
}

INSTANTIATE_TEST_SUITE_P(BackingFormat, ForeignBackingTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Named" : "Probed"; });

}  // namespace
}  // namespace zqcow
