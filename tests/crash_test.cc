// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Kills `zqcow convert -c --force` with SIGKILL at points spread over its run, for several
// option combinations, over the DST a first full run made, and proves a crash never costs
// data and a file at DST is always complete:
// - DST is the old image byte for byte, or (killed after the rename) a new one; either way
//   `qemu-img check` finds it clean and it equals the source;
// - the partial image DST.zqcow-partial either has no qcow2 header yet (killed before it
//   was written) or passes `qemu-img check` without corruption (leaks allowed); every guest
//   range it claims (qemu-img map: "present") holds exactly the source's bytes; `zqcow
//   check` reports it as complete only when it is (killed after closing it, before the
//   rename), else it is marked dirty;
// - `convert --resume` then finishes it into a DST that is clean and equal to the source.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "format/endian.h"
#include "format/header.h"
#include "testing/test_util.h"
#include "zqcow/convert.h"

extern char** environ;

namespace zqcow {
namespace {

using testing::ReadWholeFile;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;

constexpr uint64_t kSourceSize = 24ull << 20;
constexpr int kKillPoints = 8;
// Exit code the child reports when exec fails.
constexpr int kExecFailed = 127;

struct Variant {
  std::string name;
  std::vector<std::string> args;  // between "convert" and SRC
};
void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

struct RunResult {
  bool killed = false;  // SIGKILL arrived before the child exited
  int exit_code = -1;   // when !killed
};

// Runs zqcow with `args`; SIGKILLs it after `delay` unless it exited before.
RunResult RunAndKill(const std::vector<std::string>& args, std::chrono::microseconds delay) {
  std::vector<char*> argv;
  std::string binary = testing::ZqcowBinary();
  argv.push_back(binary.data());
  std::vector<std::string> copy = args;
  for (std::string& a : copy) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t pid = -1;
  RunResult result;
  const int rc = posix_spawn(&pid, binary.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    ADD_FAILURE() << "posix_spawn " << binary << ": " << std::strerror(rc);
    return result;
  }
  const auto deadline = std::chrono::steady_clock::now() + delay;
  int status = 0;
  for (;;) {
    pid_t done = waitpid(pid, &status, WNOHANG);
    if (done == pid) {
      result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      return result;
    }
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
    result.killed = true;
  } else {
    result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  return result;
}

bool HasQcowMagic(const std::string& path) {
  std::vector<uint8_t> bytes = ReadWholeFile(path);
  return bytes.size() >= 4 && format::LoadBE32(bytes.data()) == format::kQcowMagic;
}

class CrashTest : public ::testing::TestWithParam<Variant> {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(testing::HaveQemu());
    dir_ = new TempDir();
    source_ = dir_->File("source.raw");
    testing::WriteRawImage(source_, kSourceSize, testing::DataKind::kMixed, /*seed=*/7);
    source_bytes_ = new std::vector<uint8_t>(ReadWholeFile(source_));
  }
  static void TearDownTestSuite() {
    delete source_bytes_;
    delete dir_;
  }

  std::vector<std::string> Args(const std::string& target) const {
    // Frequent checkpoints, so that killed runs leave images with real allocated data to
    // verify (not only empty ones).
    std::vector<std::string> args = {"convert", "-c", "--force", "--checkpoint", "0.005"};
    for (const std::string& a : GetParam().args) args.push_back(a);
    args.push_back(source_);
    args.push_back(target);
    return args;
  }

  // DST: always a complete image equal to the source (the old one, or a new one).
  void VerifyTarget(const std::string& target) {
    ASSERT_EQ(access(target.c_str(), F_OK), 0) << "DST disappeared";
    EXPECT_EQ(testing::QemuImgCheck(target).exit_code, 0);
    EXPECT_EQ(testing::QemuImgCompare(source_, "raw", target, "qcow2").exit_code, 0);
    auto zq = RunCommand(ShellQuote(testing::ZqcowBinary()) + " check " + ShellQuote(target));
    EXPECT_EQ(zq.exit_code, 0) << zq.output;
  }

  // The checks after one (possibly killed) run, on the image it was writing: `target`
  // after a finished run, DST's partial image after a killed one.
  void Verify(const std::string& target, const RunResult& run, const std::string& where) {
    SCOPED_TRACE(where);
    const bool finished = !run.killed && run.exit_code == 0;
    if (!run.killed) {
      ASSERT_EQ(run.exit_code, 0) << "convert failed without being killed";
    }
    if (access(target.c_str(), F_OK) != 0 || !HasQcowMagic(target)) {
      // Killed before the header was written: nothing that looks like an image.
      ASSERT_FALSE(finished) << "finished conversion left no image";
      auto zq = RunCommand(ShellQuote(testing::ZqcowBinary()) + " check " + ShellQuote(target));
      EXPECT_NE(zq.exit_code, 0) << zq.output;
      return;
    }
    auto check = testing::QemuImgCheck(target);
    ASSERT_TRUE(check.exit_code == 0 || check.exit_code == 3)
        << "qemu-img check found corruption:\n"
        << check.output;

    // Every range the image claims holds the source's bytes.
    const std::string raw = target + ".raw";
    auto conv = RunCommand("qemu-img convert -f qcow2 -O raw " + ShellQuote(target) + " " +
                           ShellQuote(raw));
    ASSERT_EQ(conv.exit_code, 0) << conv.output;
    const std::vector<uint8_t> guest = ReadWholeFile(raw);
    ASSERT_EQ(guest.size(), source_bytes_->size());
    auto map =
        RunCommand("qemu-img map -f qcow2 --output=json " + ShellQuote(target) + " 2>/dev/null");
    ASSERT_EQ(map.exit_code, 0) << map.output;
    auto extents = nlohmann::json::parse(map.output, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(extents.is_array()) << map.output;
    uint64_t claimed = 0;
    for (const auto& e : extents) {
      if (!e.value("present", false)) continue;
      const uint64_t start = e["start"].get<uint64_t>();
      const uint64_t length = e["length"].get<uint64_t>();
      ASSERT_LE(start + length, guest.size());
      claimed += length;
      ASSERT_EQ(std::memcmp(guest.data() + start, source_bytes_->data() + start, length), 0)
          << "claimed range [" << start << ", +" << length << ") differs from the source";
    }
    std::remove(raw.c_str());

    auto zq = RunCommand(ShellQuote(testing::ZqcowBinary()) + " check " + ShellQuote(target));
    if (finished) {
      EXPECT_EQ(zq.exit_code, 0) << zq.output;
    }
    if (zq.exit_code == 0) {
      // Complete, by its own account: a finished conversion, or one killed after Close()
      // but before the process exited. Then it must really be the whole source.
      EXPECT_EQ(check.exit_code, 0) << check.output;
      EXPECT_EQ(testing::QemuImgCompare(source_, "raw", target, "qcow2").exit_code, 0)
          << "an image that says it is complete differs from the source";
    } else {
      auto info = RunCommand(ShellQuote(testing::ZqcowBinary()) + " info --output=json " +
                             ShellQuote(target));
      auto json = nlohmann::json::parse(info.output, nullptr, false);
      ASSERT_TRUE(json.is_object()) << info.output;
      EXPECT_TRUE(json.value("dirty", false) || json.value("incomplete", false))
          << "zqcow check rejects it, yet it is not marked incomplete:\n"
          << zq.output;
    }
    if (!finished && zq.exit_code != 0 && claimed > 0) ++incomplete_with_data_;
    std::printf("  %s: claimed %llu of %llu bytes, qemu-img check %d, zqcow check %d\n",
                where.c_str(), static_cast<unsigned long long>(claimed),
                static_cast<unsigned long long>(guest.size()), check.exit_code, zq.exit_code);
  }

  static TempDir* dir_;
  static std::string source_;
  static std::vector<uint8_t>* source_bytes_;
  TempDir work_;
  int incomplete_with_data_ = 0;  // killed runs whose incomplete image held verified data
};
TempDir* CrashTest::dir_ = nullptr;
std::string CrashTest::source_;
std::vector<uint8_t>* CrashTest::source_bytes_ = nullptr;

TEST_P(CrashTest, KillAtAnyPointLeavesNoCorruption) {
  const std::string target = work_.File("target.qcow2");
  const std::string partial = PartialTargetPath(target);
  // One full run to learn how long a conversion takes, and to check the finished image.
  const auto start = std::chrono::steady_clock::now();
  RunResult full = RunAndKill(Args(target), std::chrono::minutes(2));
  const auto duration = std::chrono::steady_clock::now() - start;
  ASSERT_FALSE(full.killed) << "a full conversion took over 2 minutes";
  ASSERT_NE(full.exit_code, kExecFailed);
  Verify(target, full, "full run");
  ASSERT_FALSE(HasFailure());
  ASSERT_NE(access(partial.c_str(), F_OK), 0) << "a finished run left its partial image";

  const auto total = std::chrono::duration_cast<std::chrono::microseconds>(duration);
  int replaced = 0;  // kills after the rename: DST is a new image
  auto kill_after = [&](std::chrono::microseconds delay) {
    const std::vector<uint8_t> old_target = ReadWholeFile(target);
    const std::string where = "kill after " + std::to_string(delay.count() / 1000) + " ms of " +
                              std::to_string(total.count() / 1000) + " ms";
    RunResult run = RunAndKill(Args(target), delay);
    {
      SCOPED_TRACE(where);
      VerifyTarget(target);
      if (ReadWholeFile(target) != old_target) {
        ++replaced;
        EXPECT_NE(access(partial.c_str(), F_OK), 0) << "DST was replaced, the partial is left";
      }
    }
    if (run.killed && access(partial.c_str(), F_OK) == 0) {
      Verify(partial, run, where + ", partial image");
      if (HasFatalFailure()) return;
      // --resume finishes whatever the kill left.
      std::vector<std::string> resume = Args(target);
      resume.insert(resume.begin() + 1, "--resume");
      RunResult resumed = RunAndKill(resume, std::chrono::minutes(2));
      SCOPED_TRACE(where + ", resumed");
      ASSERT_FALSE(resumed.killed);
      ASSERT_EQ(resumed.exit_code, 0) << "--resume failed";
      EXPECT_NE(access(partial.c_str(), F_OK), 0);
      VerifyTarget(target);
      if (HasFatalFailure()) return;
    } else if (!run.killed) {
      ASSERT_EQ(run.exit_code, 0);
    }
  };
  // Kill points spread over the run, the last one near its end.
  for (int i = 0; i < kKillPoints; ++i) {
    kill_after(total * (2 * i + 1) / (2 * kKillPoints));
    if (HasFatalFailure()) return;
  }
  // Runs vary in length (a loaded machine, a sanitizer): when no kill happened to land
  // between a checkpoint and the end, aim more inside the run until one does, so that the
  // check below stays about the images and not about timing.
  for (int extra = 0; incomplete_with_data_ == 0 && extra < 2 * kKillPoints; ++extra) {
    kill_after(total * (2 + extra % 6) / 10);
    if (HasFatalFailure()) return;
  }
  std::printf("  %d kills came after the rename\n", replaced);
  // Not vacuous: some kill landed after a checkpoint, and its data was checked above.
  EXPECT_GT(incomplete_with_data_, 0) << "no killed run left verified data behind";
}

INSTANTIATE_TEST_SUITE_P(
    Variants, CrashTest,
    ::testing::Values(
        Variant{"DirectZlibM2", {"-t", "none", "-m", "2"}},
        Variant{"WritebackZstdM1", {"-t", "writeback", "-m", "1", "-o", "compression_type=zstd"}},
        Variant{"DirectNoCacheZstdM1",
                {"-t", "none", "--no-write-cache", "-m", "1", "-o", "compression_type=zstd"}},
        Variant{"WritebackNoCacheZlibM2", {"-t", "writeback", "--no-write-cache", "-m", "2"}}),
    [](const ::testing::TestParamInfo<Variant>& info) { return info.param.name; });

}  // namespace
}  // namespace zqcow
