// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Incremental backups end to end (`zqcow convert -c -B PREVIOUS disk.raw NEW`, the mode that
// compares with the backing chain): a disk, a full backup, then rounds of random writes
// (runs, single bytes, zeros over data, holes punched into data, a resize to a larger size
// that is not a multiple of the cluster size and writes past the old end), each followed by
// an incremental. After every round qemu-img compare says the chain's top reads exactly as
// the disk did, qemu-img check is clean on every image of the chain, and qemu-img info shows
// the backing file as given and its format. Then what is refused, with a clear message and
// no target left behind. (The dirty-bitmap mode is tested in src/convert/pipeline_test.cc
// with a source that has a bitmap.)

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <random>
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
using testing::WriteRawImage;
using testing::ZqcowBinary;

constexpr uint64_t kMiB = 1 << 20;

std::string Q(const std::string& path) { return ShellQuote(path); }

// Runs zqcow in `dir` (so relative backing names are relative to it, as users give them).
CommandResult ZqcowIn(const TempDir& dir, const std::string& args) {
  return RunCommand("cd " + Q(dir.path()) + " && " + ZqcowBinary() + " " + args);
}

bool Exists(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0;
}

uint64_t FileSize(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(stat(path.c_str(), &st), 0) << path;
  return static_cast<uint64_t>(st.st_size);
}

// The guest's writes, applied to the raw disk in place.
class Disk {
 public:
  Disk(std::string path, uint64_t seed) : path_(std::move(path)), rng_(seed) {
    fd_ = ::open(path_.c_str(), O_RDWR);
    EXPECT_GE(fd_, 0) << path_;
  }
  ~Disk() { ::close(fd_); }

  uint64_t size() const { return FileSize(path_); }
  uint64_t Random(uint64_t below) { return below == 0 ? 0 : rng_() % below; }

  void Write(uint64_t offset, const std::vector<uint8_t>& bytes) {
    ASSERT_EQ(::pwrite(fd_, bytes.data(), bytes.size(), static_cast<off_t>(offset)),
              static_cast<ssize_t>(bytes.size()));
  }
  std::vector<uint8_t> RandomBytes(uint64_t length) {
    std::vector<uint8_t> bytes(length);
    for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng_());
    return bytes;
  }
  // A hole where there was data: the source's DataRanges leave it out.
  void PunchHole(uint64_t offset, uint64_t length) {
    ASSERT_EQ(::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          static_cast<off_t>(offset), static_cast<off_t>(length)),
              0);
  }
  void Resize(uint64_t size) { ASSERT_EQ(::ftruncate(fd_, static_cast<off_t>(size)), 0); }

  // One round of guest activity inside [from, size()).
  void RandomWrites(uint64_t cluster, uint64_t from = 0) {
    const uint64_t span = size() - from;
    for (int i = 0; i < 6; ++i) {  // runs of random bytes
      const uint64_t length = 1 + Random(3 * cluster / 2);
      const uint64_t offset = from + Random(span - length);
      Write(offset, RandomBytes(length));
    }
    for (int i = 0; i < 8; ++i) Write(from + Random(span), RandomBytes(1));  // single bytes
    for (int i = 0; i < 3; ++i) {  // zeros over data: a partial and a whole cluster or two
      const uint64_t length = 1 + Random(2 * cluster);
      const uint64_t offset = from + Random(span - length);
      Write(offset, std::vector<uint8_t>(length, 0));
      const uint64_t whole = from + Random(span / cluster) * cluster;
      Write(whole, std::vector<uint8_t>(std::min(cluster, size() - whole), 0));
    }
    const uint64_t hole = from + Random(span / cluster) * cluster;  // discarded data
    PunchHole(hole, std::min(cluster, size() - hole));
  }

 private:
  std::string path_;
  std::mt19937_64 rng_;
  int fd_ = -1;
};

void ExpectClean(const std::string& image) {
  auto check = testing::QemuImgCheck(image);
  EXPECT_EQ(check.exit_code, 0) << image << "\n" << check.output;
}

void ExpectSame(const std::string& raw, const std::string& image) {
  auto compare = testing::QemuImgCompare(raw, "raw", image, "qcow2");
  EXPECT_EQ(compare.exit_code, 0) << raw << " vs " << image << "\n" << compare.output;
}

nlohmann::json QemuInfo(const std::string& image) {
  auto info = RunCommand("qemu-img info --output=json " + Q(image));
  EXPECT_EQ(info.exit_code, 0) << info.output;
  return info.exit_code == 0 ? nlohmann::json::parse(info.output) : nlohmann::json::object();
}

class IncrementalTest : public ::testing::TestWithParam<uint64_t> {};

TEST_P(IncrementalTest, ChainOfIncrementalsReadsAsTheDiskDidAtEachBackup) {
  ASSERT_TRUE(testing::HaveQemu());
  const uint64_t cluster = GetParam();
  TempDir dir;
  const std::string cluster_option = "-o cluster_size=" + std::to_string(cluster);
  // Several clusters, not a multiple of the cluster size; mixed data with holes.
  const uint64_t initial_size = std::max(4 * cluster, 2 * kMiB) + 3 * kMiB / 4 + 4096 + 512;
  WriteRawImage(dir.File("disk.raw"), initial_size, DataKind::kMixed, 17,
                static_cast<uint32_t>(std::min<uint64_t>(cluster, 65536)));
  auto full = ZqcowIn(dir, "convert -c " + cluster_option + " disk.raw full.qcow2");
  ASSERT_EQ(full.exit_code, 0) << full.output;
  ExpectSame(dir.File("disk.raw"), dir.File("full.qcow2"));

  Disk disk(dir.File("disk.raw"), 99 + cluster);
  std::vector<std::string> chain = {"full.qcow2"};
  for (int round = 1; round <= 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    if (round == 2) {
      // The disk grows by a few clusters and a bit (not a multiple of the cluster size),
      // and the guest writes past the old end.
      const uint64_t old_size = disk.size();
      disk.Resize(old_size + 2 * cluster + 12345);
      disk.RandomWrites(cluster, old_size);
    }
    disk.RandomWrites(cluster);
    if (HasFatalFailure()) return;
    // The disk as it was when this backup began.
    const std::string snapshot = dir.File("snap" + std::to_string(round) + ".raw");
    ASSERT_EQ(
        RunCommand("cp --sparse=always " + Q(dir.File("disk.raw")) + " " + Q(snapshot)).exit_code,
        0);
    const std::string name = "inc" + std::to_string(round) + ".qcow2";
    auto inc = ZqcowIn(dir, "convert -c " + cluster_option + " -B " + chain.back() + " disk.raw " +
                                name + " --output json");
    ASSERT_EQ(inc.exit_code, 0) << inc.output;
    auto stats = nlohmann::json::parse(inc.output);
    const uint64_t clusters = (stats["virtual_size"].get<uint64_t>() + cluster - 1) / cluster;
    const uint64_t written = stats["clusters_compressed"].get<uint64_t>() +
                             stats["clusters_uncompressed"].get<uint64_t>();
    EXPECT_EQ(stats["clusters_zero"].get<uint64_t>() + written +
                  stats["clusters_unchanged"].get<uint64_t>(),
              clusters);
    // Only what changed is written (at 2 MiB clusters a round touches nearly every one).
    if (cluster == 65536) {
      EXPECT_GT(stats["clusters_unchanged"].get<uint64_t>(), 0u) << inc.output;
      EXPECT_LT(written, clusters / 2) << inc.output;
    }

    ExpectSame(snapshot, dir.File(name));
    auto info = QemuInfo(dir.File(name));
    EXPECT_EQ(info["backing-filename"], chain.back());
    EXPECT_EQ(info["backing-filename-format"], "qcow2");
    EXPECT_EQ(info["cluster-size"].get<uint64_t>(), cluster);
    chain.push_back(name);
    for (const std::string& image : chain) ExpectClean(dir.File(image));
  }
  // Every backup of the chain still reads as the disk did then.
  for (int round = 1; round <= 3; ++round) {
    ExpectSame(dir.File("snap" + std::to_string(round) + ".raw"),
               dir.File("inc" + std::to_string(round) + ".qcow2"));
  }
  // An unchanged disk gives an incremental without data.
  auto same = ZqcowIn(dir, "convert -c " + cluster_option + " -B inc3.qcow2 disk.raw inc4.qcow2 " +
                               "--output json");
  ASSERT_EQ(same.exit_code, 0) << same.output;
  auto stats = nlohmann::json::parse(same.output);
  EXPECT_EQ(stats["clusters_compressed"].get<uint64_t>(), 0u);
  EXPECT_EQ(stats["clusters_uncompressed"].get<uint64_t>(), 0u);
  ExpectSame(dir.File("disk.raw"), dir.File("inc4.qcow2"));
  ExpectClean(dir.File("inc4.qcow2"));
}

INSTANTIATE_TEST_SUITE_P(ClusterSizes, IncrementalTest,
                         ::testing::Values(uint64_t{65536}, uint64_t{2} << 20));

// A backing file in another directory, named relative to the target's directory.
TEST(IncrementalCliTest, RelativeBackingNameIsRelativeToTheTarget) {
  TempDir dir;
  ASSERT_EQ(RunCommand("mkdir " + Q(dir.File("backups"))).exit_code, 0);
  WriteRawImage(dir.File("disk.raw"), 2 * kMiB, DataKind::kMixed, 3);
  ASSERT_EQ(ZqcowIn(dir, "convert -c disk.raw backups/full.qcow2").exit_code, 0);
  Disk disk(dir.File("disk.raw"), 5);
  disk.Write(100000, disk.RandomBytes(70000));
  auto inc = ZqcowIn(dir, "convert -c -B full.qcow2 -F qcow2 disk.raw backups/inc.qcow2");
  ASSERT_EQ(inc.exit_code, 0) << inc.output;
  ExpectSame(dir.File("disk.raw"), dir.File("backups/inc.qcow2"));
  EXPECT_EQ(QemuInfo(dir.File("backups/inc.qcow2"))["backing-filename"], "full.qcow2");
}

class IncrementalRefusals : public ::testing::Test {
 protected:
  void SetUp() override {
    WriteRawImage(dir_.File("disk.raw"), 2 * kMiB, DataKind::kMixed, 3);
    ASSERT_EQ(ZqcowIn(dir_, "convert -c disk.raw full.qcow2").exit_code, 0);
  }
  // The command fails, says `message`, and leaves no target.
  void ExpectRefused(const std::string& args, const std::string& message) {
    auto result = ZqcowIn(dir_, "convert -c " + args);
    EXPECT_NE(result.exit_code, 0) << result.output;
    EXPECT_NE(result.output.find(message), std::string::npos) << result.output;
    EXPECT_FALSE(Exists(dir_.File("new.qcow2"))) << result.output;
  }
  TempDir dir_;
};

TEST_F(IncrementalRefusals, ShrunkDiskNeedsAFullBackup) {
  ASSERT_EQ(::truncate(dir_.File("disk.raw").c_str(), kMiB), 0);
  ExpectRefused("-B full.qcow2 disk.raw new.qcow2",
                "new.qcow2: source is smaller (1048576) than the backing image full.qcow2 "
                "(2097152); a shrunk disk needs a full backup");
}

TEST_F(IncrementalRefusals, MissingBackingFile) {
  ExpectRefused("-B gone.qcow2 disk.raw new.qcow2", "backing file 'gone.qcow2'");
  ExpectRefused("-B gone.qcow2 disk.raw new.qcow2", "does not exist");
}

TEST_F(IncrementalRefusals, BackingFileThatIsNotQcow2) {
  ExpectRefused("-B disk.raw disk.raw new.qcow2", "is not a qcow2 image");
}

TEST_F(IncrementalRefusals, IncompleteBackingFile) {
  // The dirty bit (incompatible feature bit 0, the last byte of the field at offset 72).
  auto bytes = testing::ReadWholeFile(dir_.File("full.qcow2"));
  bytes.at(79) |= 1;
  testing::WriteWholeFile(dir_.File("full.qcow2"), bytes);
  ExpectRefused("-B full.qcow2 disk.raw new.qcow2", "is incomplete");
}

TEST_F(IncrementalRefusals, OtherBackingFormats) {
  ExpectRefused("-B full.qcow2 -F vmdk disk.raw new.qcow2",
                "-F: backing format 'vmdk' is not supported");
  ExpectRefused("-F qcow2 disk.raw new.qcow2", "-F: needs a backing file (-B)");
}

TEST_F(IncrementalRefusals, BitmapNeedsABackingFileAndASourceWithBitmaps) {
  ExpectRefused("--bitmap b0 disk.raw new.qcow2", "--bitmap: needs the backing file");
  // A raw file has no dirty bitmap: refused before the target is created.
  ExpectRefused("-B full.qcow2 --bitmap b0 disk.raw new.qcow2", "dirty bitmap");
}

TEST_F(IncrementalRefusals, TargetThatIsTheBackingFileIsNeverTruncated) {
  const uint64_t before = FileSize(dir_.File("full.qcow2"));
  auto result = ZqcowIn(dir_, "convert -c --force -B full.qcow2 disk.raw full.qcow2");
  EXPECT_NE(result.exit_code, 0) << result.output;
  EXPECT_NE(result.output.find("target is the backing file"), std::string::npos) << result.output;
  EXPECT_EQ(FileSize(dir_.File("full.qcow2")), before);
  ExpectSame(dir_.File("disk.raw"), dir_.File("full.qcow2"));
}

}  // namespace
}  // namespace zqcow
