// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A really full file system: `zqcow convert` onto an 8 MiB tmpfs (buffered) and a 16 MiB
// loop-mounted ext4 (buffered and O_DIRECT) of a source that cannot fit. The CLI must exit
// non-zero with a one-line message naming the target and "No space left on device", leave
// nothing at the target, and no partial image that `zqcow check` reports as complete (and
// nothing QEMU calls corrupt).
// Mounting needs root (CAP_SYS_ADMIN); without it the tests are skipped with the reason.

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "format/endian.h"
#include "format/header.h"
#include "testing/test_util.h"
#include "zqcow/convert.h"

namespace zqcow {
namespace {

using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;

constexpr uint64_t kSourceSize = 24ull << 20;  // incompressible: never fits in 8 or 16 MiB

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// A mounted file system that is unmounted (and its loop device released) on destruction.
class Mount {
 public:
  explicit Mount(std::string dir) : dir_(std::move(dir)) {}
  ~Mount() {
    if (!mounted_) return;
    if (RunCommand("umount " + ShellQuote(dir_)).exit_code != 0) {
      RunCommand("umount -l " + ShellQuote(dir_));
    }
  }
  Mount(const Mount&) = delete;
  Mount& operator=(const Mount&) = delete;

  // Returns "" on success, else why mounting failed.
  std::string Run(const std::string& mount_args) {
    auto r = RunCommand("mount " + mount_args + " " + ShellQuote(dir_));
    mounted_ = r.exit_code == 0;
    return mounted_ ? "" : Trim(r.output);
  }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  bool mounted_ = false;
};

class FullFsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "mounting a small file system needs root";
    source_ = dir_.File("source.raw");
    testing::WriteRawImage(source_, kSourceSize, testing::DataKind::kRandom, /*seed=*/5);
    mount_dir_ = dir_.File("mnt");
    ASSERT_EQ(mkdir(mount_dir_.c_str(), 0755), 0);
  }

  // `format`: "-c" (compressed qcow2) or "-O raw".
  void ConvertOntoFullFs(const std::string& target, const std::string& cache,
                         const std::string& format = "-c") {
    SCOPED_TRACE("-t " + cache + " " + format);
    auto r = RunCommand(ShellQuote(testing::ZqcowBinary()) + " convert " + format + " -t " + cache +
                        " --force " + ShellQuote(source_) + " " + ShellQuote(target));
    EXPECT_NE(r.exit_code, 0) << "convert onto a full file system succeeded:\n" << r.output;
    const std::string message = Trim(r.output);
    EXPECT_EQ(message.find('\n'), std::string::npos) << "not one line:\n" << message;
    EXPECT_NE(message.find(target), std::string::npos) << "does not name the target: " << message;
    EXPECT_NE(message.find("No space left on device"), std::string::npos) << message;

    EXPECT_NE(access(target.c_str(), F_OK), 0) << "a failed conversion left a file at DST";
    const std::string partial = PartialTargetPath(target);
    if (access(partial.c_str(), F_OK) == 0) {
      auto zq = RunCommand(ShellQuote(testing::ZqcowBinary()) + " check " + ShellQuote(partial));
      EXPECT_NE(zq.exit_code, 0) << "a failed conversion looks complete:\n" << zq.output;
      std::vector<uint8_t> bytes = testing::ReadWholeFile(partial);
      if (bytes.size() >= 4 && format::LoadBE32(bytes.data()) == format::kQcowMagic) {
        auto check = testing::QemuImgCheck(partial);
        EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.output;
      }
    }
  }

  TempDir dir_;
  std::string source_;
  std::string mount_dir_;
};

TEST_F(FullFsTest, TmpfsWriteback) {
  Mount mount(mount_dir_);
  const std::string error = mount.Run("-t tmpfs -o size=8m tmpfs");
  if (!error.empty()) GTEST_SKIP() << "cannot mount tmpfs: " << error;
  ConvertOntoFullFs(mount.dir() + "/target.qcow2", "writeback");
}

TEST_F(FullFsTest, LoopExt4DirectAndWriteback) {
  const std::string fs_image = dir_.File("ext4.img");
  auto mkfs = RunCommand("truncate -s 16M " + ShellQuote(fs_image) + " && mkfs.ext4 -q -F " +
                         ShellQuote(fs_image));
  if (mkfs.exit_code != 0) GTEST_SKIP() << "mkfs.ext4 failed: " << Trim(mkfs.output);
  Mount mount(mount_dir_);
  const std::string error = mount.Run("-o loop " + ShellQuote(fs_image));
  if (!error.empty()) GTEST_SKIP() << "cannot loop-mount ext4: " << error;
  ConvertOntoFullFs(mount.dir() + "/direct.qcow2", "none");
  RunCommand("rm -f " + ShellQuote(mount.dir() + "/direct.qcow2"));
  ConvertOntoFullFs(mount.dir() + "/writeback.qcow2", "writeback");
}

TEST_F(FullFsTest, RawOutputOntoTmpfsAndLoopExt4) {
  {
    Mount mount(mount_dir_);
    const std::string error = mount.Run("-t tmpfs -o size=8m tmpfs");
    if (!error.empty()) GTEST_SKIP() << "cannot mount tmpfs: " << error;
    ConvertOntoFullFs(mount.dir() + "/target.raw", "writeback", "-O raw");
  }
  const std::string fs_image = dir_.File("ext4.img");
  auto mkfs = RunCommand("truncate -s 16M " + ShellQuote(fs_image) + " && mkfs.ext4 -q -F " +
                         ShellQuote(fs_image));
  if (mkfs.exit_code != 0) GTEST_SKIP() << "mkfs.ext4 failed: " << Trim(mkfs.output);
  Mount mount(mount_dir_);
  const std::string error = mount.Run("-o loop " + ShellQuote(fs_image));
  if (!error.empty()) GTEST_SKIP() << "cannot loop-mount ext4: " << error;
  ConvertOntoFullFs(mount.dir() + "/direct.raw", "none", "-O raw");
}

}  // namespace
}  // namespace zqcow
