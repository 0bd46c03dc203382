// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// End-to-end tests of the zqcow CLI: runs the built binary and lets qemu-img judge.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "testing/test_util.h"
#include "zqcow/convert.h"

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

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kImageSize = 4 * kMiB;
constexpr uint64_t kSeed = 42;
// qcow2 header fields (docs/interop/qcow2.txt).
constexpr size_t kHeaderClusterBitsOffset = 20;
constexpr size_t kHeaderRefcountTableOffset = 48;
constexpr size_t kHeaderIncompatibleFeaturesLastByte = 79;  // bit 0 = dirty
constexpr size_t kHeaderRefcountOrderOffset = 96;
constexpr int kExitSigint = 128 + SIGINT;
constexpr int kExitSigterm = 128 + SIGTERM;

CommandResult Zqcow(const std::string& args) { return RunCommand(ZqcowBinary() + " " + args); }

std::string Q(const std::string& path) { return ShellQuote(path); }

uint64_t ReadBE(const std::vector<uint8_t>& bytes, size_t offset, size_t width) {
  uint64_t value = 0;
  for (size_t i = 0; i < width; ++i) value = (value << 8) | bytes.at(offset + i);
  return value;
}

void WriteBE(std::vector<uint8_t>& bytes, size_t offset, size_t width, uint64_t value) {
  for (size_t i = 0; i < width; ++i) {
    bytes.at(offset + width - 1 - i) = static_cast<uint8_t>(value >> (8 * i));
  }
}

// Byte offset in `image` of the refcount entry of host cluster 0 (the header), and its width.
struct RefcountSlot {
  size_t offset;
  size_t width;
};
RefcountSlot HeaderRefcountSlot(const std::vector<uint8_t>& image) {
  uint32_t refcount_order = static_cast<uint32_t>(ReadBE(image, kHeaderRefcountOrderOffset, 4));
  EXPECT_EQ(refcount_order, 4u) << "the tests edit 16-bit refcounts";
  uint64_t table = ReadBE(image, kHeaderRefcountTableOffset, 8);
  uint64_t block = ReadBE(image, table, 8);
  EXPECT_NE(block, 0u);
  return {static_cast<size_t>(block), 2};
}

// Whether the target's header carries the dirty bit.
bool DirtyBit(const std::string& path) {
  auto bytes = ReadWholeFile(path);
  return bytes.size() > kHeaderIncompatibleFeaturesLastByte &&
         (bytes[kHeaderIncompatibleFeaturesLastByte] & 1) != 0;
}

nlohmann::json ParseJson(const std::string& text) {
  auto parsed = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(parsed.is_discarded()) << "not JSON: " << text;
  return parsed;
}

// `info --output=json` of `image` from zqcow and from qemu-img (null when one failed).
std::pair<nlohmann::json, nlohmann::json> InfoFromBoth(const std::string& image) {
  CommandResult ours = Zqcow("info --output=json " + Q(image));
  EXPECT_EQ(ours.exit_code, 0) << ours.output;
  CommandResult qemu = RunCommand("qemu-img info --output=json " + Q(image));
  EXPECT_EQ(qemu.exit_code, 0) << qemu.output;
  if (ours.exit_code != 0 || qemu.exit_code != 0) return {};
  return {ParseJson(ours.output), ParseJson(qemu.output)};
}

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu()) << "qemu-img and qemu-io are needed (scripts/setup)";
    source_ = dir_.File("source.raw");
    target_ = dir_.File("target.qcow2");
    WriteRawImage(source_, kImageSize, DataKind::kMixed, kSeed);
  }

  // Converts source_ to target_ with `flags`; asserts success.
  void ConvertOk(const std::string& flags) {
    CommandResult r = Zqcow("convert " + flags + " " + Q(source_) + " " + Q(target_));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }

  TempDir dir_;
  std::string source_;
  std::string target_;
};

TEST_F(CliTest, ConvertResultsPassQemuAndZqcowChecks) {
  const std::vector<std::string> variants = {
      "-c",
      "-c -o compression_type=zstd,compression_level=5",
      "-O qcow2",
      "-c -o cluster_size=4k -o refcount_bits=16 -m 1 --in-order",
      "-c -t none -T none -m 2 -W",
      "-c -t none --no-write-cache",
      "-c -t none --write-cache-size 1M",
      "-c --drop-page-cache",
  };
  for (const std::string& flags : variants) {
    SCOPED_TRACE("flags: " + flags);
    ConvertOk("--force " + flags);
    CommandResult check = testing::QemuImgCheck(target_);
    EXPECT_EQ(check.exit_code, 0) << check.output;
    CommandResult compare = testing::QemuImgCompare(source_, "raw", target_, "qcow2");
    EXPECT_EQ(compare.exit_code, 0) << compare.output;
    CommandResult zcheck = Zqcow("check " + Q(target_));
    EXPECT_EQ(zcheck.exit_code, 0) << zcheck.output;
    EXPECT_NE(zcheck.output.find("No errors were found on the image."), std::string::npos)
        << zcheck.output;
    CommandResult zcompare = Zqcow("compare " + Q(source_) + " " + Q(target_));
    EXPECT_EQ(zcompare.exit_code, 0) << zcompare.output;
    EXPECT_NE(zcompare.output.find("Images are identical."), std::string::npos);
  }
}

TEST_F(CliTest, OptionsReachTheImage) {
  ConvertOk("-c -o compression_type=zstd,cluster_size=16k");
  CommandResult qemu = RunCommand("qemu-img info --output=json " + Q(target_));
  ASSERT_EQ(qemu.exit_code, 0) << qemu.output;
  auto info = ParseJson(qemu.output);
  EXPECT_EQ(info["cluster-size"], 16384);
  EXPECT_EQ(info["format-specific"]["data"]["compression-type"], "zstd");
}

TEST_F(CliTest, JsonOutputHasEveryStatistic) {
  CommandResult r = Zqcow("convert -c --output=json " + Q(source_) + " " + Q(target_));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = ParseJson(r.output);
  ASSERT_TRUE(j.is_object());
  for (const char* key :
       {"virtual_size", "bytes_read", "zero_bytes_skipped", "compressed_bytes",
        "clusters_compressed", "clusters_uncompressed", "clusters_zero", "output_file_size",
        "wall_seconds", "cpu_seconds", "throughput_mib_s", "peak_rss_bytes"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  const uint64_t cluster = 65536;
  EXPECT_EQ(j["virtual_size"].get<uint64_t>(), kImageSize);
  EXPECT_LE(j["bytes_read"].get<uint64_t>(), kImageSize);
  EXPECT_GT(j["zero_bytes_skipped"].get<uint64_t>(), 0u);  // kMixed has holes and zeros
  EXPECT_GT(j["clusters_compressed"].get<uint64_t>(), 0u);
  EXPECT_GT(j["clusters_zero"].get<uint64_t>(), 0u);
  EXPECT_EQ(j["clusters_compressed"].get<uint64_t>() + j["clusters_uncompressed"].get<uint64_t>() +
                j["clusters_zero"].get<uint64_t>(),
            kImageSize / cluster);
  EXPECT_GT(j["compressed_bytes"].get<uint64_t>(), 0u);
  EXPECT_LT(j["compressed_bytes"].get<uint64_t>(),
            j["clusters_compressed"].get<uint64_t>() * cluster);
  EXPECT_EQ(j["output_file_size"].get<uint64_t>(), std::filesystem::file_size(target_));
  EXPECT_GT(j["wall_seconds"].get<double>(), 0.0);
  EXPECT_GE(j["cpu_seconds"].get<double>(), 0.0);
  EXPECT_GT(j["throughput_mib_s"].get<double>(), 0.0);
  EXPECT_GT(j["peak_rss_bytes"].get<uint64_t>(), 0u);
}

TEST_F(CliTest, BadOptionsAreRejectedWithoutCreatingTheTarget) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"-o foo=1", "unknown option 'foo'"},
      {"-o compression_type=lz4", "lz4"},
      {"-o cluster_size=3000", "cluster_size"},
      {"-o cluster_size=4M", "cluster_size"},
      {"-o cluster_size", "key=value"},
      {"-o refcount_bits=3", "refcount_bits"},
      {"-o compression_level=x", "compression_level"},
      {"-o compression_level=12", "compression_level"},
      {"-O raw", "raw"},
      {"-f vmdk", "vmdk"},
      {"-t bogus", "bogus"},
      {"--output=xml", "xml"},
      {"-W --in-order", "in-order"},
      {"-t none --drop-page-cache", "drop-page-cache"},
      {"--checkpoint -1", "--checkpoint: '-1' is not a number of seconds"},
      {"--checkpoint nan", "'nan' is not a number of seconds"},
  };
  for (const auto& [flags, expected] : cases) {
    SCOPED_TRACE("flags: " + flags);
    CommandResult r = Zqcow("convert -c " + flags + " " + Q(source_) + " " + Q(target_));
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_EQ(r.output.rfind("zqcow: ", 0), 0u) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
    EXPECT_NE(r.output.find(expected), std::string::npos) << r.output;
    EXPECT_FALSE(std::filesystem::exists(target_));
  }
  CommandResult help = Zqcow("convert -o help");
  EXPECT_EQ(help.exit_code, 0) << help.output;
  EXPECT_NE(help.output.find("compression_type"), std::string::npos);
}

// Found by black-box testing: each of these once hung, lost data or damaged a file.
TEST_F(CliTest, OneClusterWriteCacheWithSeveralWorkersDoesNotHang) {
  // Incompressible clusters are stored through the cache while the allocator's open
  // compressed cluster (the 1-byte tail) holds its only slot: whole clusters must still get
  // in. `timeout` turns a deadlock into a failure instead of a stuck suite.
  const std::string random = dir_.File("random.raw");
  WriteRawImage(random, 8 * kMiB + 1, DataKind::kRandom, 5);
  for (const std::string& flags : {std::string("-m 2 --write-cache-size 64k"),
                                   std::string("-m 4 -t none --write-cache-size 1k"),
                                   std::string("-m 2 -o cluster_size=4k --write-cache-size 4k")}) {
    SCOPED_TRACE(flags);
    CommandResult r = RunCommand("timeout -k 5 120 " + ZqcowBinary() + " convert -c --force " +
                                 flags + " " + Q(random) + " " + Q(target_));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(RunCommand("qemu-img compare -q " + Q(random) + " " + Q(target_)).exit_code, 0);
  }
}

TEST_F(CliTest, PipesAndDevicesAreRefusedAndNeverDeleted) {
  const std::string fifo = dir_.File("fifo");
  ASSERT_EQ(RunCommand("mkfifo " + Q(fifo)).exit_code, 0);
  // As a source (it would block, or read as an empty disk) ...
  CommandResult r = Zqcow("convert -c " + Q(fifo) + " " + Q(target_));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("not a regular file or block device"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(target_));
  EXPECT_EQ(Zqcow("compare /dev/zero " + Q(source_)).exit_code, 2);
  // ... and as a target with --force: refused, and the node is still there.
  r = Zqcow("convert -c --force " + Q(source_) + " " + Q(fifo));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("not a regular file"), std::string::npos) << r.output;
  EXPECT_TRUE(std::filesystem::is_fifo(fifo));
}

TEST_F(CliTest, ForceNeverOverwritesTheSourcesBackingFile) {
  ConvertOk("-c");
  const std::string overlay = dir_.File("overlay.qcow2");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 -F qcow2 -b " + Q(target_) + " " + Q(overlay))
                .exit_code,
            0);
  const std::vector<uint8_t> before = ReadWholeFile(target_);
  CommandResult r = Zqcow("convert -c --force " + Q(overlay) + " " + Q(target_));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("backing file of the source"), std::string::npos) << r.output;
  EXPECT_TRUE(ReadWholeFile(target_) == before);
}

TEST_F(CliTest, ClosedStandardStreamsNeverReachTheTarget) {
  // With stdout and stderr closed, the source got descriptor 1 and the target 2: progress
  // lines overwrote the image's header, and an interrupted conversion left a file that was
  // not even qcow2. zstd level 19 on text is slow enough to interrupt.
  const std::string random = dir_.File("random.raw");
  WriteRawImage(random, 48 * kMiB, DataKind::kText, 6);
  CommandResult r =
      RunCommand("sh -c 'exec " + ZqcowBinary() +
                 " convert -c -p -o compression_type=zstd,compression_level=19 " + Q(random) + " " +
                 Q(target_) + " >&- 2>&-' & pid=$!; sleep 1; kill -INT $pid; wait $pid");
  EXPECT_EQ(r.exit_code, 130) << r.output;
  // Interrupted: the work so far is in the partial image (DST is not there).
  EXPECT_FALSE(std::filesystem::exists(target_));
  const std::string partial = PartialTargetPath(target_);
  const std::vector<uint8_t> head = ReadWholeFile(partial);
  ASSERT_GE(head.size(), 4u);
  EXPECT_EQ(std::string(head.begin(), head.begin() + 3), "QFI") << "the header was overwritten";
  EXPECT_TRUE(DirtyBit(partial));
  EXPECT_EQ(RunCommand("qemu-img check " + Q(partial)).exit_code, 0);
  // Nor was the resume record overwritten: it is read, and tells the level it was made with.
  r = Zqcow("convert -c -o compression_type=zstd,compression_level=1 --resume " + Q(random) + " " +
            Q(target_));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("the interrupted conversion used '19'"), std::string::npos) << r.output;
  // A summary that cannot be written is an error.
  r = Zqcow("info --output=json " + Q(partial) + " >/dev/full");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("standard output"), std::string::npos) << r.output;
  r = Zqcow("bogus");
  EXPECT_NE(r.output.find("unknown subcommand 'bogus'"), std::string::npos) << r.output;
}

TEST_F(CliTest, MissingSourceNamesThePath) {
  std::string missing = dir_.File("does-not-exist.raw");
  CommandResult r = Zqcow("convert -c " + Q(missing) + " " + Q(target_));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_EQ(r.output.rfind("zqcow: ", 0), 0u) << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  EXPECT_NE(r.output.find(missing), std::string::npos) << r.output;
}

TEST_F(CliTest, ExistingTargetIsRefusedUnlessForced) {
  std::vector<uint8_t> old_content = {'k', 'e', 'e', 'p'};
  WriteWholeFile(target_, old_content);
  CommandResult r = Zqcow("convert -c " + Q(source_) + " " + Q(target_));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find(target_), std::string::npos) << r.output;
  EXPECT_EQ(ReadWholeFile(target_), old_content);
  ConvertOk("-c --force");
  CommandResult compare = testing::QemuImgCompare(source_, "raw", target_, "qcow2");
  EXPECT_EQ(compare.exit_code, 0) << compare.output;
}

TEST_F(CliTest, CompareReportsTheFirstDifferingByte) {
  ConvertOk("-c");
  auto data = ReadWholeFile(source_);
  const std::vector<uint64_t> offsets = {0, 1234567, kImageSize - 1};
  for (uint64_t offset : offsets) {
    SCOPED_TRACE("offset " + std::to_string(offset));
    auto changed = data;
    changed[offset] ^= 0x5a;
    std::string other = dir_.File("changed.raw");
    WriteWholeFile(other, changed);
    CommandResult r = Zqcow("compare " + Q(target_) + " " + Q(other));
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find("Content mismatch at offset " + std::to_string(offset) + "!"),
              std::string::npos)
        << r.output;
    CommandResult swapped = Zqcow("compare -f raw -F qcow2 " + Q(other) + " " + Q(target_));
    EXPECT_EQ(swapped.exit_code, 1) << swapped.output;
  }
}

TEST_F(CliTest, CompareFindsADifferenceBeyondTheFirstReads) {
  // All data, several 4 MiB reads long: the difference is in a later read.
  const uint64_t size = 12 * kMiB;
  WriteRawImage(source_, size, DataKind::kText, kSeed);
  ConvertOk("-c");
  CommandResult same = Zqcow("compare " + Q(source_) + " " + Q(target_));
  EXPECT_EQ(same.exit_code, 0) << same.output;
  auto data = ReadWholeFile(source_);
  const uint64_t offset = 9 * kMiB + 123;
  data[offset] ^= 0xff;
  WriteWholeFile(source_, data);
  CommandResult r = Zqcow("compare " + Q(target_) + " " + Q(source_));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("Content mismatch at offset " + std::to_string(offset) + "!"),
            std::string::npos)
      << r.output;
}

TEST_F(CliTest, CompareTreatsTheExtraPartOfALargerImageAsZeros) {
  ConvertOk("-c");
  auto data = ReadWholeFile(source_);
  std::string larger = dir_.File("larger.raw");
  auto extended = data;
  extended.resize(data.size() + kMiB, 0);
  WriteWholeFile(larger, extended);
  CommandResult same = Zqcow("compare " + Q(target_) + " " + Q(larger));
  EXPECT_EQ(same.exit_code, 0) << same.output;
  EXPECT_NE(same.output.find("size mismatch"), std::string::npos) << same.output;

  const uint64_t nonzero_at = data.size() + 4097;
  extended[nonzero_at] = 1;
  WriteWholeFile(larger, extended);
  CommandResult different = Zqcow("compare " + Q(larger) + " " + Q(target_));
  EXPECT_EQ(different.exit_code, 1) << different.output;
  EXPECT_NE(different.output.find("Content mismatch at offset " + std::to_string(nonzero_at)),
            std::string::npos)
      << different.output;
}

TEST_F(CliTest, CompareErrorsExitTwo) {
  CommandResult r = Zqcow("compare " + Q(source_) + " " + Q(dir_.File("missing")));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("missing"), std::string::npos) << r.output;
  CommandResult usage = Zqcow("compare " + Q(source_));
  EXPECT_EQ(usage.exit_code, 2) << usage.output;
}

TEST_F(CliTest, CheckFindsCorruptionLeaksAndIncompleteImages) {
  ConvertOk("-c");
  const auto clean = ReadWholeFile(target_);
  RefcountSlot slot = HeaderRefcountSlot(clean);
  uint64_t header_refcount = ReadBE(clean, slot.offset, slot.width);
  ASSERT_EQ(header_refcount, 1u);

  // Header cluster with refcount 0 while in use: corruption.
  auto damaged = clean;
  WriteBE(damaged, slot.offset, slot.width, header_refcount - 1);
  WriteWholeFile(target_, damaged);
  EXPECT_EQ(testing::QemuImgCheck(target_).exit_code, 2) << "the damage must be real";
  CommandResult corrupt = Zqcow("check " + Q(target_));
  EXPECT_EQ(corrupt.exit_code, 2) << corrupt.output;
  EXPECT_NE(corrupt.output.find("errors were found on the image"), std::string::npos)
      << corrupt.output;

  // One reference too many: a leak.
  auto leaking = clean;
  WriteBE(leaking, slot.offset, slot.width, header_refcount + 1);
  WriteWholeFile(target_, leaking);
  EXPECT_EQ(testing::QemuImgCheck(target_).exit_code, 3) << "the leak must be real";
  CommandResult leak = Zqcow("check " + Q(target_));
  EXPECT_EQ(leak.exit_code, 3) << leak.output;
  EXPECT_NE(leak.output.find("1 leaked clusters were found on the image."), std::string::npos)
      << leak.output;
  CommandResult leak_json = Zqcow("check --output=json " + Q(target_));
  EXPECT_EQ(leak_json.exit_code, 3);
  auto j = ParseJson(leak_json.output);
  EXPECT_EQ(j["leaks"], 1);
  EXPECT_FALSE(j.contains("corruptions")) << "qemu-img omits counters that are 0";

  // Dirty bit: an interrupted write.
  auto dirty = clean;
  dirty[kHeaderIncompatibleFeaturesLastByte] |= 1;
  WriteWholeFile(target_, dirty);
  CommandResult incomplete = Zqcow("check " + Q(target_));
  EXPECT_EQ(incomplete.exit_code, 3) << incomplete.output;
  EXPECT_NE(incomplete.output.find("incomplete"), std::string::npos) << incomplete.output;

  // Not an image at all: the check cannot run.
  CommandResult raw = Zqcow("check " + Q(source_));
  EXPECT_EQ(raw.exit_code, 1) << raw.output;
}

TEST_F(CliTest, InfoAgreesWithQemuImg) {
  ConvertOk("-c -o compression_type=zstd");
  for (const std::string& image : {target_, source_}) {
    SCOPED_TRACE(image);
    auto [a, b] = InfoFromBoth(image);
    EXPECT_EQ(a["format"], b["format"]);
    EXPECT_EQ(a["virtual-size"], b["virtual-size"]);
    if (b.contains("cluster-size")) {
      EXPECT_EQ(a["cluster-size"], b["cluster-size"]);
    }
    if (b.contains("dirty-flag")) {
      EXPECT_EQ(a["dirty-flag"], b["dirty-flag"]);
    }
    if (b.contains("format-specific") && b["format-specific"]["type"] == "qcow2") {
      const auto& bd = b["format-specific"]["data"];
      const auto& ad = a["format-specific"]["data"];
      EXPECT_EQ(ad["compression-type"], bd["compression-type"]);
      EXPECT_EQ(ad["refcount-bits"], bd["refcount-bits"]);
      EXPECT_EQ(ad["corrupt"], bd["corrupt"]);
    }
  }
  CommandResult human = Zqcow("info " + Q(target_));
  EXPECT_EQ(human.exit_code, 0) << human.output;
  EXPECT_NE(human.output.find("file format: qcow2"), std::string::npos) << human.output;
  EXPECT_NE(human.output.find("compression type: zstd"), std::string::npos) << human.output;
}

// An overlay with internal snapshots: info lists the backing file and the snapshots as
// qemu-img does; convert and compare read through the chain.
TEST_F(CliTest, OverlaysWithSnapshotsAreReadLikeQemuImg) {
  ConvertOk("-c");
  const std::string overlay = dir_.File("overlay.qcow2");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 -F qcow2 -b " + Q(target_) + " " + Q(overlay))
                .exit_code,
            0);
  ASSERT_EQ(RunCommand("qemu-io -f qcow2 -c 'write -P 7 64k 128k' " + Q(overlay)).exit_code, 0);
  ASSERT_EQ(RunCommand("qemu-img snapshot -c first " + Q(overlay)).exit_code, 0);
  ASSERT_EQ(RunCommand("qemu-io -f qcow2 -c 'write -P 8 0 4k' " + Q(overlay)).exit_code, 0);
  ASSERT_EQ(RunCommand("qemu-img snapshot -c second " + Q(overlay)).exit_code, 0);

  auto [a, b] = InfoFromBoth(overlay);
  EXPECT_EQ(a["backing-filename"], b["backing-filename"]);
  EXPECT_EQ(a["backing-filename-format"], b["backing-filename-format"]);
  ASSERT_EQ(a["snapshots"].size(), 2u) << a.dump();
  for (size_t i = 0; i < 2; ++i) {
    for (const char* key : {"id", "name", "date-sec", "date-nsec", "vm-state-size"}) {
      EXPECT_EQ(a["snapshots"][i][key], b["snapshots"][i][key]) << key;
    }
  }
  CommandResult human = Zqcow("info " + Q(overlay));
  EXPECT_NE(human.output.find("Snapshot list:"), std::string::npos) << human.output;
  EXPECT_NE(human.output.find("second"), std::string::npos) << human.output;

  const std::string flat = dir_.File("flat.qcow2");
  CommandResult converted = Zqcow("convert -c -T none -t none " + Q(overlay) + " " + Q(flat));
  ASSERT_EQ(converted.exit_code, 0) << converted.output;
  EXPECT_EQ(RunCommand("qemu-img compare " + Q(overlay) + " " + Q(flat)).exit_code, 0);
  EXPECT_EQ(Zqcow("compare " + Q(overlay) + " " + Q(flat)).exit_code, 0);
  EXPECT_EQ(Zqcow("compare " + Q(overlay) + " " + Q(target_)).exit_code, 1);
  EXPECT_EQ(RunCommand("qemu-img check " + Q(flat)).exit_code, 0);
  // The overlay itself checks clean for both tools.
  EXPECT_EQ(Zqcow("check " + Q(overlay)).exit_code, 0);
}

// Merges adjacent map entries with the same present/zero/data flags (qemu-img and zqcow may
// split differently), keeping "offset" only when asked to and contiguous.
std::vector<nlohmann::json> Normalize(const nlohmann::json& list, bool keep_offsets) {
  std::vector<nlohmann::json> out;
  for (const auto& e : list) {
    nlohmann::json n = {{"start", e["start"]},
                        {"length", e["length"]},
                        {"present", e["present"]},
                        {"zero", e["zero"]},
                        {"data", e["data"]}};
    if (keep_offsets && e.contains("offset")) n["offset"] = e["offset"];
    if (!out.empty()) {
      auto& last = out.back();
      bool same = last["present"] == n["present"] && last["zero"] == n["zero"] &&
                  last["data"] == n["data"] &&
                  last["start"].get<uint64_t>() + last["length"].get<uint64_t>() ==
                      n["start"].get<uint64_t>() &&
                  last.contains("offset") == n.contains("offset");
      if (same && n.contains("offset")) {
        same = last["offset"].get<uint64_t>() + last["length"].get<uint64_t>() ==
               n["offset"].get<uint64_t>();
      }
      if (same) {
        last["length"] = last["length"].get<uint64_t>() + n["length"].get<uint64_t>();
        continue;
      }
    }
    out.push_back(n);
  }
  return out;
}

TEST_F(CliTest, MapAgreesWithQemuImg) {
  for (bool compress : {true, false}) {
    SCOPED_TRACE(compress ? "compressed" : "uncompressed");
    ConvertOk(compress ? "--force -c" : "--force");
    CommandResult ours = Zqcow("map --output=json " + Q(target_));
    ASSERT_EQ(ours.exit_code, 0) << ours.output;
    CommandResult qemu = RunCommand("qemu-img map --output=json " + Q(target_));
    ASSERT_EQ(qemu.exit_code, 0) << qemu.output;
    auto a = ParseJson(ours.output);
    auto b = ParseJson(qemu.output);
    ASSERT_TRUE(a.is_array());
    bool any_compressed = false;
    for (const auto& e : a) any_compressed |= e.value("compressed", false);
    EXPECT_EQ(any_compressed, compress);
    EXPECT_EQ(Normalize(a, !compress), Normalize(b, !compress));
  }
  CommandResult human = Zqcow("map " + Q(target_));
  EXPECT_EQ(human.exit_code, 0) << human.output;
  EXPECT_NE(human.output.find("Mapped to"), std::string::npos) << human.output;
}

// Starts `zqcow convert` on `source`, interrupts it with `signal_number` as soon as the
// target's partial image exists, and returns the exit code (or -1 when killed) and the
// output.
CommandResult ConvertAndInterrupt(const std::string& source, const std::string& target,
                                  const std::string& log, int signal_number) {
  std::string binary = ZqcowBinary();
  pid_t pid = fork();
  if (pid == 0) {
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, STDOUT_FILENO);
      dup2(fd, STDERR_FILENO);
    }
    // zlib level 9 on one worker: slow enough to be caught in the act.
    execl(binary.c_str(), binary.c_str(), "convert", "-c", "-o", "compression_level=9", "-m", "1",
          "--force", source.c_str(), target.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  CommandResult result;
  if (pid < 0) return result;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  int status = 0;
  bool exited = false;
  while (std::chrono::steady_clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      exited = true;
      break;
    }
    struct stat st {};
    if (stat(PartialTargetPath(target).c_str(), &st) == 0 && st.st_size > 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (!exited) {
    kill(pid, signal_number);
    waitpid(pid, &status, 0);
  }
  auto log_bytes = ReadWholeFile(log);
  result.output.assign(log_bytes.begin(), log_bytes.end());
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

TEST_F(CliTest, SignalsInterruptTheConversionAndLeaveOnlyAnIncompletePartialImage) {
  for (int signal_number : {SIGINT, SIGTERM}) {
    SCOPED_TRACE(signal_number == SIGINT ? "SIGINT" : "SIGTERM");
    // If the conversion outran the signal, retry with a larger source: the test must see
    // an interrupted conversion to pass.
    CommandResult r;
    for (uint64_t size : {32 * kMiB, 64 * kMiB, 128 * kMiB}) {
      std::filesystem::remove(target_);
      WriteRawImage(source_, size, DataKind::kRandom, kSeed);
      r = ConvertAndInterrupt(source_, target_, dir_.File("log"), signal_number);
      if (r.exit_code != 0) break;
    }
    EXPECT_EQ(r.exit_code, signal_number == SIGINT ? kExitSigint : kExitSigterm) << r.output;
    EXPECT_NE(r.output.find("interrupted"), std::string::npos) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
    // DST is not there; the work so far is in the partial image, marked incomplete.
    EXPECT_FALSE(std::filesystem::exists(target_));
    const std::string partial = PartialTargetPath(target_);
    EXPECT_NE(r.output.find(partial), std::string::npos) << r.output;
    ASSERT_TRUE(std::filesystem::exists(partial));
    EXPECT_TRUE(DirtyBit(partial));
    CommandResult info = Zqcow("info --output=json " + Q(partial));
    ASSERT_EQ(info.exit_code, 0) << info.output;
    EXPECT_EQ(ParseJson(info.output)["dirty-flag"], true);
    CommandResult check = Zqcow("check " + Q(partial));
    EXPECT_EQ(check.exit_code, 3) << check.output;
    EXPECT_NE(check.output.find("incomplete"), std::string::npos) << check.output;
    std::filesystem::remove(partial);
    std::filesystem::remove(partial + ".info");
  }
  std::filesystem::remove(source_);
}

TEST(CliHelpTest, EverySubcommandHasHelpAndThereIsAVersion) {
  for (const char* command : {"convert", "info", "check", "compare", "map"}) {
    SCOPED_TRACE(command);
    CommandResult r = Zqcow(std::string(command) + " --help");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("Usage"), std::string::npos) << r.output;
  }
  CommandResult top = Zqcow("--help");
  EXPECT_EQ(top.exit_code, 0) << top.output;
  EXPECT_NE(top.output.find("convert"), std::string::npos);
  CommandResult version = Zqcow("--version");
  EXPECT_EQ(version.exit_code, 0) << version.output;
  EXPECT_NE(version.output.find("zqcow"), std::string::npos);
  CommandResult none = Zqcow("");
  EXPECT_NE(none.exit_code, 0);
  CommandResult unknown = Zqcow("frobnicate");
  EXPECT_EQ(unknown.exit_code, 1) << unknown.output;
}

}  // namespace
}  // namespace zqcow
