// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// zqcow and QEMU see each other's image locks, both ways: zqcow refuses to read, write or
// overwrite an image qemu-io or qemu-nbd writes (and reads it anyway with -U); qemu-img and
// qemu-io refuse an image zqcow writes; two zqcow writers of one target exclude each other
// and the first one's output stays valid.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "io/image_lock.h"
#include "testing/test_util.h"
#include "zqcow/convert.h"
#include "zqcow/image.h"

namespace zqcow {
namespace {

using testing::CommandResult;
using testing::DataKind;
using testing::ReadWholeFile;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;
using testing::WriteRawImage;
using testing::ZqcowBinary;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kSeed = 13;
constexpr auto kLockWait = std::chrono::seconds(20);
const std::string kWriteConflict = "Failed to get \"write\" lock";
const std::string kSharedWriteConflict = "Failed to get shared \"write\" lock";
const std::string kQuestion = "Is another process using the image";

std::string Q(const std::string& path) { return ShellQuote(path); }
CommandResult Zqcow(const std::string& args) { return RunCommand(ZqcowBinary() + " " + args); }

bool Contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Whether some process holds `path` the way that keeps a writer out.
bool Held(const std::string& path) { return !io::CheckNotInUse(path).ok(); }

// A child process (stdout and stderr into `log`), stopped with SIGTERM and reaped when the
// object goes away if it still runs.
class Child {
 public:
  Child(const std::vector<std::string>& argv, const std::string& log) {
    pid_ = fork();
    if (pid_ == 0) {
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
      }
      int null_fd = open("/dev/null", O_RDONLY);
      if (null_fd >= 0) dup2(null_fd, STDIN_FILENO);
      std::vector<char*> args;
      for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
  }
  ~Child() {
    if (running()) {
      kill(pid_, SIGTERM);
      (void)Wait();
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  bool running() {
    if (pid_ <= 0 || exited_) return false;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exited_ = true;
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      return false;
    }
    return true;
  }
  // The exit code (-1 when killed by a signal).
  int Wait() {
    if (pid_ > 0 && !exited_) {
      int status = 0;
      waitpid(pid_, &status, 0);
      exited_ = true;
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }
    return exit_code_;
  }
  // Waits until `path` is held (true) or the child exited / time ran out (false).
  bool WaitUntilHolding(const std::string& path) {
    const auto deadline = std::chrono::steady_clock::now() + kLockWait;
    while (std::chrono::steady_clock::now() < deadline && running()) {
      if (Held(path)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return false;
  }

 private:
  pid_t pid_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
};

class LockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu()) << "qemu-img/qemu-io missing: run scripts/setup";
    WriteRawImage(raw_, 4 * kMiB, DataKind::kMixed, kSeed);
    // An image with data, made by QEMU.
    CommandResult made =
        RunCommand("qemu-img convert -f raw -O qcow2 " + Q(raw_) + " " + Q(image_));
    ASSERT_EQ(made.exit_code, 0) << made.output;
  }

  // zqcow `command` fails (exit code `error_exit`: 2 for compare, as qemu-img's) with one
  // line naming `conflict` and QEMU's question.
  void ExpectRefused(const std::string& command, const std::string& conflict, int error_exit = 1) {
    SCOPED_TRACE(command);
    CommandResult r = Zqcow(command);
    EXPECT_EQ(r.exit_code, error_exit) << r.output;
    EXPECT_TRUE(Contains(r.output, image_ + ": " + conflict)) << r.output;
    EXPECT_TRUE(Contains(r.output, kQuestion + std::string(" [") + image_ + "]?")) << r.output;
  }
  void ExpectOk(const std::string& command) {
    SCOPED_TRACE(command);
    CommandResult r = Zqcow(command);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_FALSE(Contains(r.output, kQuestion)) << r.output;
  }
  // What zqcow does with an image another process writes: refuses to read it or to
  // overwrite it, leaving it as it was; reads it with -U.
  void ExpectWriterRespected() {
    const std::vector<uint8_t> before = ReadWholeFile(image_);
    ExpectRefused("convert --force " + Q(raw_) + " " + Q(image_), kWriteConflict);
    EXPECT_EQ(ReadWholeFile(image_), before) << "the held image was changed";
    ExpectRefused("convert " + Q(image_) + " " + Q(copy_), kSharedWriteConflict);
    EXPECT_FALSE(std::filesystem::exists(copy_));
    ExpectRefused("info " + Q(image_), kSharedWriteConflict);
    ExpectRefused("check " + Q(image_), kSharedWriteConflict);
    ExpectRefused("map " + Q(image_), kSharedWriteConflict);
    ExpectRefused("compare " + Q(image_) + " " + Q(raw_), kSharedWriteConflict, 2);

    ExpectOk("info -U " + Q(image_));
    ExpectOk("check --force-share " + Q(image_));
    ExpectOk("map -U " + Q(image_));
    ExpectOk("compare -U " + Q(image_) + " " + Q(raw_));
    ExpectOk("convert -U -c " + Q(image_) + " " + Q(copy_));
    CommandResult same = RunCommand("qemu-img compare -U " + Q(raw_) + " " + Q(copy_));
    EXPECT_EQ(same.exit_code, 0) << same.output;
  }

  TempDir dir_;
  const std::string raw_ = dir_.File("disk.raw");
  const std::string image_ = dir_.File("disk.qcow2");
  const std::string copy_ = dir_.File("copy.qcow2");
};

TEST_F(LockTest, ZqcowRespectsAnImageQemuIoWrites) {
  Child qemu_io({"qemu-io", "-c", "sleep 600000", image_}, dir_.File("qemu-io.log"));
  ASSERT_TRUE(qemu_io.WaitUntilHolding(image_)) << "qemu-io did not lock the image";
  ExpectWriterRespected();
}

TEST_F(LockTest, ZqcowRespectsAnImageQemuNbdServes) {
  Child qemu_nbd({"qemu-nbd", "-f", "qcow2", "-k", dir_.File("nbd.sock"), image_},
                 dir_.File("qemu-nbd.log"));
  ASSERT_TRUE(qemu_nbd.WaitUntilHolding(image_)) << "qemu-nbd did not lock the image";
  ExpectWriterRespected();
}

TEST_F(LockTest, ZqcowReadsBesideAQemuReaderButDoesNotOverwriteIt) {
  Child qemu_io({"qemu-io", "-r", "-c", "sleep 600000", image_}, dir_.File("qemu-io.log"));
  ASSERT_TRUE(qemu_io.WaitUntilHolding(image_)) << "qemu-io -r did not lock the image";
  ExpectOk("info " + Q(image_));
  ExpectOk("convert " + Q(image_) + " " + Q(copy_));
  const std::vector<uint8_t> before = ReadWholeFile(image_);
  ExpectRefused("convert --force " + Q(raw_) + " " + Q(image_), kWriteConflict);
  EXPECT_EQ(ReadWholeFile(image_), before);
}

TEST_F(LockTest, QemuRespectsAnImageZqcowWrites) {
  const std::string target = dir_.File("open.qcow2");
  CreateOptions create;
  create.virtual_size = 4 * kMiB;
  Result<std::unique_ptr<Image>> image = Image::Create(target, create);
  ASSERT_TRUE(image.ok()) << image.status().ToString();

  CommandResult info = RunCommand("qemu-img info " + Q(target));
  EXPECT_NE(info.exit_code, 0) << info.output;
  EXPECT_TRUE(Contains(info.output, kSharedWriteConflict)) << info.output;
  CommandResult write = RunCommand("qemu-io -c 'write 0 4k' " + Q(target));
  EXPECT_TRUE(Contains(write.output, kWriteConflict)) << write.output;
  CommandResult convert = RunCommand("qemu-img convert -O qcow2 " + Q(raw_) + " " + Q(target));
  EXPECT_NE(convert.exit_code, 0) << convert.output;
  EXPECT_TRUE(Contains(convert.output, kWriteConflict)) << convert.output;
  CommandResult shared = RunCommand("qemu-img info -U " + Q(target));
  EXPECT_EQ(shared.exit_code, 0) << shared.output;

  std::vector<uint8_t> data(create.cluster_size, 0x5a);
  ASSERT_TRUE((*image)->Write(0, data).ok());
  ASSERT_TRUE((*image)->Close().ok());
  image->reset();
  CommandResult check = testing::QemuImgCheck(target);
  EXPECT_EQ(check.exit_code, 0) << check.output;
  CommandResult read = RunCommand("qemu-io -r -c 'read -P 0x5a 0 64k' " + Q(target));
  EXPECT_EQ(read.exit_code, 0) << read.output;
  EXPECT_FALSE(Contains(read.output, "Pattern verification failed")) << read.output;
}

TEST_F(LockTest, QemuDoesNotWriteAnImageZqcowReads) {
  OpenOptions options;
  Result<std::unique_ptr<Image>> image = Image::Open(image_, options);
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  CommandResult write = RunCommand("qemu-io -c 'write 0 4k' " + Q(image_));
  EXPECT_TRUE(Contains(write.output, kWriteConflict)) << write.output;
  CommandResult info = RunCommand("qemu-img info " + Q(image_));
  EXPECT_EQ(info.exit_code, 0) << info.output;
}

// Starts a conversion of a large random source that takes a while (zlib level 9 on one
// worker) and waits until it holds its target. Retries with a larger source when the
// conversion outran the wait; fails the test when none could be caught.
std::unique_ptr<Child> StartSlowConversion(const TempDir& dir, const std::string& source,
                                           const std::string& target) {
  for (uint64_t size : {32 * kMiB, 64 * kMiB}) {
    std::filesystem::remove(target);
    std::filesystem::remove(PartialTargetPath(target));
    WriteRawImage(source, size, DataKind::kRandom, kSeed);
    auto child = std::make_unique<Child>(
        std::vector<std::string>{ZqcowBinary(), "convert", "-c", "-o", "compression_level=9", "-m",
                                 "1", source, target},
        dir.File("slow.log"));
    // The conversion writes the partial image; DST appears only when it is complete.
    if (child->WaitUntilHolding(PartialTargetPath(target))) return child;
  }
  ADD_FAILURE() << "the conversion finished before its target could be seen locked";
  return nullptr;
}

TEST_F(LockTest, QemuDoesNotWriteATargetWhileZqcowConverts) {
  const std::string source = dir_.File("big.raw");
  const std::string target = dir_.File("target.qcow2");
  std::unique_ptr<Child> convert = StartSlowConversion(dir_, source, target);
  ASSERT_NE(convert, nullptr);
  CommandResult write =
      RunCommand("qemu-io -c 'write -P 0x55 0 64k' " + Q(PartialTargetPath(target)));
  EXPECT_NE(write.exit_code, 0) << write.output;
  EXPECT_TRUE(Contains(write.output, kWriteConflict)) << write.output;
  EXPECT_EQ(convert->Wait(), 0);
  CommandResult same = testing::QemuImgCompare(source, "raw", target, "qcow2");
  EXPECT_EQ(same.exit_code, 0) << same.output;
}

TEST_F(LockTest, ASecondZqcowWriterOfOneTargetFailsAndTheFirstOneFinishes) {
  const std::string source = dir_.File("big.raw");
  const std::string target = dir_.File("target.qcow2");
  std::unique_ptr<Child> first = StartSlowConversion(dir_, source, target);
  ASSERT_NE(first, nullptr);
  CommandResult second = Zqcow("convert -O qcow2 --force " + Q(raw_) + " " + Q(target));
  EXPECT_EQ(second.exit_code, 1) << second.output;
  EXPECT_TRUE(Contains(second.output, PartialTargetPath(target) + ": " + kWriteConflict))
      << second.output;
  EXPECT_EQ(first->Wait(), 0);
  CommandResult check = testing::QemuImgCheck(target);
  EXPECT_EQ(check.exit_code, 0) << check.output;
  CommandResult same = testing::QemuImgCompare(source, "raw", target, "qcow2");
  EXPECT_EQ(same.exit_code, 0) << same.output;
}

}  // namespace
}  // namespace zqcow
