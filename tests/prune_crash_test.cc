// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Kills `zqcow prune` at every step boundary (the test hook ZQCOW_TEST_PRUNE_CRASH_AT=N
// makes the prune SIGKILL itself at its Nth crash point, as `kill -9` or a power cut would
// stop it there) and at times spread over its run, and proves after each kill:
// - `zqcow verify DIR` exits 0;
// - every image the manifest lists reads exactly as the disk did at that backup, and
//   qemu-img check finds it clean;
// - the next `zqcow prune` (or `zqcow backup`) completes the job: the directory then holds
//   the kept points only, every one restorable, and nothing else.

#include <gtest/gtest.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "testing/backup_chain.h"
#include "testing/test_util.h"

namespace zqcow {
namespace {

using testing::BackupChain;
using testing::CommandResult;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;

constexpr uint64_t kDiskSize = 8 << 20;
constexpr int kMaxCrashPoints = 40;
constexpr int kExitKilled = 128 + 9;  // the shell's report of a child killed by SIGKILL

struct Scenario {
  std::string name;
  std::vector<std::string> levels;  // of the backups that make the chain
  unsigned keep = 0;
};
void PrintTo(const Scenario& s, std::ostream* os) { *os << s.name; }

class PruneCrashTest : public ::testing::TestWithParam<Scenario> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu());
    const Scenario& scenario = GetParam();
    for (size_t i = 0; i < scenario.levels.size(); ++i) {
      if (i > 0) chain_.ChangeDisk(static_cast<int>(i));
      CommandResult r = chain_.Backup("--level " + scenario.levels[i]);
      ASSERT_EQ(r.exit_code, 0) << r.output;
    }
    template_dir_ = chain_.dir();
  }

  std::string PruneCommand() const {
    return ShellQuote(testing::ZqcowBinary()) + " prune --keep " + std::to_string(GetParam().keep) +
           " " + ShellQuote(chain_.dir());
  }

  // After a killed prune: sound; then `finish` (a prune, or a backup) completes the job.
  void ExpectRecovers(const std::string& where, bool finish_with_backup) {
    chain_.ExpectSoundAndRestorable(where + ", killed");
    const unsigned keep = GetParam().keep;
    CommandResult next = finish_with_backup ? chain_.Backup("--keep " + std::to_string(keep))
                                            : RunCommand(PruneCommand());
    ASSERT_EQ(next.exit_code, 0) << where << ": " << next.output;
    chain_.ExpectSoundAndRestorable(where + ", then completed");
    std::vector<nlohmann::json> images = chain_.ListedImages();
    EXPECT_EQ(images.size(), keep) << where;
    EXPECT_FALSE(chain_.Manifest().contains("pending_merge")) << where;
    std::vector<std::string> expected = {".zqcow-backup.lock", "zqcow-manifest.json"};
    for (const nlohmann::json& image : images) expected.push_back(image["file"]);
    std::sort(expected.begin(), expected.end());
    EXPECT_EQ(chain_.Files(), expected) << where;
  }

  TempDir tmp_;
  BackupChain chain_{tmp_.path(), kDiskSize};
  std::string template_dir_;
};

TEST_P(PruneCrashTest, KilledAtEveryStepTheChainVerifiesRestoresAndCompletes) {
  int point = 1;
  for (; point <= kMaxCrashPoints; ++point) {
    const std::string where = "crash point " + std::to_string(point);
    chain_.UseCopy(template_dir_, tmp_.File("work"));
    CommandResult run =
        RunCommand("ZQCOW_TEST_PRUNE_CRASH_AT=" + std::to_string(point) + " " + PruneCommand());
    if (run.exit_code == 0) break;  // the prune ran past its last crash point
    ASSERT_TRUE(run.exit_code == kExitKilled || run.exit_code == -1) << where << ": " << run.output;
    ExpectRecovers(where, /*finish_with_backup=*/point % 2 == 0);
    if (HasFatalFailure()) return;
  }
  // A merge has 5 crash points before its removals; a prune without one has 1.
  EXPECT_GT(point, 2) << "the prune never reached a crash point";
  EXPECT_LE(point, kMaxCrashPoints) << "the prune never finished";
}

// Kills from outside, at times spread over the run (inside the merge's conversion too).
TEST_P(PruneCrashTest, KilledAtAnyTimeTheChainVerifiesRestoresAndCompletes) {
  for (int delay_ms : {5, 30, 80, 150, 400}) {
    const std::string where = "killed after " + std::to_string(delay_ms) + " ms";
    chain_.UseCopy(template_dir_, tmp_.File("work"));
    CommandResult run =
        RunCommand("timeout -s KILL " + std::to_string(delay_ms / 1000.0) + " " + PruneCommand());
    ASSERT_TRUE(run.exit_code == 0 || run.exit_code == kExitKilled || run.exit_code == -1)
        << where << ": " << run.output;
    ExpectRecovers(where, /*finish_with_backup=*/false);
    if (HasFatalFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Chains, PruneCrashTest,
    ::testing::Values(Scenario{"MergeOneChain", {"full", "inc", "inc", "inc", "inc"}, 2},
                      Scenario{"KeepOnlyTheLast", {"full", "inc", "inc"}, 1},
                      Scenario{"DropAChainAndMerge", {"full", "inc", "full", "inc", "inc"}, 2}),
    [](const ::testing::TestParamInfo<Scenario>& info) { return info.param.name; });

}  // namespace
}  // namespace zqcow
