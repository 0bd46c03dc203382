// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow restore` and `zqcow convert -O raw`: every point of a 4-image backup chain comes
// back byte-exact to a file, a qemu-nbd export and a loop block device; restores are thin;
// -n / --target-is-zero / -S; targets too small or read-only fail with one line naming
// them; a point whose content no longer matches its recorded digest is refused.

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "testing/nbd_server.h"
#include "testing/test_util.h"

namespace zqcow {
namespace {

using testing::CommandResult;
using testing::DataKind;
using testing::NbdServer;
using testing::ReadWholeFile;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kDiskSize = 8 * kMiB;
constexpr int kPoints = 4;

std::string Q(const std::string& s) { return ShellQuote(s); }
CommandResult Zqcow(const std::string& args) {
  return RunCommand(testing::ZqcowBinary() + " " + args);
}

// Overwrites [offset, offset + data.size()) of `path` in place.
void Patch(const std::string& path, uint64_t offset, const std::vector<uint8_t>& data) {
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  file.seekp(static_cast<std::streamoff>(offset));
  file.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(file.good()) << path;
}

uint64_t AllocatedBytes(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_blocks) * 512 : 0;
}

bool Exists(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0;
}

size_t Lines(const std::string& text) {
  size_t lines = 0;
  for (char c : text) lines += c == '\n';
  return lines;
}

// A file of `size` bytes of 0xee: whatever a restore leaves unwritten shows.
void WriteGarbage(const std::string& path, uint64_t size) {
  testing::WriteWholeFile(path, std::vector<uint8_t>(size, 0xee));
}

class RestoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu()) << "qemu-img, qemu-io and qemu-nbd are needed";
    disk_ = dir_.File("disk.raw");
    backups_ = dir_.File("backups");
    testing::WriteRawImage(disk_, kDiskSize, DataKind::kMixed, 7);
    for (int point = 0; point < kPoints; ++point) {
      if (point > 0) Modify(point);
      CommandResult r = Zqcow("backup --output=json " + Q(disk_) + " " + Q(backups_));
      ASSERT_EQ(r.exit_code, 0) << r.output;
      end_times_.push_back(nlohmann::json::parse(r.output)["end_time"]);
      ASSERT_EQ(RunCommand("cp --sparse=always " + Q(disk_) + " " + Q(Expected(point))).exit_code,
                0);
    }
  }

  // Changes the disk between backups: new data, a range zeroed, a cluster rewritten.
  void Modify(int point) {
    Patch(disk_, point * kMiB + 4096, testing::MakeData(DataKind::kRandom, 200000, point));
    Patch(disk_, (point + 4) * kMiB, std::vector<uint8_t>(3 * 65536, 0));
    Patch(disk_, 65536 * point, testing::MakeData(DataKind::kText, 65536, 100 + point));
  }

  std::string Expected(int point) const { return dir_.File("disk-" + std::to_string(point)); }

  void ExpectSame(const std::string& restored, int point) {
    EXPECT_TRUE(ReadWholeFile(restored) == ReadWholeFile(Expected(point)))
        << restored << " differs from the disk at point " << point;
  }

  TempDir dir_;
  std::string disk_;
  std::string backups_;
  std::vector<std::string> end_times_;
};

TEST_F(RestoreTest, EveryPointToAFileByNumberAndByTime) {
  for (int point = 0; point < kPoints; ++point) {
    const std::string out = dir_.File("out-" + std::to_string(point));
    CommandResult r = Zqcow("restore --output=json --point " + std::to_string(point) + " " +
                            Q(backups_) + " " + Q(out));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_TRUE(nlohmann::json::parse(r.output)["digest_checked"].get<bool>());
    ExpectSame(out, point);
    const std::string by_time = out + "-time";
    r = Zqcow("restore --point " + end_times_[point] + " " + Q(backups_) + " " + Q(by_time));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    // Several backups may end within the same second: the latest of them is restored.
    int latest = point;
    while (latest + 1 < kPoints && end_times_[latest + 1] == end_times_[point]) ++latest;
    ExpectSame(by_time, latest);
  }
  CommandResult last = Zqcow("restore " + Q(backups_) + " " + Q(dir_.File("last")));
  ASSERT_EQ(last.exit_code, 0) << last.output;
  ExpectSame(dir_.File("last"), kPoints - 1);
  CommandResult missing = Zqcow("restore --point 9 " + Q(backups_) + " " + Q(dir_.File("x")));
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("no restore point 9"), std::string::npos) << missing.output;
  CommandResult early =
      Zqcow("restore --point 2000-01-01 " + Q(backups_) + " " + Q(dir_.File("x")));
  EXPECT_NE(early.exit_code, 0);
  EXPECT_FALSE(Exists(dir_.File("x")));
}

TEST_F(RestoreTest, EveryPointAsStandaloneQcow2) {
  for (int point = 0; point < kPoints; ++point) {
    const std::string out = dir_.File("out-" + std::to_string(point) + ".qcow2");
    CommandResult r = Zqcow("restore -O qcow2 --point " + std::to_string(point) + " " +
                            Q(backups_) + " " + Q(out));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    CommandResult info = RunCommand("qemu-img info --output=json " + Q(out));
    ASSERT_EQ(info.exit_code, 0) << info.output;
    EXPECT_FALSE(nlohmann::json::parse(info.output).contains("backing-filename"));
    EXPECT_EQ(testing::QemuImgCompare(out, "qcow2", Expected(point), "raw").exit_code, 0);
  }
}

TEST_F(RestoreTest, EveryPointToAQemuNbdExport) {
  const std::string exported = dir_.File("exported.raw");
  WriteGarbage(exported, kDiskSize);
  auto server = NbdServer::QemuNbd(dir_.path(), {"-f", "raw", exported});
  ASSERT_NE(server, nullptr);
  for (int point = 0; point < kPoints; ++point) {
    CommandResult r = Zqcow("restore --point " + std::to_string(point) + " " + Q(backups_) +
                            " " + Q(server->uri()));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    ExpectSame(exported, point);
  }
  server.reset();
  // Read-only export: one line naming it.
  auto read_only = NbdServer::QemuNbd(dir_.path(), {"-f", "raw", "-r", exported});
  ASSERT_NE(read_only, nullptr);
  CommandResult r = Zqcow("restore " + Q(backups_) + " " + Q(read_only->uri()));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(Lines(r.output), 1u) << r.output;
  EXPECT_NE(r.output.find(read_only->uri() + ": the NBD export is read-only"), std::string::npos)
      << r.output;
}

TEST_F(RestoreTest, EveryPointToALoopBlockDevice) {
  if (geteuid() != 0) GTEST_SKIP() << "losetup needs root";
  const std::string backing = dir_.File("loop.raw");
  WriteGarbage(backing, kDiskSize);
  CommandResult attach = RunCommand("losetup -f --show " + Q(backing));
  if (attach.exit_code != 0) GTEST_SKIP() << "no loop device: " << attach.output;
  const std::string device = attach.output.substr(0, attach.output.find('\n'));
  struct Detach {
    std::string device;
    ~Detach() { RunCommand("losetup -d " + ShellQuote(device)); }
  } detach{device};
  for (int point = 0; point < kPoints; ++point) {
    CommandResult r = Zqcow("restore -t none --point " + std::to_string(point) + " " +
                            Q(backups_) + " " + Q(device));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    CommandResult cmp = RunCommand("cmp " + Q(device) + " " + Q(Expected(point)));
    EXPECT_EQ(cmp.exit_code, 0) << "point " << point << ": " << cmp.output;
  }
}

TEST_F(RestoreTest, ThinRestoreAllocatesWhatTheDataNeeds) {
  // A mostly empty 64 MiB disk: 2 MiB of data in a few places.
  const std::string sparse = dir_.File("sparse.raw");
  ASSERT_EQ(RunCommand("truncate -s 64M " + Q(sparse)).exit_code, 0);
  for (uint64_t at : {uint64_t{1}, uint64_t{20}, uint64_t{50}}) {
    Patch(sparse, at * kMiB, testing::MakeData(DataKind::kRandom, 700 * 1024, at));
  }
  const std::string dir = dir_.File("sparse-backups");
  ASSERT_EQ(Zqcow("backup " + Q(sparse) + " " + Q(dir)).exit_code, 0);
  const std::string out = dir_.File("sparse.out");
  CommandResult r = Zqcow("restore " + Q(dir) + " " + Q(out));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(ReadWholeFile(out) == ReadWholeFile(sparse));
  EXPECT_LE(AllocatedBytes(out), AllocatedBytes(sparse) + kMiB);
  EXPECT_LT(AllocatedBytes(out), 4 * kMiB);
  // -S 0 (convert): every byte written.
  const std::string full = dir_.File("full.out");
  r = Zqcow("convert -O raw -S 0 " + Q(sparse) + " " + Q(full));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_GE(AllocatedBytes(full), 64 * kMiB);
  EXPECT_TRUE(ReadWholeFile(full) == ReadWholeFile(sparse));
}

TEST_F(RestoreTest, NoCreateAndTargetIsZero) {
  // -n onto a file of garbage: the zero ranges are zeroed too.
  const std::string existing = dir_.File("existing.raw");
  WriteGarbage(existing, kDiskSize + kMiB);
  CommandResult r = Zqcow("restore -n --point 1 " + Q(backups_) + " " + Q(existing));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::vector<uint8_t> restored = ReadWholeFile(existing);
  ASSERT_EQ(restored.size(), kDiskSize + kMiB);  // used as is: not truncated
  std::vector<uint8_t> expected = ReadWholeFile(Expected(1));
  EXPECT_TRUE(std::equal(expected.begin(), expected.end(), restored.begin()));
  EXPECT_EQ(restored.back(), 0xee);  // beyond the source: untouched
  // --target-is-zero onto a zeroed file: the zero ranges are not written.
  const std::string zeroed = dir_.File("zeroed.raw");
  ASSERT_EQ(RunCommand("truncate -s 8M " + Q(zeroed)).exit_code, 0);
  r = Zqcow("restore -n --target-is-zero " + Q(backups_) + " " + Q(zeroed));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ExpectSame(zeroed, kPoints - 1);
  // Refusals, each one line.
  for (const std::string& args :
       {"convert --target-is-zero " + Q(disk_) + " " + Q(dir_.File("t1")),
        "restore --target-is-zero " + Q(backups_) + " " + Q(dir_.File("t1")),
        "convert -n " + Q(disk_) + " " + Q(dir_.File("missing")),
        "convert -c -n " + Q(disk_) + " " + Q(existing)}) {
    CommandResult refused = Zqcow(args);
    EXPECT_NE(refused.exit_code, 0) << args;
    EXPECT_EQ(Lines(refused.output), 1u) << args << ": " << refused.output;
  }
  EXPECT_FALSE(Exists(dir_.File("t1")));
  EXPECT_NE(Zqcow("convert -n " + Q(disk_) + " " + Q(dir_.File("missing"))).output.find("missing"),
            std::string::npos);
}

TEST_F(RestoreTest, TooSmallTargetIsNamed) {
  const std::string small = dir_.File("small.raw");
  WriteGarbage(small, kMiB);
  CommandResult r = Zqcow("restore -n " + Q(backups_) + " " + Q(small));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(Lines(r.output), 1u) << r.output;
  EXPECT_NE(r.output.find(small + ": target is too small"), std::string::npos) << r.output;
  const std::string exported = dir_.File("small-export.raw");
  WriteGarbage(exported, kMiB);
  auto server = NbdServer::QemuNbd(dir_.path(), {"-f", "raw", exported});
  ASSERT_NE(server, nullptr);
  r = Zqcow("restore " + Q(backups_) + " " + Q(server->uri()));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("target is too small"), std::string::npos) << r.output;
}

TEST_F(RestoreTest, ContentNotMatchingTheRecordedDigestIsRefused) {
  const std::string manifest_path = backups_ + "/zqcow-manifest.json";
  nlohmann::json manifest = nlohmann::json::parse(ReadWholeFile(manifest_path));
  // A well-formed digest of other content (one cluster more).
  std::string digest = manifest["images"][2]["content_digest"];
  const size_t colon = digest.find(':', 3);
  const uint64_t count = std::stoull(digest.substr(3, colon - 3));
  manifest["images"][2]["content_digest"] = "v1:" + std::to_string(count + 1) + digest.substr(colon);
  const std::string text = manifest.dump(2);
  testing::WriteWholeFile(manifest_path, std::vector<uint8_t>(text.begin(), text.end()));
  const std::string out = dir_.File("bad.out");
  CommandResult r = Zqcow("restore --point 2 " + Q(backups_) + " " + Q(out));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("does not match its recorded digest"), std::string::npos) << r.output;
  EXPECT_FALSE(Exists(out));
  EXPECT_FALSE(Exists(out + ".zqcow-partial"));
  // The other points are still fine.
  r = Zqcow("restore --point 3 " + Q(backups_) + " " + Q(out));
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

TEST_F(RestoreTest, IncompleteOrMissingImagesOfTheChainAreRefused) {
  // The dirty bit (incompatible feature bit 0, header byte 79) of the middle image.
  const std::string middle = backups_ + "/disk-0001-inc.qcow2";
  std::vector<uint8_t> header = ReadWholeFile(middle);
  Patch(middle, 79, {static_cast<uint8_t>(header.at(79) | 1)});
  const std::string out = dir_.File("out");
  for (int point : {1, 3}) {
    CommandResult r =
        Zqcow("restore --point " + std::to_string(point) + " " + Q(backups_) + " " + Q(out));
    EXPECT_NE(r.exit_code, 0);
    EXPECT_EQ(Lines(r.output), 1u) << r.output;
    EXPECT_NE(r.output.find(middle + ": marked incomplete"), std::string::npos) << r.output;
    EXPECT_FALSE(Exists(out));
  }
  // Below it the chain is whole.
  ASSERT_EQ(Zqcow("restore --point 0 " + Q(backups_) + " " + Q(out)).exit_code, 0);
  ExpectSame(out, 0);
  ASSERT_EQ(std::remove(middle.c_str()), 0);
  CommandResult r = Zqcow("restore " + Q(backups_) + " " + Q(dir_.File("out2")));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(middle + ": missing"), std::string::npos) << r.output;
}

TEST_F(RestoreTest, ConvertToRawFromEveryKindOfSource) {
  const std::string compressed = dir_.File("c.qcow2");
  const std::string plain = dir_.File("p.qcow2");
  ASSERT_EQ(Zqcow("convert -c " + Q(disk_) + " " + Q(compressed)).exit_code, 0);
  ASSERT_EQ(Zqcow("convert -O qcow2 " + Q(disk_) + " " + Q(plain)).exit_code, 0);
  auto server = NbdServer::QemuNbd(dir_.path(), {"-f", "qcow2", "-r", compressed});
  ASSERT_NE(server, nullptr);
  const std::vector<std::pair<std::string, std::string>> sources = {
      {compressed, "-O raw -m 4 -t none -T none"},
      {plain, ""},  // no -O and no -c: raw, as qemu-img
      {backups_ + "/disk-0002-inc.qcow2", "-O raw"},  // a backing chain
      {server->uri(), "-O raw"},
      {disk_, "-O raw -S 64k"},
  };
  int n = 0;
  for (const auto& [source, flags] : sources) {
    const std::string out = dir_.File("raw-" + std::to_string(n++));
    CommandResult r = Zqcow("convert " + flags + " " + Q(source) + " " + Q(out));
    ASSERT_EQ(r.exit_code, 0) << source << ": " << r.output;
    ExpectSame(out, source.find("0002") != std::string::npos ? 2 : kPoints - 1);
  }
  // -c without -O: qcow2.
  const std::string implied = dir_.File("implied");
  ASSERT_EQ(Zqcow("convert -c " + Q(disk_) + " " + Q(implied)).exit_code, 0);
  CommandResult info = RunCommand("qemu-img info --output=json " + Q(implied));
  EXPECT_EQ(nlohmann::json::parse(info.output)["format"], "qcow2");
}

TEST(RawSizeTest, RawSizesRoundUpToSectorsAsQemuImgSays) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  const std::string odd = dir.File("odd.raw");
  ASSERT_EQ(RunCommand("truncate -s 20000001 " + Q(odd)).exit_code, 0);
  Patch(odd, 19999000, testing::MakeData(DataKind::kRandom, 1001, 3));
  CommandResult info = Zqcow("info --output=json " + Q(odd));
  ASSERT_EQ(info.exit_code, 0) << info.output;
  EXPECT_EQ(nlohmann::json::parse(info.output)["virtual-size"], 20000256u);
  for (const std::string flags : {"-c", "-O raw"}) {
    const std::string out = dir.File("out");
    std::remove(out.c_str());
    ASSERT_EQ(Zqcow("convert " + flags + " " + Q(odd) + " " + Q(out)).exit_code, 0);
    CommandResult compare = RunCommand("qemu-img compare " + Q(odd) + " " + Q(out));
    EXPECT_EQ(compare.exit_code, 0) << flags << ": " << compare.output;
    EXPECT_EQ(compare.output, "Images are identical.\n") << flags;
  }
}

}  // namespace
}  // namespace zqcow
