// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The qemu-img compatibility table: each row is one command line, run through both
// `qemu-img` and `zqcow` on the same small images; the exit codes must match, and so must
// the results (`qemu-img compare` of the two outputs plus the header fields qemu-img info
// shows, or the printed text). Options zqcow does not support each have a row asserting that
// zqcow refuses them with an error line naming the option. Other subcommands' rows may live
// in their own files beside this one.

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "testing/test_util.h"

namespace zqcow {
namespace {

using testing::CommandResult;
using testing::DataKind;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;

constexpr uint64_t kImageSize = 4ull << 20;
constexpr uint64_t kCluster = 65536;

// What a row compares besides the exit codes.
enum class Result {
  kExitOnly,
  kImages,      // the two outputs: qemu-img compare, and the info fields below
  kText,        // the printed output, exactly
  kMeasureJson  // measure's "required" and "fully-allocated"
};

struct Row {
  std::string args;  // after the program name; {raw} {qcow2} {snap} {bad} {out} {dir}
  Result result;
};

struct Unsupported {
  std::string args;     // after "zqcow"
  std::string names;    // what the error line must contain
};

uint64_t LoadBE64(const std::vector<uint8_t>& bytes, uint64_t offset) {
  uint64_t value = 0;
  for (int i = 0; i < 8; ++i) value = (value << 8) | bytes.at(offset + i);
  return value;
}

// Overwrites the compressed stream of guest cluster `index` of a 64 KiB-cluster qcow2 image
// whose first L2 table maps it, so that reading it fails (inflate error, EIO in QEMU).
void CorruptCompressedCluster(const std::string& path, uint64_t index) {
  std::vector<uint8_t> bytes = testing::ReadWholeFile(path);
  const uint64_t l1 = LoadBE64(bytes, 40);
  const uint64_t l2 = LoadBE64(bytes, l1) & 0x00fffffffffffe00ull;
  const uint64_t entry = LoadBE64(bytes, l2 + 8 * index);
  ASSERT_NE(entry & (1ull << 62), 0u) << "cluster " << index << " is not compressed";
  const uint64_t offset = entry & ((1ull << 54) - 1);
  for (uint64_t i = 4; i < 204; ++i) bytes.at(offset + i) = 0xff;
  testing::WriteWholeFile(path, bytes);
}

class CliCompatTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(testing::HaveQemu());
    dir_ = new TempDir();
    testing::WriteRawImage(File("raw.img"), kImageSize, DataKind::kMixed, 16);
    Qemu("convert -O qcow2 " + Q("raw.img") + " " + Q("src.qcow2"));
    // Two internal snapshots of different sizes, then more writes to the active state.
    Qemu("create -f qcow2 " + Q("snap.qcow2") + " 2M");
    Io("write -P 0x11 0 1M", "snap.qcow2");
    Qemu("snapshot -c snapA " + Q("snap.qcow2"));
    Io("write -P 0x22 512k 1M", "snap.qcow2");
    Qemu("resize " + Q("snap.qcow2") + " 4M");
    Qemu("snapshot -c snapB " + Q("snap.qcow2"));
    Io("write -P 0x33 3M 64k", "snap.qcow2");
    // A compressed image with one unreadable cluster.
    Qemu("convert -c -O qcow2 " + Q("raw.img") + " " + Q("bad.qcow2"));
    CorruptCompressedCluster(File("bad.qcow2"), FirstCompressedCluster());
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }

  static std::string File(const std::string& name) { return dir_->File(name); }
  static std::string Q(const std::string& name) { return ShellQuote(File(name)); }
  static void Qemu(const std::string& args) {
    CommandResult r = RunCommand("qemu-img " + args);
    ASSERT_EQ(r.exit_code, 0) << args << "\n" << r.output;
  }
  static void Io(const std::string& command, const std::string& image) {
    CommandResult r = RunCommand("qemu-io -c " + ShellQuote(command) + " " + Q(image));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  // A guest cluster of raw.img that qemu-img stored compressed (kMixed has some that are
  // zero or incompressible).
  static uint64_t FirstCompressedCluster() {
    CommandResult r = RunCommand("qemu-img map --output=json " + Q("bad.qcow2"));
    nlohmann::json map = nlohmann::json::parse(r.output);
    for (const auto& extent : map) {
      if (extent["data"].get<bool>() && !extent.contains("offset")) {
        return extent["start"].get<uint64_t>() / kCluster;
      }
    }
    ADD_FAILURE() << "no compressed cluster in " << r.output;
    return 0;
  }

  static std::string Expand(std::string args, const std::string& out) {
    auto replace = [&args](const std::string& key, const std::string& value) {
      for (size_t at; (at = args.find(key)) != std::string::npos;) {
        args.replace(at, key.size(), value);
      }
    };
    replace("{raw}", Q("raw.img"));
    replace("{qcow2}", Q("src.qcow2"));
    replace("{snap}", Q("snap.qcow2"));
    replace("{bad}", Q("bad.qcow2"));
    replace("{out}", ShellQuote(out));
    replace("{dir}", ShellQuote(dir_->path()));
    return args;
  }

  static nlohmann::json InfoFields(const std::string& image) {
    CommandResult r = RunCommand("qemu-img info --output=json " + ShellQuote(image));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    nlohmann::json info = nlohmann::json::parse(r.output);
    nlohmann::json data = info["format-specific"]["data"];
    return {{"virtual-size", info["virtual-size"]},
            {"cluster-size", info["cluster-size"]},
            {"compat", data["compat"]},
            {"compression-type", data["compression-type"]},
            {"refcount-bits", data["refcount-bits"]},
            {"backing-filename", info.value("backing-filename", "")}};
  }

  void RunRow(const Row& row) {
    SCOPED_TRACE(row.args);
    const std::string q_out = File("q.out");
    const std::string z_out = File("z.out");
    // A failed zqcow row leaves its partial image (for --resume); the next row starts anew.
    for (const std::string& path : {q_out, z_out, z_out + ".zqcow-partial",
                                    z_out + ".zqcow-partial.info"}) {
      unlink(path.c_str());
    }
    CommandResult q = RunCommand("qemu-img " + Expand(row.args, q_out) + " 2>/dev/null");
    CommandResult z = RunCommand(testing::ZqcowBinary() + " " + Expand(row.args, z_out));
    ASSERT_EQ(z.exit_code, q.exit_code) << "zqcow said: " << z.output;
    if (q.exit_code != 0) {
      EXPECT_NE(z.output.find("zqcow: "), std::string::npos) << z.output;
      return;
    }
    switch (row.result) {
      case Result::kExitOnly:
        break;
      case Result::kImages: {
        CommandResult same = RunCommand("qemu-img compare " + ShellQuote(q_out) + " " +
                                        ShellQuote(z_out));
        EXPECT_EQ(same.exit_code, 0) << same.output;
        EXPECT_EQ(testing::QemuImgCheck(z_out).exit_code, 0);
        EXPECT_EQ(InfoFields(z_out), InfoFields(q_out));
        break;
      }
      case Result::kText:
        EXPECT_EQ(z.output, q.output);
        break;
      case Result::kMeasureJson: {
        nlohmann::json qj = nlohmann::json::parse(q.output);
        nlohmann::json zj = nlohmann::json::parse(z.output);
        EXPECT_EQ(zj["required"], qj["required"]);
        EXPECT_EQ(zj["fully-allocated"], qj["fully-allocated"]);
        break;
      }
    }
  }

  static TempDir* dir_;
};

TempDir* CliCompatTest::dir_ = nullptr;

TEST_F(CliCompatTest, ConvertRowsMatchQemuImg) {
  const std::vector<Row> rows = {
      {"convert -c -O qcow2 {raw} {out}", Result::kImages},
      {"convert -O qcow2 {raw} {out}", Result::kImages},
      {"convert -c -O qcow2 {qcow2} {out}", Result::kImages},
      {"convert -c -O qcow2 -f raw {raw} {out}", Result::kImages},
      {"convert -c -O qcow2 -f qcow2 {raw} {out}", Result::kExitOnly},
      {"convert -c -O qcow2 -o compression_type=zstd {raw} {out}", Result::kImages},
      {"convert -c -O qcow2 -o cluster_size=4k,refcount_bits=1 {raw} {out}", Result::kImages},
      {"convert -c -O qcow2 -o compat=1.1,lazy_refcounts=off,preallocation=off {raw} {out}",
       Result::kImages},
      {"convert -c -O qcow2 -o compat=0.10 {raw} {out}", Result::kImages},
      {"convert -O qcow2 -o compat=0.10 {qcow2} {out}", Result::kImages},
      {"convert -q -c -O qcow2 {raw} {out}", Result::kText},
      {"convert -q -p -c -O qcow2 {raw} {out}", Result::kText},
      {"convert -c -O qcow2 -m 2 -W {qcow2} {out}", Result::kImages},
      {"convert -c -O qcow2 -U {qcow2} {out}", Result::kImages},
      {"convert -c -O qcow2 -t none -T none {qcow2} {out}", Result::kImages},
      {"convert -c -O qcow2 -t writeback -T writeback {raw} {out}", Result::kImages},
      {"convert -c -O qcow2 -t writethrough -T writethrough {raw} {out}", Result::kImages},
      {"convert -c -O qcow2 -t directsync -T directsync {raw} {out}", Result::kImages},
      {"convert -c -O qcow2 -t unsafe -T unsafe {raw} {out}", Result::kImages},
      {"convert -c -O qcow2 -t bogus {raw} {out}", Result::kExitOnly},
      {"convert -c -O qcow2 -r 64M {qcow2} {out}", Result::kImages},
      {"convert -c -O qcow2 -B {qcow2} -F qcow2 {raw} {out}", Result::kImages},
      {"convert -c -O qcow2 -l snapA {snap} {out}", Result::kImages},
      {"convert -c -O qcow2 -l 2 {snap} {out}", Result::kImages},
      {"convert -c -O qcow2 -l snapshot.name=snapB {snap} {out}", Result::kImages},
      {"convert -c -O qcow2 -l snapshot.id=1 {snap} {out}", Result::kImages},
      {"convert -c -O qcow2 -l snapshot.id=1,snapshot.name=snapA {snap} {out}", Result::kImages},
      {"convert -c -O qcow2 -l snapshot.id=1,snapshot.name=snapB {snap} {out}",
       Result::kExitOnly},
      {"convert -c -O qcow2 -l nosuch {snap} {out}", Result::kExitOnly},
      {"convert -c -O qcow2 -l snapA {raw} {out}", Result::kExitOnly},
      {"convert -c -O qcow2 {bad} {out}", Result::kExitOnly},
      {"convert -c -O qcow2 --salvage {bad} {out}", Result::kImages},
      {"convert -c -O qcow2 {dir}/missing.img {out}", Result::kExitOnly},
      {"convert -c -O qcow2 {raw} {raw}", Result::kExitOnly},
  };
  for (const Row& row : rows) RunRow(row);
}

TEST_F(CliCompatTest, MeasureRowsMatchQemuImg) {
  const std::vector<Row> rows = {
      {"measure -O qcow2 {raw}", Result::kText},
      {"measure -O qcow2 -o cluster_size=4k,refcount_bits=1 {raw}", Result::kText},
      {"measure -O qcow2 --size 1G", Result::kText},
      {"measure -O qcow2 --output=json {qcow2}", Result::kMeasureJson},
      {"measure -O qcow2 --output=json -l snapA {snap}", Result::kMeasureJson},
      {"measure -O qcow2 {dir}/missing.img", Result::kExitOnly},
  };
  for (const Row& row : rows) RunRow(row);
}

// A dangling symbolic link as DST: both create the file it names.
TEST_F(CliCompatTest, DanglingSymlinkTargetCreatesTheFileItNames) {
  for (const std::string program : {"qemu-img", "zqcow"}) {
    const std::string link = File(program + ".link");
    const std::string named = File(program + ".named");
    ASSERT_EQ(symlink(named.c_str(), link.c_str()), 0);
    const std::string binary = program == "zqcow" ? testing::ZqcowBinary() : program;
    CommandResult r = RunCommand(binary + " convert -c -O qcow2 " + Q("raw.img") + " " +
                                 ShellQuote(link));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(RunCommand("test -L " + ShellQuote(link)).exit_code, 0) << program;
    EXPECT_EQ(testing::QemuImgCompare(named, "qcow2", File("raw.img"), "raw").exit_code, 0);
  }
}

TEST_F(CliCompatTest, SalvageReportsWhatCouldNotBeRead) {
  const std::string out = File("salvaged.qcow2");
  CommandResult r = RunCommand(testing::ZqcowBinary() + " convert -c --salvage --output json " +
                               Q("bad.qcow2") + " " + ShellQuote(out) + " 2>" + Q("err.txt"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  nlohmann::json summary = nlohmann::json::parse(r.output);
  EXPECT_EQ(summary["read_errors"], 1);
  EXPECT_EQ(summary["unreadable_bytes"], kCluster);
  const std::vector<uint8_t> err = testing::ReadWholeFile(File("err.txt"));
  EXPECT_NE(std::string(err.begin(), err.end()).find("1 read error(s)"), std::string::npos);
}

// Every qemu-img option zqcow does not support is refused by name (never ignored, never a
// parse error about something else).
TEST_F(CliCompatTest, UnsupportedOptionsAreNamed) {
  const std::vector<Unsupported> rows = {
      {"convert -C -c {raw} {out}", "-C"},
      {"convert --bitmaps -c {raw} {out}", "--bitmaps"},
      {"convert --skip-broken-bitmaps -c {raw} {out}", "--skip-broken-bitmaps"},
      {"convert --image-opts -c {raw} {out}", "--image-opts"},
      {"convert --target-image-opts -c {raw} {out}", "--target-image-opts"},
      {"convert --object secret,id=s0,data=x -c {raw} {out}", "--object"},
      {"convert -c -O vmdk {raw} {out}", "-O"},
      {"convert -c -o encrypt.format=luks {raw} {out}", "encrypt.format"},
      {"convert -c -o data_file=x.img {raw} {out}", "data_file"},
      {"convert -c -o lazy_refcounts=on {raw} {out}", "lazy_refcounts"},
      {"convert -c -o preallocation=full {raw} {out}", "preallocation"},
      {"convert -c -o extended_l2=on {raw} {out}", "extended_l2"},
      {"convert -c -o compat=0.10,compression_type=zstd {raw} {out}", "compat=0.10"},
      {"convert -c -t {raw} {out}", "-t"},
      {"convert -c -r fast {raw} {out}", "-r"},
      {"measure -O raw {raw}", "-O"},
      {"measure --image-opts {raw}", "--image-opts"},
  };
  for (const Unsupported& row : rows) {
    const std::string out = File("unsupported.out");
    CommandResult r = RunCommand(testing::ZqcowBinary() + " " + Expand(row.args, out));
    EXPECT_NE(r.exit_code, 0) << row.args;
    EXPECT_NE(r.output.find(row.names), std::string::npos) << row.args << ": " << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
    EXPECT_NE(access(out.c_str(), F_OK), 0) << row.args << " created the target";
  }
}

}  // namespace
}  // namespace zqcow
