// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Power failure at every sync point of a workload (writes, compressed writes, overwrites,
// discards, zeroes, flushes, close): whatever was not synced is undone, and the image left
// behind must pass qemu-img check with leaks at most (exit 0 or 3), never corruption.

#include <gtest/gtest.h>

#include <cerrno>
#include <memory>
#include <string>

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

void Start(CrashRun* run, const std::string& path, bool direct_io) {
  run->path = path;
  io::FileOptions options;
  options.writable = true;
  options.create = true;
  options.direct_io = direct_io;
  auto file = io::OpenFile(path, options);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  auto faulty = io::MakeFaultInjectingFile(std::move(file).value(), run->controller);
  CreateOptions create;
  create.virtual_size = kClusters * kClusterSize;
  create.cluster_size = kClusterSize;
  IoOptions io;
  io.metadata_cache_bytes = 1;
  io.direct_io = direct_io;  // kAuto: the compressed write cache is on with O_DIRECT
  auto image = CreateImageOnFile(std::move(faulty), create, io);
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  run->image = std::move(image).value();
  run->controller->TrackUnsynced(true);
}

class ImageCrashTest : public ::testing::TestWithParam<bool> {};

TEST_P(ImageCrashTest, PowerFailureAtEverySyncLeavesLeaksAtMost) {
  const bool direct_io = GetParam();
  TempDir dir;
  uint64_t syncs = 0;
  {
    CrashRun dry;
    Start(&dry, dir.File("dry.qcow2"), direct_io);
    uint64_t before = dry.controller->count(io::FaultController::Op::kSync);
    Workload(dry.image.get());
    syncs = dry.controller->count(io::FaultController::Op::kSync) - before;
    auto check = zqcow::testing::QemuImgCheck(dry.path);
    EXPECT_EQ(check.exit_code, 0) << check.output;
  }
  ASSERT_GT(syncs, 3u);
  for (uint64_t k = 1; k <= syncs; ++k) {
    SCOPED_TRACE("crash at sync " + std::to_string(k) + " of " + std::to_string(syncs));
    CrashRun run;
    Start(&run, dir.File("crash" + std::to_string(k) + ".qcow2"), direct_io);
    run.controller->FailNth(io::FaultController::Op::kSync, k, EIO);
    Workload(run.image.get());
    ASSERT_TRUE(run.controller->fired());
    ASSERT_TRUE(run.controller->Crash().ok());
    run.image.reset();
    auto check = zqcow::testing::QemuImgCheck(run.path);
    EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.output;
  }
}

INSTANTIATE_TEST_SUITE_P(BufferedAndDirect, ImageCrashTest, ::testing::Bool());

}  // namespace
}  // namespace zqcow::qcow2
