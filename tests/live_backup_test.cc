// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Live backups against a real QEMU: `qemu-system-x86_64 -machine none` holds a qcow2 disk,
// a writable NBD export of it plays the guest, and the pull-mode sequence libvirt runs
// (persistent dirty bitmaps, a fleecing overlay behind blockdev-backup sync=none, an NBD
// export of it with the previous checkpoint's bitmap) serves each backup. The guest writes
// while a backup runs; every backup must read as the disk did when it began.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "testing/qemu_vm.h"
#include "testing/test_util.h"

namespace zqcow {
namespace {

using testing::CommandResult;
using testing::PullModeBackup;
using testing::QemuVm;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;
using testing::ZqcowBinary;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
// QEMU's dirty bitmaps default to a 64 KiB granularity for a qcow2 disk of 64 KiB clusters.
constexpr uint64_t kBitmapGranularity = 64 * kKiB;

std::string Q(const std::string& s) { return ShellQuote(s); }

// A guest write: `length` bytes of `pattern` at `offset` (pattern 0 writes zeroes).
struct GuestWrite {
  uint64_t offset;
  uint64_t length;
  int pattern;
};

void WriteThroughGuest(const std::string& uri, const std::vector<GuestWrite>& writes) {
  std::string command = "qemu-io -f raw";
  for (const GuestWrite& w : writes) {
    const std::string range = std::to_string(w.offset) + " " + std::to_string(w.length);
    command += w.pattern == 0 ? " -c " + Q("write -z " + range)
                              : " -c " + Q("write -P " + std::to_string(w.pattern) + " " + range);
  }
  CommandResult result = RunCommand(command + " " + Q(uri));
  ASSERT_EQ(result.exit_code, 0) << command << ": " << result.output;
}

// Random guest writes over [0, size): runs of data, single bytes, zeroes over data.
std::vector<GuestWrite> RandomWrites(std::mt19937_64& rng, uint64_t size, int count) {
  std::vector<GuestWrite> writes;
  for (int i = 0; i < count; ++i) {
    const int kind = static_cast<int>(rng() % 3);
    uint64_t length = kind == 1 ? 1 : 512 * (1 + rng() % 512);  // a byte, or up to 256 KiB
    uint64_t offset = rng() % size;
    if (kind != 1) offset &= ~uint64_t{511};
    length = std::min(length, size - offset);
    if (length == 0) continue;
    writes.push_back({offset, length, kind == 2 ? 0 : static_cast<int>(1 + rng() % 250)});
  }
  return writes;
}

// The bytes a backup may read at most for these writes with a bitmap: every dirty bitmap
// granule, plus one cluster per dirty extent for rounding.
uint64_t DirtyBound(const std::vector<GuestWrite>& writes, uint64_t cluster_size) {
  std::set<uint64_t> granules;
  for (const GuestWrite& w : writes) {
    for (uint64_t g = w.offset / kBitmapGranularity;
         g <= (w.offset + w.length - 1) / kBitmapGranularity; ++g) {
      granules.insert(g);
    }
  }
  return granules.size() * kBitmapGranularity + writes.size() * cluster_size;
}

// Snapshot of what the guest sees now, as a raw file (read over NBD by qemu-img).
void SaveGuestView(const std::string& uri, const std::string& raw) {
  CommandResult result = RunCommand("qemu-img convert -f raw -O raw " + Q(uri) + " " + Q(raw));
  ASSERT_EQ(result.exit_code, 0) << result.output;
}

nlohmann::json ZqcowBackupFrom(const std::string& uri, const std::string& out,
                               const std::string& previous, const std::string& bitmap) {
  std::string command = ZqcowBinary() + " convert -c -O qcow2 --output=json";
  if (!previous.empty()) command += " -B " + Q(previous) + " -F qcow2";
  if (!bitmap.empty()) command += " --bitmap " + Q(bitmap);
  CommandResult result = RunCommand(command + " " + Q(uri) + " " + Q(out));
  EXPECT_EQ(result.exit_code, 0) << command << ": " << result.output;
  nlohmann::json stats = nlohmann::json::parse(result.output, nullptr, false);
  return stats.is_discarded() ? nlohmann::json::object() : stats;
}

// The harness itself: the backup export reads as the disk did when the backup began.
void ExpectExportIs(const std::string& raw, const std::string& uri) {
  CommandResult compare = RunCommand("qemu-img compare -f raw -F raw " + Q(raw) + " " + Q(uri));
  EXPECT_EQ(compare.exit_code, 0) << uri << " against " << raw << ": " << compare.output;
}

void ExpectSame(const std::string& raw, const std::string& image) {
  CommandResult check = RunCommand("qemu-img check " + Q(image));
  EXPECT_EQ(check.exit_code, 0) << image << ": " << check.output;
  CommandResult compare = RunCommand("qemu-img compare -f raw -F qcow2 " + Q(raw) + " " + Q(image));
  EXPECT_EQ(compare.exit_code, 0) << image << " against " << raw << ": " << compare.output;
}

class LiveBackupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu()) << "qemu-utils missing: run scripts/setup";
    ASSERT_TRUE(testing::HaveQemuSystem()) << "qemu-system-x86 missing: run scripts/setup";
  }
  TempDir dir_;
};

// A full backup, then three incrementals, each taken while the guest writes, each equal to
// the disk as it was when that backup began; the disk grows before the third.
TEST_F(LiveBackupTest, PullModeFullThenIncrementalsWhileTheGuestWrites) {
  const uint64_t initial_size = 24 * kMiB + 3 * 512;  // not a multiple of the cluster size
  const std::string disk = dir_.File("disk.qcow2");
  CommandResult created =
      RunCommand("qemu-img create -q -f qcow2 " + Q(disk) + " " + std::to_string(initial_size));
  ASSERT_EQ(created.exit_code, 0) << created.output;
  // Initial contents, written before QEMU holds the disk.
  CommandResult filled = RunCommand(
      "qemu-io -f qcow2 -c 'write -P 0x11 0 4M' -c 'write -P 0x22 "
      "8M 3M' -c 'write -P 0x33 20M 1M' " +
      Q(disk));
  ASSERT_EQ(filled.exit_code, 0) << filled.output;

  std::unique_ptr<QemuVm> vm = QemuVm::Start(dir_.path());
  ASSERT_NE(vm, nullptr);
  PullModeBackup backup(*vm, disk, dir_.path());
  std::mt19937_64 rng(20261202);
  uint64_t size = initial_size;

  // Full backup: checkpoint b0 begins with it.
  const std::string full_expected = dir_.File("expected-0.raw");
  SaveGuestView(backup.GuestUri(), full_expected);
  backup.Begin("", "b0");
  const std::vector<GuestWrite> first_during = RandomWrites(rng, size, 20);
  ASSERT_NO_FATAL_FAILURE(WriteThroughGuest(backup.GuestUri(), first_during));
  ExpectExportIs(full_expected, backup.BackupUri());
  std::string previous = dir_.File("backup-0.qcow2");
  ZqcowBackupFrom(backup.BackupUri(), previous, "", "");
  backup.End("");
  ExpectSame(full_expected, previous);

  std::vector<GuestWrite> last_during = first_during;
  for (int round = 1; round <= 3; ++round) {
    if (round == 3) {
      size += 5 * kMiB + 512;
      backup.Resize(size);
    }
    // What changes between checkpoints: the writes made during the last backup, and these.
    std::vector<GuestWrite> writes = RandomWrites(rng, size, 12);
    if (round == 3) writes.push_back({initial_size + kMiB, 2 * kMiB, 0x5a});  // past the old end
    ASSERT_NO_FATAL_FAILURE(WriteThroughGuest(backup.GuestUri(), writes));

    const std::string expected = dir_.File("expected-" + std::to_string(round) + ".raw");
    SaveGuestView(backup.GuestUri(), expected);
    const std::string previous_bitmap = "b" + std::to_string(round - 1);
    backup.Begin(previous_bitmap, "b" + std::to_string(round));
    // The guest keeps writing while the backup reads: none of it may show in this backup.
    std::vector<GuestWrite> during = RandomWrites(rng, size, 16);
    ASSERT_NO_FATAL_FAILURE(WriteThroughGuest(backup.GuestUri(), during));

    ExpectExportIs(expected, backup.BackupUri());
    const std::string image = dir_.File("backup-" + std::to_string(round) + ".qcow2");
    nlohmann::json stats = ZqcowBackupFrom(backup.BackupUri(), image, previous, previous_bitmap);
    backup.End(previous_bitmap);
    ExpectSame(expected, image);
    // Only what bitmap b(round-1) marks is read: the writes made while the last backup ran
    // and those made since.
    std::vector<GuestWrite> dirty = writes;
    dirty.insert(dirty.end(), last_during.begin(), last_during.end());
    EXPECT_LE(stats.value("bytes_read", UINT64_MAX), DirtyBound(dirty, 64 * kKiB)) << stats.dump();
    last_during = during;
    previous = image;
  }
}

// The cron workflow against a live disk: `zqcow backup` keeps the chain (a full, then
// incrementals from the previous checkpoint's bitmap) and `zqcow verify` proves it.
TEST_F(LiveBackupTest, BackupCommandKeepsAVerifiedChainOfARunningDisk) {
  const uint64_t size = 16 * kMiB;
  const std::string disk = dir_.File("disk.qcow2");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 " + Q(disk) + " " + std::to_string(size))
                .exit_code,
            0);
  ASSERT_EQ(RunCommand("qemu-io -f qcow2 -c 'write -P 0x44 1M 5M' " + Q(disk)).exit_code, 0);
  std::unique_ptr<QemuVm> vm = QemuVm::Start(dir_.path());
  ASSERT_NE(vm, nullptr);
  PullModeBackup backup(*vm, disk, dir_.path());
  const std::string chain = dir_.File("chain");
  std::mt19937_64 rng(7);

  std::vector<std::string> expected;
  for (int round = 0; round < 3; ++round) {
    if (round > 0) {
      ASSERT_NO_FATAL_FAILURE(WriteThroughGuest(backup.GuestUri(), RandomWrites(rng, size, 8)));
    }
    expected.push_back(dir_.File("point-" + std::to_string(round) + ".raw"));
    SaveGuestView(backup.GuestUri(), expected.back());
    const std::string previous = round == 0 ? "" : "c" + std::to_string(round - 1);
    backup.Begin(previous, "c" + std::to_string(round));
    ASSERT_NO_FATAL_FAILURE(WriteThroughGuest(backup.GuestUri(), RandomWrites(rng, size, 8)));
    std::string command = ZqcowBinary() + " backup --name vda --output=json -o compression_type=zstd";
    command += round == 0 ? " --level full" : " --level inc --bitmap " + previous;
    CommandResult ran = RunCommand(command + " " + Q(backup.BackupUri()) + " " + Q(chain));
    backup.End(previous);
    ASSERT_EQ(ran.exit_code, 0) << command << ": " << ran.output;
    nlohmann::json entry = nlohmann::json::parse(ran.output, nullptr, false);
    ASSERT_FALSE(entry.is_discarded()) << ran.output;
    EXPECT_EQ(entry.value("level", ""), round == 0 ? "full" : "inc") << ran.output;
    ExpectSame(expected.back(), chain + "/" + entry.value("file", std::string("?")));
  }
  CommandResult verified = RunCommand(ZqcowBinary() + " verify " + Q(chain));
  EXPECT_EQ(verified.exit_code, 0) << verified.output;
}

}  // namespace
}  // namespace zqcow
