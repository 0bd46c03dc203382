// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "backup/manifest.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "testing/test_util.h"

namespace zqcow::backup {
namespace {

BackupImage Entry(uint32_t sequence, const char* level, const std::string& chain,
                  const std::string& backing) {
  BackupImage image;
  image.file = ImageFileName("vm", sequence, level);
  image.sequence = sequence;
  image.level = level;
  image.chain_id = chain;
  image.backing_file = backing;
  image.source = "/dev/vg/vm";
  image.source_size = 8 << 20;
  image.virtual_size = 8 << 20;
  image.cluster_size = 65536;
  image.file_size = 123456;
  image.bytes_read = 4 << 20;
  image.bytes_written = 123456;
  image.start_time = "2026-12-02T03:00:00Z";
  image.end_time = "2026-12-02T03:00:01Z";
  image.content_digest = "v1:2:0000000000000001:0000000000000002";
  image.zqcow_version = "0.1.0";
  return image;
}

// full(a) <- inc <- inc, then full(b) <- inc.
Manifest TwoChains() {
  Manifest manifest;
  manifest.disk = "vm";
  manifest.images.push_back(Entry(0, kLevelFull, "a", ""));
  manifest.images.push_back(Entry(1, kLevelIncremental, "a", "vm-0000-full.qcow2"));
  manifest.images.push_back(Entry(2, kLevelIncremental, "a", "vm-0001-inc.qcow2"));
  manifest.images.push_back(Entry(3, kLevelFull, "b", ""));
  manifest.images.push_back(Entry(4, kLevelIncremental, "b", "vm-0003-full.qcow2"));
  return manifest;
}

void ExpectSame(const BackupImage& a, const BackupImage& b) {
  EXPECT_EQ(BackupImageToJson(a), BackupImageToJson(b));
}

TEST(ManifestTest, TextRoundTripsEveryField) {
  Manifest manifest = TwoChains();
  manifest.images[1].bitmap = "checkpoint-1";
  Result<Manifest> parsed = ParseManifest(ManifestToText(manifest), "m");
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(parsed->disk, "vm");
  ASSERT_EQ(parsed->images.size(), manifest.images.size());
  for (size_t i = 0; i < manifest.images.size(); ++i) {
    ExpectSame(parsed->images[i], manifest.images[i]);
  }
  EXPECT_EQ(parsed->images[1].bitmap, "checkpoint-1");
  EXPECT_EQ(parsed->images[4].backing_file, "vm-0003-full.qcow2");
}

TEST(ManifestTest, MalformedManifestsAreCorruptionNamingTheFile) {
  const std::string good = ManifestToText(TwoChains());
  auto without = [&](const std::string& key) {
    std::string text = good;
    const size_t at = text.find("\"" + key + "\"");
    const size_t end = text.find('\n', at);
    text.erase(at, end - at);  // the line (JSON may end with a dangling comma: also bad)
    return text;
  };
  for (const std::string& text :
       {std::string("not json"), std::string("{}"), std::string("[]"), without("content_digest"),
        without("file_size"), without("images"),
        std::string(R"({"format":"zqcow-backup-manifest","version":2,"disk":"vm","images":[]})"),
        std::string(R"({"format":"zqcow-backup-manifest","version":1,"disk":"vm",)"
                    R"("images":[{"file":"../etc/passwd"}]})")}) {
    Result<Manifest> parsed = ParseManifest(text, "/b/zqcow-manifest.json");
    ASSERT_FALSE(parsed.ok()) << text;
    EXPECT_TRUE(parsed.status().IsCorruption()) << parsed.status().ToString();
    EXPECT_NE(parsed.status().message().find("/b/zqcow-manifest.json"), std::string::npos);
  }
  Manifest escaping = TwoChains();
  escaping.images[0].file = "../outside.qcow2";
  EXPECT_FALSE(ParseManifest(ManifestToText(escaping), "m").ok());
}

TEST(ManifestTest, ChainProblemsFindEveryBrokenLink) {
  EXPECT_TRUE(ChainProblems(TwoChains()).empty());
  EXPECT_TRUE(ChainProblems(Manifest{.disk = "vm", .images = {}, .pending_merge = {}}).empty());

  Manifest wrong_backing = TwoChains();
  wrong_backing.images[2].backing_file = "vm-0000-full.qcow2";  // skips image 1
  EXPECT_EQ(ChainProblems(wrong_backing).size(), 1u);

  Manifest other_chain = TwoChains();
  other_chain.images[4].chain_id = "a";  // an increment of chain a after chain b began
  EXPECT_FALSE(ChainProblems(other_chain).empty());

  Manifest orphan = TwoChains();
  orphan.images.erase(orphan.images.begin());  // chain a lost its full image
  EXPECT_FALSE(ChainProblems(orphan).empty());

  Manifest twice = TwoChains();
  twice.images.push_back(twice.images[1]);
  EXPECT_FALSE(ChainProblems(twice).empty());

  Manifest backed_full = TwoChains();
  backed_full.images[3].backing_file = "vm-0002-inc.qcow2";
  EXPECT_FALSE(ChainProblems(backed_full).empty());

  Manifest reused_chain = TwoChains();
  reused_chain.images[3].chain_id = "a";
  reused_chain.images[4].chain_id = "a";
  EXPECT_FALSE(ChainProblems(reused_chain).empty());

  Manifest out_of_order = TwoChains();
  out_of_order.images[2].sequence = 1;
  EXPECT_FALSE(ChainProblems(out_of_order).empty());
}

TEST(ManifestTest, WriteIsAtomicAndReadBack) {
  testing::TempDir dir;
  EXPECT_TRUE(ReadManifest(dir.path()).status().IsNotFound());
  Manifest manifest = TwoChains();
  ASSERT_TRUE(WriteManifest(dir.path(), manifest).ok());
  manifest.images.pop_back();
  ASSERT_TRUE(WriteManifest(dir.path(), manifest).ok());
  Result<Manifest> read = ReadManifest(dir.path());
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  EXPECT_EQ(read->images.size(), 4u);
  // Nothing but the manifest is left behind.
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    names.push_back(entry.path().filename());
  }
  EXPECT_EQ(names, std::vector<std::string>{kBackupManifestName});
  // A manifest that cannot be parsed is an error, not "no manifest".
  std::ofstream(ManifestPath(dir.path())) << "{";
  EXPECT_TRUE(ReadManifest(dir.path()).status().IsCorruption());
}

// A prune's pending merge survives the text form, and applying it drops the images of that
// chain below the merged one, which becomes a full image; other chains stay.
TEST(ManifestTest, PendingMergeRoundTripsAndApplies) {
  Manifest manifest = TwoChains();
  manifest.pending_merge = PendingMerge{.file = "vm-0004-inc.qcow2",
                                        .file_size = 999,
                                        .content_digest = "v1:9:0000000000000003:0000000000000004"};
  Result<Manifest> parsed = ParseManifest(ManifestToText(manifest), "m");
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  ASSERT_TRUE(parsed->pending_merge.has_value());
  EXPECT_EQ(parsed->pending_merge->file, "vm-0004-inc.qcow2");
  EXPECT_EQ(parsed->pending_merge->file_size, 999u);
  EXPECT_FALSE(ParseManifest(ManifestToText(TwoChains()), "m")->pending_merge.has_value());

  Manifest applied = ApplyPendingMerge(*parsed);
  EXPECT_FALSE(applied.pending_merge.has_value());
  ASSERT_EQ(applied.images.size(), 4u);  // chain a untouched, b's full merged away
  EXPECT_EQ(applied.images[2].file, "vm-0002-inc.qcow2");
  const BackupImage& merged = applied.images[3];
  EXPECT_EQ(merged.file, "vm-0004-inc.qcow2");
  EXPECT_EQ(merged.level, kLevelFull);
  EXPECT_EQ(merged.backing_file, "");
  EXPECT_EQ(merged.file_size, 999u);
  EXPECT_EQ(merged.content_digest, "v1:9:0000000000000003:0000000000000004");
  EXPECT_EQ(merged.sequence, 4u);
  EXPECT_TRUE(ChainProblems(applied).empty());

  // A pending merge must name an incremental the manifest lists.
  for (const char* file : {"vm-0003-full.qcow2", "vm-0009-inc.qcow2"}) {
    manifest.pending_merge->file = file;
    EXPECT_TRUE(ParseManifest(ManifestToText(manifest), "m").status().IsCorruption()) << file;
  }
}

TEST(ManifestTest, NamesSortAndAreRecognised) {
  EXPECT_EQ(ImageFileName("vm", 0, kLevelFull), "vm-0000-full.qcow2");
  EXPECT_EQ(ImageFileName("vm", 12, kLevelIncremental), "vm-0012-inc.qcow2");
  EXPECT_EQ(ImageFileName("vm", 12345, kLevelIncremental), "vm-12345-inc.qcow2");
  EXPECT_TRUE(IsBackupFileName("vm", "vm-0003-inc.qcow2"));
  EXPECT_TRUE(IsBackupFileName("vm", "vm-0003-full.qcow2.zqcow-backup-partial"));
  EXPECT_TRUE(IsBackupFileName("vm", "vm-0003-full.qcow2.zqcow-backup-partial.zqcow-partial"));
  EXPECT_TRUE(IsBackupFileName("vm", "vm-12345-inc.qcow2"));
  EXPECT_TRUE(IsBackupFileName("vm", "vm-0003-inc.qcow2.zqcow-prune-partial"));
  EXPECT_TRUE(IsBackupFileName("vm", "vm-0003-inc.qcow2.zqcow-prune-partial.zqcow-partial"));
  EXPECT_TRUE(IsBackupFileName("vm", "vm-0003-inc.qcow2.zqcow-prune-partial.zqcow-partial.info"));
  EXPECT_TRUE(IsBackupFileName("vm", "vm-0003-full.qcow2.zqcow-backup-partial.zqcow-partial.info"));
  for (const char* other : {"vm-0003-inc.qcow2.info", "vm-0003-inc.qcow2.zqcow-prune-partial.info",
                            "vm-0003-inc.qcow2.zqcow-prune-partial.zqcow-backup-partial",
                            "vm.qcow2", "vm-3-inc.qcow2", "vm-00x3-inc.qcow2", "vm2-0003-inc.qcow2",
                            "vm-0003-diff.qcow2", "zqcow-manifest.json", "vm-0003-inc.qcow2.bak"}) {
    EXPECT_FALSE(IsBackupFileName("vm", other)) << other;
  }
}

TEST(ManifestTest, DiskNamesComeFromFilesAndExports) {
  EXPECT_EQ(DiskNameFromSource("/var/lib/libvirt/images/web01.qcow2"), "web01");
  EXPECT_EQ(DiskNameFromSource("/dev/vg0/db"), "db");
  EXPECT_EQ(DiskNameFromSource("nbd+unix:///backup?socket=/run/x.sock"), "backup");
  EXPECT_EQ(DiskNameFromSource("disk image.raw"), "disk_image");
  EXPECT_EQ(DiskNameFromSource("/"), "disk");
  EXPECT_EQ(DiskNameFromSource("nbd+unix://?socket=/s"), "disk");
  EXPECT_TRUE(IsPlainName("web-01.disk_a"));
  for (const char* bad : {"", ".", "..", "a/b", "a b", "vm*"})
    EXPECT_FALSE(IsPlainName(bad)) << bad;
  EXPECT_NE(NewChainId(), NewChainId());
  EXPECT_EQ(NewChainId().size(), 16u);
}

}  // namespace
}  // namespace zqcow::backup
