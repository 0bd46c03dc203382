// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// End-to-end tests of `zqcow prune` and `zqcow backup --keep` on small chains, judged by
// qemu-img: every point that remains restores byte for byte, every image checks clean,
// `zqcow verify` accepts the directory.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "testing/backup_chain.h"
#include "testing/test_util.h"
#include "zqcow/backup.h"

namespace zqcow {
namespace {

using testing::BackupChain;
using testing::CommandResult;
using testing::ReadWholeFile;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;

constexpr uint64_t kDiskSize = 8 << 20;

class PruneTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(testing::HaveQemu()); }

  // `points` backups (a full, then incrementals unless `levels` says otherwise).
  void MakeChain(int points, const std::vector<std::string>& levels = {}) {
    for (int i = 0; i < points; ++i) {
      if (i > 0) chain_.ChangeDisk(i);
      const std::string level = i < static_cast<int>(levels.size()) ? levels[i] : "auto";
      CommandResult r = chain_.Backup("--level " + level);
      ASSERT_EQ(r.exit_code, 0) << r.output;
    }
  }
  CommandResult Prune(const std::string& options) {
    return BackupChain::Zqcow("prune " + options + " " + ShellQuote(chain_.dir()));
  }
  nlohmann::json PruneJson(const std::string& options) {
    CommandResult r = Prune("--output=json " + options);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    nlohmann::json j = nlohmann::json::parse(r.output, nullptr, false);
    EXPECT_TRUE(j.is_object()) << r.output;
    return j;
  }
  std::vector<std::string> ListedFiles() {
    std::vector<std::string> files;
    for (const nlohmann::json& image : chain_.ListedImages()) files.push_back(image["file"]);
    return files;
  }
  // `rounds` backups with `options` (a --keep `keep`), the disk changed between them:
  // after each, DIR holds min(round, keep) points, their images and nothing else, and
  // once the prune removes something the backup says so.
  void BackupRounds(int rounds, const std::string& options, size_t keep) {
    for (int round = 0; round < rounds; ++round) {
      if (round > 0) chain_.ChangeDisk(round);
      CommandResult r = chain_.Backup(options);
      ASSERT_EQ(r.exit_code, 0) << r.output;
      const size_t points = static_cast<size_t>(round) + 1;
      EXPECT_EQ(chain_.ListedImages().size(), std::min(points, keep)) << r.output;
      if (points > keep) {
        EXPECT_NE(r.output.find(": removed"), std::string::npos) << r.output;
      }
      ExpectOnlyListedFiles();
    }
  }
  // What DIR should hold: the listed images, the manifest and the lock, nothing else.
  void ExpectOnlyListedFiles() {
    std::vector<std::string> expected = ListedFiles();
    expected.push_back(".zqcow-backup.lock");
    expected.push_back("zqcow-manifest.json");
    std::sort(expected.begin(), expected.end());
    EXPECT_EQ(chain_.Files(), expected);
  }

  TempDir tmp_;
  BackupChain chain_{tmp_.path(), kDiskSize};
};

TEST_F(PruneTest, PruneToTwoOfFivePointsMergesIntoAFull) {
  MakeChain(5);
  nlohmann::json result = PruneJson("--keep 2");
  EXPECT_EQ(result["points_before"], 5);
  EXPECT_EQ(result["points_after"], 2);
  EXPECT_EQ(result["dry_run"], false);
  EXPECT_EQ(result["merged"], "vm-0003-inc.qcow2");
  EXPECT_EQ(result["merged_from"],
            (std::vector<std::string>{"vm-0000-full.qcow2", "vm-0001-inc.qcow2",
                                      "vm-0002-inc.qcow2", "vm-0003-inc.qcow2"}));
  EXPECT_EQ(result["removed"], (std::vector<std::string>{"vm-0000-full.qcow2", "vm-0001-inc.qcow2",
                                                         "vm-0002-inc.qcow2"}));
  std::vector<nlohmann::json> images = chain_.ListedImages();
  ASSERT_EQ(images.size(), 2u);
  EXPECT_EQ(images[0]["file"], "vm-0003-inc.qcow2");
  EXPECT_EQ(images[0]["level"], "full");
  EXPECT_EQ(images[0]["backing_file"], "");
  EXPECT_EQ(images[1]["backing_file"], "vm-0003-inc.qcow2");
  EXPECT_FALSE(chain_.Manifest().contains("pending_merge"));
  ExpectOnlyListedFiles();
  chain_.ExpectSoundAndRestorable("after prune --keep 2");

  // The merged image stands alone, compressed, and restores byte for byte.
  const std::string merged = chain_.Image("vm-0003-inc.qcow2");
  CommandResult info = RunCommand("qemu-img info --output=json " + ShellQuote(merged));
  nlohmann::json j = nlohmann::json::parse(info.output, nullptr, false);
  ASSERT_TRUE(j.is_object()) << info.output;
  EXPECT_FALSE(j.contains("backing-filename")) << info.output;
  for (const std::string file : {"vm-0003-inc.qcow2", "vm-0004-inc.qcow2"}) {
    const std::string raw = tmp_.File(file + ".raw");
    CommandResult conv = RunCommand("qemu-img convert -O raw " + ShellQuote(chain_.Image(file)) +
                                    " " + ShellQuote(raw));
    ASSERT_EQ(conv.exit_code, 0) << conv.output;
    const std::string snapshot =
        tmp_.File(file == "vm-0003-inc.qcow2" ? "snapshot-3" : "snapshot-4");
    CommandResult cmp = RunCommand("cmp " + ShellQuote(snapshot) + " " + ShellQuote(raw));
    EXPECT_EQ(cmp.exit_code, 0) << file << ": " << cmp.output;
  }

  // The chain goes on from the merged image; a second prune merges again.
  chain_.ChangeDisk(7);
  ASSERT_EQ(chain_.Backup().exit_code, 0);
  EXPECT_EQ(chain_.ListedImages().back()["backing_file"], "vm-0004-inc.qcow2");
  nlohmann::json again = PruneJson("--keep 1");
  EXPECT_EQ(again["merged"], "vm-0005-inc.qcow2");
  ExpectOnlyListedFiles();
  chain_.ExpectSoundAndRestorable("after prune --keep 1");
}

TEST_F(PruneTest, KeepingAtLeastEveryPointChangesNothing) {
  MakeChain(3);
  const std::vector<uint8_t> manifest = ReadWholeFile(chain_.dir() + "/zqcow-manifest.json");
  for (const char* keep : {"3", "10"}) {
    CommandResult r = Prune(std::string("--keep ") + keep);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("nothing to prune"), std::string::npos) << r.output;
  }
  EXPECT_EQ(ReadWholeFile(chain_.dir() + "/zqcow-manifest.json"), manifest);
  ExpectOnlyListedFiles();
}

TEST_F(PruneTest, KeepZeroAndBadUsageAreRefused) {
  MakeChain(2);
  CommandResult zero = Prune("--keep 0");
  EXPECT_NE(zero.exit_code, 0);
  EXPECT_NE(zero.output.find("--keep 0"), std::string::npos) << zero.output;
  CommandResult missing = Prune("");
  EXPECT_NE(missing.exit_code, 0) << missing.output;
  CommandResult backup_zero = chain_.Backup("--keep 0");
  EXPECT_NE(backup_zero.exit_code, 0) << backup_zero.output;
  CommandResult no_dir = BackupChain::Zqcow("prune --keep 1 " + ShellQuote(tmp_.File("nope")));
  EXPECT_EQ(no_dir.exit_code, 1);
  EXPECT_NE(no_dir.output.find(tmp_.File("nope")), std::string::npos) << no_dir.output;
  EXPECT_EQ(chain_.ListedImages().size(), 2u);
}

TEST_F(PruneTest, DryRunPrintsThePlanAndChangesNothing) {
  MakeChain(4);
  const std::vector<uint8_t> manifest = ReadWholeFile(chain_.dir() + "/zqcow-manifest.json");
  const std::vector<std::string> files = chain_.Files();
  CommandResult human = Prune("--keep 2 --dry-run");
  EXPECT_EQ(human.exit_code, 0) << human.output;
  EXPECT_NE(human.output.find("vm-0002-inc.qcow2: would be merged"), std::string::npos)
      << human.output;
  EXPECT_NE(human.output.find("vm-0000-full.qcow2: would be removed"), std::string::npos)
      << human.output;
  nlohmann::json plan = PruneJson("--keep 2 --dry-run");
  EXPECT_EQ(plan["dry_run"], true);
  EXPECT_EQ(plan["merged"], "vm-0002-inc.qcow2");
  EXPECT_EQ(plan["removed"].size(), 2u);
  EXPECT_EQ(ReadWholeFile(chain_.dir() + "/zqcow-manifest.json"), manifest);
  EXPECT_EQ(chain_.Files(), files);
}

// Several chains: N counts points across the directory; a chain whose points all go is
// removed whole, the oldest kept chain's base is merged forward only when needed.
TEST_F(PruneTest, OlderChainsGoWholeAndTheKeptChainIsMergedOnlyWhenNeeded) {
  MakeChain(5, {"full", "inc", "full", "inc", "inc"});
  const std::string first_chain = chain_.ListedImages()[0]["chain_id"];
  nlohmann::json result = PruneJson("--keep 3");
  EXPECT_EQ(result["merged"], "");
  EXPECT_EQ(result["dropped_chains"], (std::vector<std::string>{first_chain}));
  EXPECT_EQ(result["removed"],
            (std::vector<std::string>{"vm-0000-full.qcow2", "vm-0001-inc.qcow2"}));
  EXPECT_EQ(ListedFiles(), (std::vector<std::string>{"vm-0002-full.qcow2", "vm-0003-inc.qcow2",
                                                     "vm-0004-inc.qcow2"}));
  ExpectOnlyListedFiles();
  chain_.ExpectSoundAndRestorable("after prune --keep 3");
  nlohmann::json more = PruneJson("--keep 2");
  EXPECT_EQ(more["merged"], "vm-0003-inc.qcow2");
  EXPECT_EQ(more["dropped_chains"].size(), 0u);
  ExpectOnlyListedFiles();
  chain_.ExpectSoundAndRestorable("after prune --keep 2");
}

TEST_F(PruneTest, BackupKeepPrunesAfterEachBackup) {
  BackupRounds(5, "--keep 2", 2);
  // Still one chain of incrementals (the merged full at its base), never a new full.
  std::vector<nlohmann::json> images = chain_.ListedImages();
  EXPECT_EQ(images[0]["level"], "full");
  EXPECT_EQ(images[1]["level"], "inc");
  EXPECT_EQ(images[1]["file"], "vm-0004-inc.qcow2");
  chain_.ExpectSoundAndRestorable("after 5 backups with --keep 2");
}

// --max-incrementals below --keep: new chains start, older ones age out (merged, then whole).
TEST_F(PruneTest, BackupKeepWithMaxIncrementalsSpansChains) {
  BackupRounds(5, "--keep 3 --max-incrementals 1", 3);
  std::vector<nlohmann::json> images = chain_.ListedImages();
  ASSERT_EQ(images.size(), 3u);
  // Points 2 (full of chain B), 3 (its incremental) and 4 (full of chain C).
  EXPECT_EQ(images[0]["file"], "vm-0002-full.qcow2");
  EXPECT_EQ(images[1]["backing_file"], "vm-0002-full.qcow2");
  EXPECT_EQ(images[2]["level"], "full");
  EXPECT_NE(images[2]["chain_id"], images[0]["chain_id"]);
  chain_.ExpectSoundAndRestorable("after 5 backups with --keep 3 --max-incrementals 1");
}

TEST_F(PruneTest, ASecondPruneOrBackupWhileOneRunsIsRefused) {
  MakeChain(3);
  const int fd = open((chain_.dir() + "/.zqcow-backup.lock").c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(flock(fd, LOCK_EX | LOCK_NB), 0);  // as a running prune or backup holds it
  CommandResult prune = Prune("--keep 1");
  CommandResult backup = chain_.Backup("--keep 1");
  close(fd);
  EXPECT_EQ(prune.exit_code, 1) << prune.output;
  EXPECT_NE(prune.output.find("another zqcow backup is running on this directory"),
            std::string::npos)
      << prune.output;
  EXPECT_EQ(backup.exit_code, 1) << backup.output;
  EXPECT_EQ(chain_.ListedImages().size(), 3u);
  ExpectOnlyListedFiles();
}

// The library entry point: a cancelled merge changes nothing and leaves no file behind;
// --keep 0 is refused; then the same call prunes.
TEST_F(PruneTest, CancelledPruneChangesNothing) {
  MakeChain(3);
  const std::vector<uint8_t> manifest = ReadWholeFile(chain_.dir() + "/zqcow-manifest.json");
  const std::vector<std::string> files = chain_.Files();
  std::atomic<bool> cancel{true};
  PruneOptions options;
  options.keep = 1;
  options.cancel = &cancel;
  Result<PruneResult> cancelled = zqcow::Prune(chain_.dir(), options);
  EXPECT_EQ(cancelled.status().code(), Status::Code::kInterrupted) << cancelled.status().ToString();
  EXPECT_EQ(ReadWholeFile(chain_.dir() + "/zqcow-manifest.json"), manifest);
  EXPECT_EQ(chain_.Files(), files);
  options.keep = 0;
  EXPECT_EQ(zqcow::Prune(chain_.dir(), options).status().code(), Status::Code::kInvalidArgument);
  options.keep = 1;
  cancel = false;
  Result<PruneResult> done = zqcow::Prune(chain_.dir(), options);
  ASSERT_TRUE(done.ok()) << done.status().ToString();
  EXPECT_EQ(done->merged, "vm-0002-inc.qcow2");
  EXPECT_EQ(done->removed.size(), 2u);
  ExpectOnlyListedFiles();
  chain_.ExpectSoundAndRestorable("after Prune(keep = 1)");
}

// An interrupted prune's merged full is checked, not trusted: verify compares it with the
// digest its pending record names.
TEST_F(PruneTest, VerifyChecksTheMergedFullOfAnInterruptedPrune) {
  MakeChain(3);
  // Crash point 4: after the merged full took vm-0001-inc.qcow2's place.
  CommandResult killed =
      RunCommand("ZQCOW_TEST_PRUNE_CRASH_AT=4 " + ShellQuote(testing::ZqcowBinary()) +
                 " prune --keep 2 " + ShellQuote(chain_.dir()));
  ASSERT_NE(killed.exit_code, 0) << killed.output;
  nlohmann::json manifest = chain_.Manifest();
  ASSERT_TRUE(manifest.contains("pending_merge")) << manifest.dump();
  EXPECT_EQ(manifest["pending_merge"]["file"], "vm-0001-inc.qcow2");
  CommandResult verify = BackupChain::Zqcow("verify " + ShellQuote(chain_.dir()));
  EXPECT_EQ(verify.exit_code, 0) << verify.output;
  EXPECT_NE(verify.output.find("already the merged full image of an interrupted prune"),
            std::string::npos)
      << verify.output;
  chain_.ExpectSoundAndRestorable("interrupted after the rename");

  std::string digest = manifest["pending_merge"]["content_digest"];
  digest.back() = digest.back() == '0' ? '1' : '0';
  manifest["pending_merge"]["content_digest"] = digest;
  testing::WriteWholeFile(chain_.dir() + "/zqcow-manifest.json", [&] {
    const std::string text = manifest.dump(2);
    return std::vector<uint8_t>(text.begin(), text.end());
  }());
  CommandResult tampered = BackupChain::Zqcow("verify " + ShellQuote(chain_.dir()));
  EXPECT_EQ(tampered.exit_code, 2) << tampered.output;
  EXPECT_NE(tampered.output.find("vm-0001-inc.qcow2: its guest content does not match"),
            std::string::npos)
      << tampered.output;
}

}  // namespace
}  // namespace zqcow
