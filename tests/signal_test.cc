// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `timeout 2 zqcow convert ...` sends SIGTERM to zqcow and then to its process group: the two
// copies are one request to stop, so zqcow must print its message, flush, leave the target
// consistent (marked incomplete) and exit 143, every time.

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

#include "io/image_lock.h"
#include "zqcow/convert.h"
#include "testing/test_util.h"

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
constexpr uint64_t kSeed = 7;
constexpr int kExitSigterm = 128 + SIGTERM;
// Gaps between the two signals, one round each: from back to back (they may merge into
// one pending signal) to well after the first was handled, but still "together".
constexpr int kGapsMs[] = {0, 0, 1, 2, 5, 10, 20, 50, 100, 200};
constexpr auto kStartWait = std::chrono::seconds(30);

std::string Q(const std::string& path) { return ShellQuote(path); }

// The checks after an interrupted conversion: one line saying so, no DST, and the partial
// image consistent but marked incomplete.
void ExpectInterruptedCleanly(const CommandResult& r, const std::string& target) {
  EXPECT_EQ(r.exit_code, kExitSigterm) << r.output;
  EXPECT_NE(r.output.find("interrupted by SIGTERM"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("interrupted by SIGTERM"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(target)) << "DST appears only when complete";
  const std::string partial = PartialTargetPath(target);
  ASSERT_TRUE(std::filesystem::exists(partial));
  CommandResult check = RunCommand(ZqcowBinary() + " check " + Q(partial));
  EXPECT_EQ(check.exit_code, 3) << check.output;  // incomplete, nothing worse
  EXPECT_NE(check.output.find("incomplete"), std::string::npos) << check.output;
  CommandResult qemu = testing::QemuImgCheck(partial);
  EXPECT_TRUE(qemu.exit_code == 0 || qemu.exit_code == 3) << qemu.output;  // leaks at most
}

// Runs a slow conversion (zlib level 9, one worker, random data) in its own process group,
// and once it holds its target sends SIGTERM to it and, `gap` later, to its group, as
// `timeout` does. Returns the exit code (-1 when a signal killed it) and the output; `caught` says
// whether the conversion was still running when the signals went out.
CommandResult ConvertAndSignalTwice(const std::string& source, const std::string& target,
                                    const std::string& log, std::chrono::milliseconds gap,
                                    bool* caught) {
  const std::string binary = ZqcowBinary();
  pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, STDOUT_FILENO);
      dup2(fd, STDERR_FILENO);
    }
    execl(binary.c_str(), binary.c_str(), "convert", "-c", "-o", "compression_level=9", "-m", "1",
          "--force", source.c_str(), target.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  CommandResult result;
  *caught = false;
  if (pid < 0) return result;
  setpgid(pid, pid);  // also here: the signals must not go to the test's group
  const auto deadline = std::chrono::steady_clock::now() + kStartWait;
  int status = 0;
  bool exited = false;
  while (std::chrono::steady_clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      exited = true;
      break;
    }
    // Locked = opened by the conversion, after its signal handlers were installed.
    if (!io::CheckNotInUse(PartialTargetPath(target)).ok()) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!exited) {
    *caught = true;
    kill(pid, SIGTERM);
    std::this_thread::sleep_for(gap);
    kill(-pid, SIGTERM);
    waitpid(pid, &status, 0);
  }
  auto log_bytes = ReadWholeFile(log);
  result.output.assign(log_bytes.begin(), log_bytes.end());
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

TEST(SignalTest, SigtermToTheProcessAndItsGroupIsOneRequest) {
  TempDir dir;
  const std::string source = dir.File("big.raw");
  const std::string target = dir.File("target.qcow2");
  WriteRawImage(source, 32 * kMiB, DataKind::kRandom, kSeed);
  for (int gap_ms : kGapsMs) {
    SCOPED_TRACE("second signal " + std::to_string(gap_ms) + " ms after the first");
    bool caught = false;
    CommandResult r = ConvertAndSignalTwice(source, target, dir.File("log"),
                                            std::chrono::milliseconds(gap_ms), &caught);
    ASSERT_TRUE(caught) << "the conversion ended before it could be signalled: " << r.output;
    ExpectInterruptedCleanly(r, target);
  }
}

TEST(SignalTest, TimeoutInterruptsTheConversionCleanly) {
  TempDir dir;
  const std::string source = dir.File("big.raw");
  const std::string target = dir.File("target.qcow2");
  // Large enough that the conversion outlasts `timeout 1` even on a fast machine; if it
  // does not, a larger one.
  CommandResult r;
  for (uint64_t size : {64 * kMiB, 160 * kMiB}) {
    WriteRawImage(source, size, DataKind::kRandom, kSeed);
    // --preserve-status: timeout's exit code is then zqcow's, not its own 124.
    r = RunCommand("timeout --preserve-status 1 " + ZqcowBinary() +
                   " convert -c -o compression_level=9 -m 1 --force " + Q(source) + " " +
                   Q(target));
    if (r.exit_code != 0) break;
  }
  ExpectInterruptedCleanly(r, target);
}

}  // namespace
}  // namespace zqcow
