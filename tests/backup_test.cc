// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// End-to-end tests of `zqcow backup` and `zqcow verify` on small raw disks, judged by
// qemu-img; and of Backup() failing half-way (a fault, a cancel) leaving the chain as it was.

#include "zqcow/backup.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "backup/image_digest.h"
#include "io/fault_file.h"
#include "testing/test_util.h"
#include "zqcow/convert.h"

namespace zqcow {
namespace {

using testing::CommandResult;
using testing::ReadWholeFile;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;
using testing::WriteWholeFile;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kDiskSize = 12 * kMiB;
constexpr int kExitBad = 2;

std::string Q(const std::string& s) { return ShellQuote(s); }
CommandResult Zqcow(const std::string& args) {
  return RunCommand(testing::ZqcowBinary() + " " + args);
}

uint64_t ReadBE64(const std::vector<uint8_t>& bytes, size_t offset) {
  uint64_t value = 0;
  for (size_t i = 0; i < 8; ++i) value = (value << 8) | bytes.at(offset + i);
  return value;
}

// Host offset of the first compressed cluster's data in a qcow2 file (header: cluster_bits
// at 20, l1_size at 36, l1_table_offset at 40; L2 entry bit 62 = compressed, the low 62 -
// (cluster_bits - 8) bits = host offset), or 0 when there is none.
uint64_t FirstCompressedClusterOffset(const std::vector<uint8_t>& image) {
  const uint32_t cluster_bits = static_cast<uint32_t>(ReadBE64(image, 16) & 0xffffffff);
  const uint64_t l1_offset = ReadBE64(image, 40);
  const uint64_t l1_size = ReadBE64(image, 32) & 0xffffffff;  // l1_size at 36
  const uint64_t cluster_size = uint64_t{1} << cluster_bits;
  for (uint64_t i = 0; i < l1_size; ++i) {
    const uint64_t l2_offset = ReadBE64(image, l1_offset + 8 * i) & 0x00fffffffffffe00ull;
    if (l2_offset == 0) continue;
    for (uint64_t j = 0; j < cluster_size / 8; ++j) {
      const uint64_t entry = ReadBE64(image, l2_offset + 8 * j);
      if ((entry >> 62 & 1) == 0) continue;
      return entry & ((uint64_t{1} << (62 - (cluster_bits - 8))) - 1);
    }
  }
  return 0;
}

class BackupTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu());
    disk_ = tmp_.File("vm.img");
    dir_ = tmp_.File("backups");
    testing::WriteRawImage(disk_, kDiskSize, testing::DataKind::kMixed, 11);
  }

  // Writes `pattern` at `offset` of the disk, as a guest would between backups.
  void GuestWrite(uint64_t offset, uint64_t length, int pattern) {
    CommandResult r =
        RunCommand("qemu-io -f raw -c 'write -P " + std::to_string(pattern) + " " +
                   std::to_string(offset) + " " + std::to_string(length) + "' " + Q(disk_));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  CommandResult BackupCli(const std::string& options = "") {
    return Zqcow("backup " + options + " " + Q(disk_) + " " + Q(dir_));
  }
  // The manifest entry `backup --output=json` printed.
  nlohmann::json BackupJson(const std::string& options = "") {
    CommandResult r = BackupCli("--output=json " + options);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    const size_t brace = r.output.find('{');  // notes on stderr may come first
    if (brace == std::string::npos) return {};
    return nlohmann::json::parse(r.output.substr(brace), nullptr, false);
  }
  std::string Image(const std::string& name) { return dir_ + "/" + name; }
  void ExpectSameAsSnapshot(const std::string& image, const std::string& snapshot) {
    CommandResult r = testing::QemuImgCompare(snapshot, "raw", Image(image), "qcow2");
    EXPECT_EQ(r.exit_code, 0) << image << ": " << r.output;
  }
  std::string Snapshot(int n) {
    const std::string copy = tmp_.File("snapshot" + std::to_string(n));
    std::filesystem::copy_file(disk_, copy, std::filesystem::copy_options::overwrite_existing);
    return copy;
  }
  std::vector<std::string> FilesInDir() {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(dir_)) {
      names.push_back(entry.path().filename());
    }
    std::sort(names.begin(), names.end());
    return names;
  }
  // Whether `backup --level inc` works in this build (the incremental conversion may not be
  // there yet): tried on a scratch chain, so the test's own directory is untouched.
  TempDir tmp_;
  std::string disk_;
  std::string dir_;
};

TEST_F(BackupTest, FullBackupMatchesTheDiskAndVerifies) {
  nlohmann::json entry = BackupJson("-o compression_type=zstd");
  ASSERT_TRUE(entry.is_object());
  EXPECT_EQ(entry["level"], "full");
  EXPECT_EQ(entry["file"], "vm-0000-full.qcow2");
  EXPECT_EQ(entry["backing_file"], "");
  EXPECT_EQ(entry["virtual_size"], kDiskSize);
  EXPECT_GT(entry["bytes_read"].get<uint64_t>(), 0u);
  EXPECT_EQ(entry["file_size"], std::filesystem::file_size(Image("vm-0000-full.qcow2")));
  EXPECT_EQ(entry["chain_id"].get<std::string>().size(), 16u);
  EXPECT_FALSE(entry["zqcow_version"].get<std::string>().empty());
  ExpectSameAsSnapshot("vm-0000-full.qcow2", disk_);
  EXPECT_EQ(testing::QemuImgCheck(Image("vm-0000-full.qcow2")).exit_code, 0);
  EXPECT_EQ(FilesInDir(), (std::vector<std::string>{".zqcow-backup.lock", "vm-0000-full.qcow2",
                                                    "zqcow-manifest.json"}));

  CommandResult verify = Zqcow("verify " + Q(dir_));
  EXPECT_EQ(verify.exit_code, 0) << verify.output;
  EXPECT_NE(verify.output.find("vm-0000-full.qcow2: ok"), std::string::npos) << verify.output;
  CommandResult json = Zqcow("verify --output=json " + Q(dir_));
  EXPECT_EQ(json.exit_code, 0) << json.output;
  nlohmann::json report = nlohmann::json::parse(json.output, nullptr, false);
  ASSERT_TRUE(report.is_object()) << json.output;
  EXPECT_EQ(report["verdict"], "ok");
  // The digest verify recomputes from the image is the one the backup took off the source.
  EXPECT_EQ(report["images"][0]["computed_digest"], entry["content_digest"]);

  // A second full starts a second chain; both verify.
  nlohmann::json second = BackupJson("--level full");
  EXPECT_EQ(second["file"], "vm-0001-full.qcow2");
  EXPECT_NE(second["chain_id"], entry["chain_id"]);
  EXPECT_EQ(second["content_digest"], entry["content_digest"]);  // same disk, same content
  EXPECT_EQ(Zqcow("verify " + Q(dir_)).exit_code, 0);
}

TEST_F(BackupTest, FlippedByteInACompressedClusterFailsVerify) {
  ASSERT_EQ(BackupCli().exit_code, 0);
  const std::string image = Image("vm-0000-full.qcow2");
  std::vector<uint8_t> bytes = ReadWholeFile(image);
  const uint64_t offset = FirstCompressedClusterOffset(bytes);
  ASSERT_NE(offset, 0u);
  bytes.at(offset + 2) ^= 0x10;  // early in the deflate stream (its tail may be slack)
  WriteWholeFile(image, bytes);
  CommandResult verify = Zqcow("verify " + Q(dir_));
  EXPECT_EQ(verify.exit_code, kExitBad) << verify.output;
  EXPECT_NE(verify.output.find("vm-0000-full.qcow2: bad"), std::string::npos) << verify.output;
  EXPECT_NE(verify.output.find("FAILED"), std::string::npos) << verify.output;
}

TEST_F(BackupTest, TruncatedImageFailsVerify) {
  ASSERT_EQ(BackupCli().exit_code, 0);
  const std::string image = Image("vm-0000-full.qcow2");
  std::filesystem::resize_file(image, std::filesystem::file_size(image) - 4096);
  CommandResult verify = Zqcow("verify " + Q(dir_));
  EXPECT_EQ(verify.exit_code, kExitBad) << verify.output;
  EXPECT_NE(verify.output.find("truncated"), std::string::npos) << verify.output;
}

TEST_F(BackupTest, ImageOfAnotherChainFailsVerify) {
  ASSERT_EQ(BackupCli().exit_code, 0);
  // Another disk of the same size backed up elsewhere, copied over this chain's image.
  const std::string other_disk = tmp_.File("other.img");
  testing::WriteRawImage(other_disk, kDiskSize, testing::DataKind::kMixed, 12);
  const std::string other_dir = tmp_.File("other-backups");
  CommandResult other = Zqcow("backup --name vm " + Q(other_disk) + " " + Q(other_dir));
  ASSERT_EQ(other.exit_code, 0) << other.output;
  std::filesystem::copy_file(other_dir + "/vm-0000-full.qcow2", Image("vm-0000-full.qcow2"),
                             std::filesystem::copy_options::overwrite_existing);
  CommandResult verify = Zqcow("verify " + Q(dir_));
  EXPECT_EQ(verify.exit_code, kExitBad) << verify.output;
  EXPECT_NE(verify.output.find("vm-0000-full.qcow2: bad"), std::string::npos) << verify.output;
}

TEST_F(BackupTest, VerifyWithoutAManifestCannotRun) {
  std::filesystem::create_directory(dir_);
  CommandResult verify = Zqcow("verify " + Q(dir_));
  EXPECT_EQ(verify.exit_code, 1) << verify.output;
  EXPECT_NE(verify.output.find("zqcow-manifest.json"), std::string::npos) << verify.output;
}

TEST_F(BackupTest, IncrementalWithoutAChainIsRefused) {
  CommandResult r = BackupCli("--level inc");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("cannot take an incremental backup"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/zqcow-manifest.json"));
}

TEST_F(BackupTest, StalePartialFilesAreReportedThenRemoved) {
  ASSERT_EQ(BackupCli().exit_code, 0);
  const std::string stale = Image("vm-0001-inc.qcow2.zqcow-backup-partial");
  WriteWholeFile(stale, std::vector<uint8_t>(4096, 1));
  const std::string unlisted = Image("vm-0001-inc.qcow2");  // renamed, manifest not updated
  WriteWholeFile(unlisted, std::vector<uint8_t>(4096, 2));
  const std::string foreign = Image("notes.txt");
  WriteWholeFile(foreign, std::vector<uint8_t>(10, 'x'));
  CommandResult verify = Zqcow("verify " + Q(dir_));
  EXPECT_EQ(verify.exit_code, 0) << verify.output;
  EXPECT_NE(verify.output.find("not in the manifest"), std::string::npos) << verify.output;
  CommandResult next = BackupCli("--level full");
  EXPECT_EQ(next.exit_code, 0) << next.output;
  EXPECT_NE(next.output.find("removed"), std::string::npos) << next.output;
  EXPECT_FALSE(std::filesystem::exists(stale));
  EXPECT_FALSE(std::filesystem::exists(unlisted));
  EXPECT_TRUE(std::filesystem::exists(foreign));
  EXPECT_TRUE(std::filesystem::exists(Image("vm-0001-full.qcow2")));
}

TEST_F(BackupTest, OneBackupPerDirectoryAtATime) {
  ASSERT_EQ(BackupCli().exit_code, 0);
  int fd = open((dir_ + "/.zqcow-backup.lock").c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(flock(fd, LOCK_EX | LOCK_NB), 0);
  CommandResult r = BackupCli("--level full");
  close(fd);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("another zqcow backup is running"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(Image("vm-0001-full.qcow2")));
}

// A backup that fails half-way (a write error, a cancel, a missing source) adds nothing,
// leaves no partial file, and the next one continues the chain from the last good image.
TEST_F(BackupTest, FailedBackupsNeverJoinTheChain) {
  BackupOptions options;
  options.level = BackupLevel::kFull;
  Result<BackupResult> first = Backup(disk_, dir_, options);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  const std::string manifest = ReadWholeFile(dir_ + "/" + kBackupManifestName).size() > 0
                                   ? std::string(dir_ + "/" + kBackupManifestName)
                                   : "";
  const std::vector<uint8_t> manifest_before = ReadWholeFile(manifest);
  const std::vector<std::string> files_before = FilesInDir();

  auto controller = std::make_shared<io::FaultController>();
  controller->FailNth(io::FaultController::Op::kWrite, 3, EIO);
  BackupOptions faulty = options;
  faulty.convert.wrap_target_file = [controller](std::unique_ptr<io::File> file) {
    return io::MakeFaultInjectingFile(std::move(file), controller);
  };
  Result<BackupResult> failed = Backup(disk_, dir_, faulty);
  EXPECT_FALSE(failed.ok());
  EXPECT_TRUE(controller->fired());
  EXPECT_EQ(ReadWholeFile(manifest), manifest_before);
  EXPECT_EQ(FilesInDir(), files_before);

  std::atomic<bool> cancel{true};
  BackupOptions cancelled = options;
  cancelled.convert.cancel = &cancel;
  Result<BackupResult> interrupted = Backup(disk_, dir_, cancelled);
  EXPECT_EQ(interrupted.status().code(), Status::Code::kInterrupted)
      << interrupted.status().ToString();
  EXPECT_EQ(ReadWholeFile(manifest), manifest_before);
  EXPECT_EQ(FilesInDir(), files_before);

  Result<BackupResult> no_source = Backup(tmp_.File("gone.img"), dir_, options);
  EXPECT_TRUE(no_source.status().IsNotFound()) << no_source.status().ToString();
  EXPECT_EQ(ReadWholeFile(manifest), manifest_before);

  Result<BackupResult> next = Backup(disk_, dir_, BackupOptions());
  ASSERT_TRUE(next.ok() || next.status().code() == Status::Code::kNotSupported)
      << next.status().ToString();
  if (next.ok()) {
    EXPECT_EQ(next->image.sequence, 1u);
    EXPECT_EQ(next->image.backing_file, "vm-0000-full.qcow2");
  } else {
    // This build cannot write incrementals yet: it says so and adds nothing.
    EXPECT_EQ(ReadWholeFile(manifest), manifest_before);
    EXPECT_EQ(FilesInDir(), files_before);
  }
  CommandResult verify = Zqcow("verify " + Q(dir_));
  EXPECT_EQ(verify.exit_code, 0) << verify.output;
}

// Full, then incrementals: every point of the chain reads as the disk did then.
TEST_F(BackupTest, IncrementalChainRestoresEveryPoint) {
  std::vector<std::string> snapshots;
  nlohmann::json full = BackupJson();
  EXPECT_EQ(full["level"], "full");
  snapshots.push_back(Snapshot(0));
  GuestWrite(1 * kMiB, 64 * 1024, 0x31);
  GuestWrite(9 * kMiB + 4096, 8192, 0x32);  // part of a cluster
  nlohmann::json inc1 = BackupJson();
  snapshots.push_back(Snapshot(1));
  EXPECT_EQ(inc1["level"], "inc");
  EXPECT_EQ(inc1["backing_file"], "vm-0000-full.qcow2");
  EXPECT_EQ(inc1["chain_id"], full["chain_id"]);
  GuestWrite(2 * kMiB, 128 * 1024, 0);  // data became zeros
  GuestWrite(5 * kMiB, 64 * 1024, 0x33);
  nlohmann::json inc2 = BackupJson("--level inc");
  snapshots.push_back(Snapshot(2));
  EXPECT_EQ(inc2["backing_file"], "vm-0001-inc.qcow2");
  const std::vector<std::string> images = {"vm-0000-full.qcow2", "vm-0001-inc.qcow2",
                                           "vm-0002-inc.qcow2"};
  for (size_t i = 0; i < images.size(); ++i) {
    ExpectSameAsSnapshot(images[i], snapshots[i]);
    EXPECT_EQ(testing::QemuImgCheck(Image(images[i])).exit_code, 0) << images[i];
  }
  // The incrementals hold only what changed.
  EXPECT_LT(inc1["file_size"].get<uint64_t>(), full["file_size"].get<uint64_t>());
  CommandResult verify = Zqcow("verify " + Q(dir_));
  EXPECT_EQ(verify.exit_code, 0) << verify.output;
}

TEST_F(BackupTest, MissingOrSwappedMiddleImageFailsVerify) {
  ASSERT_EQ(BackupCli().exit_code, 0);
  for (int i = 1; i <= 2; ++i) {
    GuestWrite(i * kMiB, 64 * 1024, 0x40 + i);
    ASSERT_EQ(BackupCli().exit_code, 0);
  }
  const std::string middle = Image("vm-0001-inc.qcow2");
  const std::string last = Image("vm-0002-inc.qcow2");
  const std::string aside = tmp_.File("aside");
  std::filesystem::rename(middle, aside);
  CommandResult missing = Zqcow("verify " + Q(dir_));
  EXPECT_EQ(missing.exit_code, kExitBad) << missing.output;
  EXPECT_NE(missing.output.find("vm-0001-inc.qcow2: missing"), std::string::npos) << missing.output;

  std::filesystem::rename(last, middle);  // swapped: the last image in the middle's place
  std::filesystem::rename(aside, last);
  CommandResult swapped = Zqcow("verify " + Q(dir_));
  EXPECT_EQ(swapped.exit_code, kExitBad) << swapped.output;
  EXPECT_NE(swapped.output.find("vm-0001-inc.qcow2: bad"), std::string::npos) << swapped.output;
  // Same sizes, so only the headers tell: no incremental is built on the swapped chain.
  ASSERT_EQ(std::filesystem::file_size(middle), std::filesystem::file_size(last));
  CommandResult inc = BackupCli("--level inc");
  EXPECT_EQ(inc.exit_code, 1) << inc.output;
  EXPECT_NE(inc.output.find("not the one the manifest lists"), std::string::npos) << inc.output;
  CommandResult automatic = BackupCli();
  EXPECT_EQ(automatic.exit_code, 0) << automatic.output;
  EXPECT_NE(automatic.output.find("taking a full backup"), std::string::npos) << automatic.output;
  EXPECT_TRUE(std::filesystem::exists(Image("vm-0003-full.qcow2")));
}

TEST_F(BackupTest, ShorterSourceIsAnErrorForIncAndAFullForAuto) {
  ASSERT_EQ(BackupCli().exit_code, 0);
  std::filesystem::resize_file(disk_, kDiskSize - kMiB);
  CommandResult inc = BackupCli("--level inc");
  EXPECT_EQ(inc.exit_code, 1) << inc.output;
  EXPECT_NE(inc.output.find("shorter than"), std::string::npos) << inc.output;
  EXPECT_EQ(FilesInDir().size(), 3u);  // lock, full image, manifest
  CommandResult automatic = BackupCli();
  EXPECT_EQ(automatic.exit_code, 0) << automatic.output;
  EXPECT_NE(automatic.output.find("taking a full backup"), std::string::npos) << automatic.output;
  EXPECT_TRUE(std::filesystem::exists(Image("vm-0001-full.qcow2")));
  ExpectSameAsSnapshot("vm-0001-full.qcow2", disk_);
  EXPECT_EQ(Zqcow("verify " + Q(dir_)).exit_code, 0);

  // The last image gone: auto starts over, inc refuses.
  std::filesystem::remove(Image("vm-0001-full.qcow2"));
  CommandResult gone = BackupCli("--level inc");
  EXPECT_EQ(gone.exit_code, 1) << gone.output;
  EXPECT_NE(gone.output.find("vm-0001-full.qcow2"), std::string::npos) << gone.output;
}

// The digest the pipeline takes off the source equals the one recomputed from the image,
// whichever way the clusters were read and written (a raw source read by the reader thread,
// a qcow2 source read by the workers, stored uncompressed, a partial last cluster).
TEST(ContentDigestPipelineTest, ConvertDigestMatchesTheImage) {
  TempDir tmp;
  const std::string raw = tmp.File("odd.img");
  testing::WriteRawImage(raw, 5 * kMiB + 3 * 4096 + 512, testing::DataKind::kMixed, 5);
  const std::string qcow2 = tmp.File("src.qcow2");
  CommandResult made = RunCommand("qemu-img convert -f raw -O qcow2 " + Q(raw) + " " + Q(qcow2));
  ASSERT_EQ(made.exit_code, 0) << made.output;
  struct Case {
    std::string source;
    bool compress;
    uint32_t cluster_size;
  };
  for (const Case& c : {Case{raw, true, 65536}, Case{raw, false, 65536}, Case{qcow2, true, 65536},
                        Case{raw, true, 4096}, Case{qcow2, false, 16384}}) {
    SCOPED_TRACE(c.source + (c.compress ? " compressed " : " stored ") +
                 std::to_string(c.cluster_size));
    ConvertOptions options;
    options.compress = c.compress;
    options.cluster_size = c.cluster_size;
    options.overwrite = true;
    const std::string target = tmp.File("out.qcow2");
    Result<ConvertStats> stats = Convert(c.source, target, options);
    ASSERT_TRUE(stats.ok()) << stats.status().ToString();
    Result<digest::ContentDigest> recomputed = backup::DigestImageClusters(target);
    ASSERT_TRUE(recomputed.ok()) << recomputed.status().ToString();
    EXPECT_EQ(recomputed->ToString(), stats->content_digest);
    // Every written cluster is in it, the ones left unallocated as zero are not.
    EXPECT_EQ(recomputed->clusters, stats->clusters_compressed + stats->clusters_uncompressed);
    EXPECT_GT(stats->clusters_zero, 0u);
  }
}

TEST(BackupCliHelpTest, BackupAndVerifyHaveHelp) {
  for (const char* command : {"backup", "verify"}) {
    CommandResult r = Zqcow(std::string(command) + " --help");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("Usage"), std::string::npos) << r.output;
  }
  CommandResult bad_level = Zqcow("backup --level weekly a b");
  EXPECT_EQ(bad_level.exit_code, 1) << bad_level.output;
  EXPECT_NE(bad_level.output.find("--level"), std::string::npos) << bad_level.output;
}

}  // namespace
}  // namespace zqcow
