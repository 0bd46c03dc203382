// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Power failure at every sync point of a workload (writes, compressed writes, overwrites,
// discards, zeroes, flushes, close): whatever was not synced is undone, and the image left
// behind must pass qemu-img check with leaks at most (exit 0 or 3), never corruption.

#include <gtest/gtest.h>

#include <cerrno>
#include <functional>
#include <memory>
#include <string>

#include "format/endian.h"
#include "io/fault_file.h"
#include "io/file.h"
#include "qcow2/image_test_util.h"
#include "qcow2/qcow2_image.h"
#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow::qcow2 {
namespace {

using testing::NewCompressor;
using zqcow::testing::DataKind;
using zqcow::testing::MakeData;
using zqcow::testing::TempDir;

constexpr uint32_t kClusterSize = 4096;
constexpr uint64_t kClusters = 64;

// The workload; stops at the first error (the injected fault).
void Workload(Image* image) {
  auto compressor = NewCompressor(image->compression());
  auto write = [&](uint64_t c, uint64_t seed) {
    auto kind = seed % 4 == 0 ? DataKind::kRandom : DataKind::kText;
    return testing::WriteCluster(image, compressor.get(), c * kClusterSize,
                                 MakeData(kind, kClusterSize, seed));
  };
  for (uint64_t c = 0; c < 24; ++c) {
    if (!write(c, c).ok()) return;
  }
  if (!image->Flush().ok()) return;
  for (uint64_t c = 4; c < 12; ++c) {
    if (!write(c, 100 + c).ok()) return;
  }
  if (!image->Discard(12 * kClusterSize, 3 * kClusterSize).ok()) return;
  if (!image->WriteZeroes(16 * kClusterSize, 2 * kClusterSize).ok()) return;
  if (!image->Flush().ok()) return;
  for (uint64_t c = 30; c < kClusters; ++c) {
    if (!write(c, 200 + c).ok()) return;
  }
  (void)image->Close();
}

struct CrashRun {
  std::string path;
  std::shared_ptr<io::FaultController> controller = std::make_shared<io::FaultController>();
  std::unique_ptr<Image> image;
};

struct Scenario {
  bool direct_io = false;
  CreateOptions create;
  IoOptions io;
  std::function<void(Image*)> workload;
  std::function<void(const std::string&)> after_dry_run;  // optional: checks the clean run
};

void Start(CrashRun* run, const std::string& path, const Scenario& scenario) {
  run->path = path;
  io::FileOptions options;
  options.writable = true;
  options.create = true;
  options.direct_io = scenario.direct_io;
  auto file = io::OpenFile(path, options);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  auto faulty = io::MakeFaultInjectingFile(std::move(file).value(), run->controller);
  auto image = CreateImageOnFile(std::move(faulty), scenario.create, scenario.io);
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  run->image = std::move(image).value();
  run->controller->TrackUnsynced(true);
}

// Runs the workload once to count its syncs, then once per sync with that sync failing
// followed by a power failure; every image left behind must have leaks at most.
void CrashAtEverySync(const Scenario& scenario) {
  TempDir dir;
  uint64_t syncs = 0;
  {
    CrashRun dry;
    Start(&dry, dir.File("dry.qcow2"), scenario);
    uint64_t before = dry.controller->count(io::FaultController::Op::kSync);
    scenario.workload(dry.image.get());
    syncs = dry.controller->count(io::FaultController::Op::kSync) - before;
    auto check = zqcow::testing::QemuImgCheck(dry.path);
    EXPECT_EQ(check.exit_code, 0) << check.output;
    if (scenario.after_dry_run) scenario.after_dry_run(dry.path);
  }
  ASSERT_GT(syncs, 3u);
  for (uint64_t k = 1; k <= syncs; ++k) {
    SCOPED_TRACE("crash at sync " + std::to_string(k) + " of " + std::to_string(syncs));
    CrashRun run;
    Start(&run, dir.File("crash" + std::to_string(k) + ".qcow2"), scenario);
    run.controller->FailNth(io::FaultController::Op::kSync, k, EIO);
    scenario.workload(run.image.get());
    ASSERT_TRUE(run.controller->fired());
    ASSERT_TRUE(run.controller->Crash().ok());
    run.image.reset();
    auto check = zqcow::testing::QemuImgCheck(run.path);
    EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.output;
  }
}

class ImageCrashTest : public ::testing::TestWithParam<bool> {};

TEST_P(ImageCrashTest, PowerFailureAtEverySyncLeavesLeaksAtMost) {
  Scenario scenario;
  scenario.direct_io = GetParam();
  scenario.create.virtual_size = kClusters * kClusterSize;
  scenario.create.cluster_size = kClusterSize;
  scenario.io.metadata_cache_bytes = 1;
  scenario.io.direct_io = scenario.direct_io;  // kAuto: the write cache is on with O_DIRECT
  scenario.workload = Workload;
  CrashAtEverySync(scenario);
}

INSTANTIATE_TEST_SUITE_P(BufferedAndDirect, ImageCrashTest, ::testing::Bool());

// The refcount table outgrows its first cluster (512-byte clusters, 64-bit refcounts: one
// table cluster covers 4096 host clusters) between two flushes.
TEST(ImageCrashGrowthTest, PowerFailureDuringRefcountTableGrowth) {
  constexpr uint32_t kSmallCluster = 512;
  constexpr uint64_t kGuestClusters = 64;
  constexpr int kRounds = 80;
  Scenario scenario;
  scenario.create.virtual_size = kGuestClusters * kSmallCluster;
  scenario.create.cluster_size = kSmallCluster;
  scenario.create.refcount_bits = 64;
  // Write everything, discard everything, again and again: every round allocates fresh
  // clusters (allocation is append-only), far beyond what the first table covers.
  scenario.workload = [](Image* image) {
    auto data = MakeData(DataKind::kRandom, kSmallCluster, 1);
    for (int round = 0; round < kRounds; ++round) {
      if (round == kRounds / 2 && !image->Flush().ok()) return;
      for (uint64_t c = 0; c < kGuestClusters; ++c) {
        data[0] = static_cast<uint8_t>(c + round);
        if (!image->Write(c * kSmallCluster, data).ok()) return;
      }
      if (round + 1 < kRounds && !image->Discard(0, kGuestClusters * kSmallCluster).ok()) return;
    }
    (void)image->Close();
  };
  scenario.after_dry_run = [](const std::string& path) {
    auto header = zqcow::testing::ReadWholeFile(path);
    ASSERT_GE(header.size(), 56u);
    EXPECT_NE(format::LoadBE64(header.data() + 48), uint64_t{kSmallCluster})
        << "the refcount table did not move";
  };
  CrashAtEverySync(scenario);
}

}  // namespace
}  // namespace zqcow::qcow2
