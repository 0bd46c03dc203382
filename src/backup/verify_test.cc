// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// VerifyChain on chains built by qemu-img (so these run whether or not this build writes
// incrementals itself): a full image and two overlays, listed in a manifest whose digests
// are those of the images as built.

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>

#include "backup/image_digest.h"
#include "backup/manifest.h"
#include "testing/test_util.h"
#include "zqcow/backup.h"

namespace zqcow::backup {
namespace {

using testing::RunCommand;
using testing::ShellQuote;
using Verdict = VerifiedImage::Verdict;

constexpr uint64_t kDiskSize = 8 << 20;

class VerifyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu());
    const std::string disk = dir_.File("vm.img");
    testing::WriteRawImage(disk, kDiskSize, testing::DataKind::kMixed, 7);
    Run("qemu-img convert -c -f raw -O qcow2 " + Q(disk) + " " + Q(Path(0)));
    Add(0, kLevelFull, "");
    for (uint32_t sequence = 1; sequence <= 2; ++sequence) {
      const std::string backing = ImageFileName("vm", sequence - 1, sequence == 1 ? "full" : "inc");
      Run("qemu-img create -q -f qcow2 -b " + backing + " -F qcow2 " + Q(Path(sequence)));
      // A compressed cluster, a normal one and a zero cluster of its own.
      Run("qemu-io -f qcow2 -c 'write -c -P " + std::to_string(0x40 + sequence) + " 1M 64k' -c " +
          "'write -P 7 " + std::to_string(sequence * 2) + "M 64k' -c 'write -z 4M 64k' " +
          Q(Path(sequence)));
      Add(sequence, kLevelIncremental, backing);
    }
    ASSERT_TRUE(WriteManifest(dir_.path(), manifest_).ok());
  }

  std::string Q(const std::string& s) { return ShellQuote(s); }
  std::string Path(uint32_t sequence) {
    return dir_.File(ImageFileName("vm", sequence, sequence == 0 ? "full" : "inc"));
  }
  void Run(const std::string& command) {
    testing::CommandResult r = RunCommand(command);
    ASSERT_EQ(r.exit_code, 0) << command << "\n" << r.output;
  }
  void Add(uint32_t sequence, const char* level, const std::string& backing) {
    BackupImage image;
    image.file = ImageFileName("vm", sequence, level);
    image.sequence = sequence;
    image.level = level;
    image.chain_id = "c1";
    image.backing_file = backing;
    image.source_size = kDiskSize;
    image.virtual_size = kDiskSize;
    image.cluster_size = 65536;
    image.file_size = std::filesystem::file_size(Path(sequence));
    Result<digest::ContentDigest> digest = DigestImageClusters(Path(sequence));
    ASSERT_TRUE(digest.ok()) << digest.status().ToString();
    image.content_digest = digest->ToString();
    manifest_.disk = "vm";
    manifest_.images.push_back(image);
  }
  VerifyReport Verify() {
    Result<VerifyReport> report = VerifyChain(dir_.path());
    EXPECT_TRUE(report.ok()) << report.status().ToString();
    return report.ok() ? *report : VerifyReport();
  }
  static std::string Problems(const VerifiedImage& image) {
    std::string all;
    for (const std::string& problem : image.problems) all += problem + "\n";
    return all;
  }

  testing::TempDir dir_;
  Manifest manifest_;
};

TEST_F(VerifyTest, SoundChainVerifies) {
  VerifyReport report = Verify();
  ASSERT_EQ(report.images.size(), 3u);
  for (const VerifiedImage& image : report.images) {
    EXPECT_EQ(image.verdict, Verdict::kOk) << Problems(image);
    EXPECT_EQ(image.content_digest, image.image.content_digest);
  }
  EXPECT_EQ(report.verdict(), Verdict::kOk);
  // An overlay's digest covers its own three clusters only (zero cluster included).
  EXPECT_EQ(digest::ContentDigest::Parse(report.images[1].content_digest)->clusters, 3u);
}

TEST_F(VerifyTest, MissingMiddleImage) {
  std::filesystem::remove(Path(1));
  VerifyReport report = Verify();
  EXPECT_EQ(report.verdict(), Verdict::kBad);
  EXPECT_EQ(report.images[0].verdict, Verdict::kOk);
  EXPECT_NE(Problems(report.images[1]).find("missing"), std::string::npos)
      << Problems(report.images[1]);
  EXPECT_NE(Problems(report.images[2]).find("is broken"), std::string::npos)
      << Problems(report.images[2]);
}

TEST_F(VerifyTest, SwappedImages) {
  std::filesystem::rename(Path(1), dir_.File("t"));
  std::filesystem::rename(Path(2), Path(1));
  std::filesystem::rename(dir_.File("t"), Path(2));
  VerifyReport report = Verify();
  EXPECT_EQ(report.verdict(), Verdict::kBad);
  EXPECT_EQ(report.images[1].verdict, Verdict::kBad);
  EXPECT_EQ(report.images[2].verdict, Verdict::kBad);
}

TEST_F(VerifyTest, SameSizedImageOfOtherContent) {
  // Same backing file, same size, other data: only the digest can tell.
  const uint64_t size = std::filesystem::file_size(Path(2));
  Run("qemu-img create -q -f qcow2 -b vm-0001-inc.qcow2 -F qcow2 " + Q(dir_.File("other")));
  Run("qemu-io -f qcow2 -c 'write -c -P 0x99 1M 64k' -c 'write -P 8 4M 64k' -c "
      "'write -z 6M 64k' " +
      Q(dir_.File("other")));
  ASSERT_EQ(std::filesystem::file_size(dir_.File("other")), size);
  std::filesystem::rename(dir_.File("other"), Path(2));
  VerifyReport report = Verify();
  EXPECT_EQ(report.images[2].verdict, Verdict::kBad);
  EXPECT_NE(Problems(report.images[2]).find("another chain"), std::string::npos)
      << Problems(report.images[2]);
  EXPECT_EQ(report.images[1].verdict, Verdict::kOk);
}

TEST_F(VerifyTest, ManifestThatIsNoChainFails) {
  manifest_.images[2].backing_file = "vm-0000-full.qcow2";
  ASSERT_TRUE(WriteManifest(dir_.path(), manifest_).ok());
  VerifyReport report = Verify();
  EXPECT_EQ(report.verdict(), Verdict::kBad);
  EXPECT_FALSE(report.problems.empty());
}

TEST_F(VerifyTest, IncompleteImageIsReportedAsSuch) {
  // Set the dirty bit (incompatible feature bit 0, header byte 79).
  std::vector<uint8_t> bytes = testing::ReadWholeFile(Path(2));
  bytes[79] |= 1;
  testing::WriteWholeFile(Path(2), bytes);
  VerifyReport report = Verify();
  EXPECT_EQ(report.images[2].verdict, Verdict::kIncomplete) << Problems(report.images[2]);
  EXPECT_EQ(report.verdict(), Verdict::kIncomplete);
}

TEST_F(VerifyTest, NoManifestCannotRun) {
  std::filesystem::remove(ManifestPath(dir_.path()));
  EXPECT_TRUE(VerifyChain(dir_.path()).status().IsNotFound());
}

}  // namespace
}  // namespace zqcow::backup
