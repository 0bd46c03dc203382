// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A host backs up all its VMs at once: several conversions run together, into one target
// directory with O_DIRECT, from different disks and from one shared disk. Each must be
// exact (qemu-img is the judge) and stay within its memory bound. How fast they are
// together, and what they leave in the page cache, is measured by bench/bench-many.

#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
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
constexpr int kConversions = 8;
constexpr uint64_t kDiskSize = 6 * kMiB + 512;  // not a whole number of clusters
// A conversion's resident memory at defaults (the bound docs/CLI.md states).
constexpr uint64_t kPeakRssBound = 64 * kMiB;

std::string Q(const std::string& s) { return ShellQuote(s); }

std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Runs one `zqcow convert` per (source, target) pair, all at once, and checks each.
void ConvertAllAtOnce(const TempDir& dir, const std::vector<std::string>& sources,
                      const std::string& extra_options) {
  std::string script;
  for (size_t i = 0; i < sources.size(); ++i) {
    const std::string n = std::to_string(i);
    script += "( " + ZqcowBinary() + " convert -c -O qcow2 -t none " + extra_options +
              " --output=json " + Q(sources[i]) + " " + Q(dir.File("out/backup-" + n + ".qcow2")) +
              " >" + Q(dir.File("stats-" + n + ".json")) + " 2>" + Q(dir.File("err-" + n)) +
              "; echo $? >" + Q(dir.File("rc-" + n)) + " ) &\n";
  }
  script += "wait\n";
  CommandResult ran = RunCommand(script);
  ASSERT_EQ(ran.exit_code, 0) << ran.output;

  for (size_t i = 0; i < sources.size(); ++i) {
    SCOPED_TRACE("conversion " + std::to_string(i) + " of " + sources[i]);
    const std::string n = std::to_string(i);
    const std::string target = dir.File("out/backup-" + n + ".qcow2");
    EXPECT_EQ(ReadText(dir.File("rc-" + n)), "0\n") << ReadText(dir.File("err-" + n));
    CommandResult check = RunCommand("qemu-img check " + Q(target));
    EXPECT_EQ(check.exit_code, 0) << check.output;
    CommandResult compare =
        RunCommand("qemu-img compare -f raw -F qcow2 " + Q(sources[i]) + " " + Q(target));
    EXPECT_EQ(compare.exit_code, 0) << compare.output;
    nlohmann::json stats = nlohmann::json::parse(ReadText(dir.File("stats-" + n + ".json")),
                                                 nullptr, /*allow_exceptions=*/false);
    ASSERT_FALSE(stats.is_discarded()) << ReadText(dir.File("stats-" + n + ".json"));
    if (!testing::kSanitizerBuild) {
      EXPECT_LT(stats.value("peak_rss_bytes", UINT64_MAX), kPeakRssBound) << stats.dump();
    }
  }
}

TEST(ManyBackupsTest, EightDisksIntoOneDirectoryAtOnce) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  ASSERT_EQ(RunCommand("mkdir " + Q(dir.File("out"))).exit_code, 0);
  std::vector<std::string> sources;
  for (int i = 0; i < kConversions; ++i) {
    sources.push_back(dir.File("disk-" + std::to_string(i) + ".raw"));
    WriteRawImage(sources.back(), kDiskSize, DataKind::kMixed, /*seed=*/100 + i);
  }
  ConvertAllAtOnce(dir, sources, "");
}

TEST(ManyBackupsTest, EightBackupsOfOneDiskAtOnce) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  ASSERT_EQ(RunCommand("mkdir " + Q(dir.File("out"))).exit_code, 0);
  const std::string disk = dir.File("disk.raw");
  WriteRawImage(disk, kDiskSize, DataKind::kMixed, /*seed=*/7);
  // Readers share the source (each takes QEMU's shared read locks); zstd for variety.
  ConvertAllAtOnce(dir, std::vector<std::string>(kConversions, disk),
                   "-T none -o compression_type=zstd");
}

}  // namespace
}  // namespace zqcow
