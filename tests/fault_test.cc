// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// I/O faults and durability, with the fault-injecting File (src/io/fault_file.h).
//
// Faults: Convert with ConvertOptions::wrap_target_file. A clean run counts the target's
// writes and syncs; then for every N from 1 to that count the Nth write fails (EIO, then
// ENOSPC), and separately the Nth sync. Convert must return kIOError / kNoSpace (never OK,
// never hang); the target (the clean run's image, replaced with --force only once a new
// one is complete) is left byte for byte as it was; the partial image is left either
// without a valid header or consistent (`qemu-img check`: no corruption) and marked
// incomplete (dirty), and then --resume (without faults) finishes it into an image equal
// to the source that `qemu-img check` finds clean.
//
// Durability: the Image API on a fault-injecting file that tracks unsynced writes; after a
// successful Flush() more writes follow, then a simulated power failure (Crash()) at a random
// point. The reopened image has no corruption, every byte written before the last
// successful Flush() reads back exactly, and every cluster written after it reads as either
// its old or its new content.

#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "codec/codec.h"
#include "format/endian.h"
#include "format/header.h"
#include "io/fault_file.h"
#include "io/file.h"
#include "qcow2/qcow2_image.h"
#include "testing/test_util.h"
#include "zqcow/convert.h"
#include "zqcow/image.h"

namespace zqcow {
namespace {

using io::FaultController;
using testing::ReadWholeFile;
using testing::TempDir;
using Op = FaultController::Op;

// A conversion of a few MiB takes well under a second; this only catches hangs.
constexpr auto kHangLimit = std::chrono::seconds(60);
// Fault points tried per (operation, errno): every N when the clean run has at most this
// many operations, otherwise evenly spread N (first and last always included).
constexpr uint64_t kMaxFaultPoints = 120;

struct Geometry {
  std::string name;
  uint64_t source_size;
  uint32_t cluster_size;
  bool direct_io;
};
void PrintTo(const Geometry& g, std::ostream* os) { *os << g.name; }

bool HasQcowMagic(const std::string& path) {
  std::vector<uint8_t> bytes = ReadWholeFile(path);
  return bytes.size() >= 4 && format::LoadBE32(bytes.data()) == format::kQcowMagic;
}

class FaultTest : public ::testing::TestWithParam<Geometry> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu());
    source_ = dir_.File("source.raw");
    target_ = dir_.File("target.qcow2");
    testing::WriteRawImage(source_, GetParam().source_size, testing::DataKind::kMixed,
                           /*seed=*/11, GetParam().cluster_size);
  }

  ConvertOptions Options(std::shared_ptr<FaultController> controller) const {
    ConvertOptions options;
    options.compress = true;
    options.cluster_size = GetParam().cluster_size;
    options.workers = 2;
    options.overwrite = true;
    options.target_io.direct_io = GetParam().direct_io;
    if (controller != nullptr) {
      options.wrap_target_file = [controller](std::unique_ptr<io::File> file) {
        return io::MakeFaultInjectingFile(std::move(file), controller);
      };
    }
    return options;
  }

  // Runs Convert on another thread so that a hang fails the test instead of blocking it.
  Result<ConvertStats> RunConvert(const ConvertOptions& options) {
    auto future =
        std::async(std::launch::async, [&] { return Convert(source_, target_, options); });
    if (future.wait_for(kHangLimit) != std::future_status::ready) {
      std::fprintf(stderr, "fault_test: Convert hung\n");
      std::_Exit(1);  // the thread cannot be cancelled
    }
    return future.get();
  }

  // After a failed conversion: the old target untouched; the partial image without a
  // header, or consistent and marked incomplete, and then resumable.
  void VerifyFailedTarget(const std::string& where) {
    SCOPED_TRACE(where);
    EXPECT_TRUE(ReadWholeFile(target_) == clean_target_) << "a failed conversion changed DST";
    const std::string partial = PartialTargetPath(target_);
    if (access(partial.c_str(), F_OK) != 0 || !HasQcowMagic(partial)) return;
    auto check = testing::QemuImgCheck(partial);
    ASSERT_TRUE(check.exit_code == 0 || check.exit_code == 3)
        << "corruption after a failed conversion:\n"
        << check.output;
    auto info = ReadImageInfo(partial);
    ASSERT_TRUE(info.ok()) << info.status().message();
    EXPECT_TRUE(info->dirty) << "a failed conversion left an image that looks complete";

    ConvertOptions resume = Options(nullptr);
    resume.resume = true;
    auto resumed = RunConvert(resume);
    ASSERT_TRUE(resumed.ok()) << "resume after a failed conversion: " << resumed.status().message();
    EXPECT_EQ(testing::QemuImgCheck(target_).exit_code, 0);
    EXPECT_EQ(testing::QemuImgCompare(source_, "raw", target_, "qcow2").exit_code, 0);
    EXPECT_NE(access(partial.c_str(), F_OK), 0);
    testing::WriteWholeFile(target_, clean_target_);  // the next fault point's old DST
    ++resumed_;
  }

  void FailEveryNth(Op op, uint64_t count, int err, Status::Code expected_code) {
    const uint64_t stride = (count + kMaxFaultPoints - 1) / kMaxFaultPoints;
    uint64_t fired = 0;
    for (uint64_t n = 1; n <= count; n = (n + stride > count && n != count) ? count : n + stride) {
      const std::string where = std::string(op == Op::kWrite ? "write " : "sync ") +
                                std::to_string(n) + "/" + std::to_string(count) + " fails with " +
                                std::strerror(err);
      auto controller = std::make_shared<FaultController>();
      controller->FailNth(op, n, err);
      auto result = RunConvert(Options(controller));
      if (!controller->fired()) {
        // Fewer operations than in the clean run (the order of workers varies): only then
        // may the conversion succeed. It replaced DST (with the same content, laid out in
        // another order): put the old DST back for the next fault point.
        ASSERT_TRUE(result.ok()) << where << ": " << result.status().message();
        EXPECT_EQ(testing::QemuImgCompare(source_, "raw", target_, "qcow2").exit_code, 0);
        testing::WriteWholeFile(target_, clean_target_);
        continue;
      }
      ++fired;
      ASSERT_FALSE(result.ok()) << where << ": Convert returned OK after an injected fault";
      EXPECT_EQ(result.status().code(), expected_code)
          << where << ": " << result.status().message();
      EXPECT_NE(result.status().message().find(target_), std::string::npos)
          << where << ": " << result.status().message();
      VerifyFailedTarget(where);
      if (HasFatalFailure()) return;
    }
    EXPECT_GT(fired, 0u) << "no injected fault ever fired";
  }

  TempDir dir_;
  std::string source_;
  std::string target_;
  std::vector<uint8_t> clean_target_;  // the clean run's image: DST during the fault runs
  uint64_t resumed_ = 0;               // failed conversions resumed
};

TEST_P(FaultTest, EveryFailedWriteOrSyncIsReportedAndHarmless) {
  auto clean = std::make_shared<FaultController>();
  auto result = RunConvert(Options(clean));
  ASSERT_TRUE(result.ok()) << result.status().message();
  EXPECT_EQ(testing::QemuImgCheck(target_).exit_code, 0);
  EXPECT_EQ(testing::QemuImgCompare(source_, "raw", target_, "qcow2").exit_code, 0);
  clean_target_ = ReadWholeFile(target_);
  const uint64_t writes = clean->count(Op::kWrite);
  const uint64_t syncs = clean->count(Op::kSync);
  ASSERT_GT(writes, 0u);
  ASSERT_GT(syncs, 0u) << "a conversion that never syncs is not durable";
  std::printf("  clean run: %llu writes, %llu syncs\n", static_cast<unsigned long long>(writes),
              static_cast<unsigned long long>(syncs));

  FailEveryNth(Op::kWrite, writes, EIO, Status::Code::kIOError);
  if (HasFatalFailure()) return;
  FailEveryNth(Op::kWrite, writes, ENOSPC, Status::Code::kNoSpace);
  if (HasFatalFailure()) return;
  FailEveryNth(Op::kSync, syncs, EIO, Status::Code::kIOError);
  // Not vacuous: failures left partial images with a header, and they were resumed.
  EXPECT_GT(resumed_, 0u);
}

INSTANTIATE_TEST_SUITE_P(Geometries, FaultTest,
                         ::testing::Values(Geometry{"Clusters64K", 4u << 20, 65536, false},
                                           Geometry{"Clusters64KDirect", 4u << 20, 65536, true},
                                           Geometry{"Clusters4K", 1u << 20, 4096, false}),
                         [](const ::testing::TestParamInfo<Geometry>& info) {
                           return info.param.name;
                         });

// ---- Durability -------------------------------------------------------------------------

constexpr uint64_t kDurabilityClusters = 48;
constexpr int kDurabilityRounds = 12;
constexpr int kOpsPerRound = 40;

class DurabilityTest : public ::testing::TestWithParam<uint32_t> {};

TEST_P(DurabilityTest, CrashAfterFlushKeepsEverythingFlushed) {
  const uint32_t cluster_size = GetParam();
  const uint64_t clusters = kDurabilityClusters;
  auto compressor = codec::MakeCompressor(codec::CompressionType::kDeflate,
                                          codec::DefaultLevel(codec::CompressionType::kDeflate));
  ASSERT_TRUE(compressor.ok());
  for (int round = 0; round < kDurabilityRounds; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    TempDir dir;
    const std::string path = dir.File("image.qcow2");
    std::mt19937_64 rng(1000 + round);
    auto controller = std::make_shared<FaultController>();
    controller->TrackUnsynced(true);
    io::FileOptions file_options;
    file_options.writable = true;
    file_options.create = true;
    file_options.truncate = true;
    auto file = io::OpenFile(path, file_options);
    ASSERT_TRUE(file.ok()) << file.status().message();
    CreateOptions create;
    create.virtual_size = clusters * cluster_size;
    create.cluster_size = cluster_size;
    auto image = qcow2::CreateImageOnFile(io::MakeFaultInjectingFile(std::move(*file), controller),
                                          create, IoOptions());
    ASSERT_TRUE(image.ok()) << image.status().message();

    // durable: content as of the last successful Flush; pending: written since.
    std::map<uint64_t, std::vector<uint8_t>> durable, pending;
    const int crash_at = static_cast<int>(rng() % kOpsPerRound);
    bool flushed_once = false;
    for (int op = 0; op < kOpsPerRound && (op < crash_at || !flushed_once); ++op) {
      const unsigned what = static_cast<unsigned>(rng() % 8);
      if (what == 0) {
        ASSERT_TRUE((*image)->Flush().ok());
        for (auto& [c, data] : pending) durable[c] = std::move(data);
        pending.clear();
        flushed_once = true;
        continue;
      }
      // Each cluster is written at most once between flushes, whole.
      uint64_t c = rng() % clusters;
      if (pending.count(c)) continue;
      std::vector<uint8_t> data = testing::MakeData(
          what % 2 ? testing::DataKind::kText : testing::DataKind::kRandom, cluster_size, rng());
      if (what % 2) {
        std::vector<uint8_t> compressed(cluster_size - 1);
        auto n = (*compressor)->Compress(data, compressed);
        ASSERT_TRUE(n.ok());
        if (*n > 0) {
          compressed.resize(*n);
          ASSERT_TRUE((*image)->WriteCompressed(c * cluster_size, compressed).ok());
          pending[c] = std::move(data);
          continue;
        }
      }
      ASSERT_TRUE((*image)->Write(c * cluster_size, data).ok());
      pending[c] = std::move(data);
    }
    ASSERT_TRUE(controller->Crash().ok());
    (void)(*image)->Close();  // fails: the "power" is gone; nothing more reaches the file
    image->reset();

    auto check = testing::QemuImgCheck(path);
    ASSERT_TRUE(check.exit_code == 0 || check.exit_code == 3) << "corruption after a crash:\n"
                                                              << check.output;
    auto reopened = Image::Open(path, OpenOptions{});
    ASSERT_TRUE(reopened.ok()) << reopened.status().message();
    auto zq_check = CheckImage(path);
    ASSERT_TRUE(zq_check.ok()) << zq_check.status().message();
    EXPECT_EQ(zq_check->corruptions, 0u);
    EXPECT_TRUE(zq_check->incomplete) << "a crashed image must be marked incomplete";
    std::vector<uint8_t> got(cluster_size);
    const std::vector<uint8_t> zeros(cluster_size, 0);
    for (uint64_t c = 0; c < clusters; ++c) {
      ASSERT_TRUE((*reopened)->Read(c * cluster_size, got).ok());
      const std::vector<uint8_t>& old = durable.count(c) ? durable[c] : zeros;
      if (pending.count(c)) {
        EXPECT_TRUE(got == old || got == pending[c])
            << "cluster " << c << " written after the last flush reads as neither old nor new";
      } else {
        EXPECT_TRUE(got == old) << "cluster " << c << " lost data written before the flush";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(ClusterSizes, DurabilityTest, ::testing::Values(65536u, 4096u),
                         [](const ::testing::TestParamInfo<uint32_t>& info) {
                           return "Clusters" + std::to_string(info.param / 1024) + "K";
                         });

}  // namespace
}  // namespace zqcow
