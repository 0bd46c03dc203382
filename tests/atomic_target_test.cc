// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// "A file at DST is a complete image": an interrupted conversion (SIGINT, SIGTERM, a
// cancel through the API) leaves DST absent, or the old DST byte for byte with --force,
// and its work in DST.zqcow-partial, which no QEMU tool can turn into a DST; --resume
// finishes it into an image qemu-img finds clean and equal to the source, and refuses to
// continue for a changed source or other options.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "format/endian.h"
#include "io/file.h"
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
// qcow2 header fields (docs/interop/qcow2.txt).
constexpr size_t kHeaderClusterBitsOffset = 20;
constexpr size_t kHeaderRefcountTableOffset = 48;
constexpr size_t kHeaderRefcountOrderOffset = 96;
constexpr int kExitSigint = 128 + SIGINT;
constexpr int kExitSigterm = 128 + SIGTERM;
// Interrupt once the partial image holds at least this much (so there is work to resume).
constexpr uint64_t kInterruptAfterBytes = 2 * kMiB;

std::string Q(const std::string& path) { return ShellQuote(path); }
CommandResult Zqcow(const std::string& args) { return RunCommand(Q(ZqcowBinary()) + " " + args); }
bool Exists(const std::string& path) { return std::filesystem::exists(path); }
std::string RecordOf(const std::string& partial) { return partial + ".info"; }

bool DirtyBit(const std::string& path) {
  auto info = ReadImageInfo(path);
  EXPECT_TRUE(info.ok()) << info.status().ToString();
  return info.ok() && info->dirty;
}

// Starts `zqcow convert ARGS SRC DST` (slow: zlib level 9 on one worker, checkpoints every
// 10 ms), sends `signal_number` once DST's partial image holds kInterruptAfterBytes, and
// returns the exit code (0 when the conversion outran the signal) and the output.
CommandResult ConvertAndInterrupt(const std::vector<std::string>& args, const std::string& source,
                                  const std::string& target, const std::string& log,
                                  int signal_number) {
  const std::string binary = ZqcowBinary();
  std::vector<std::string> argv_strings = {
      binary, "convert", "-c", "-o", "compression_level=9", "-m", "1", "--checkpoint", "0.01"};
  for (const std::string& arg : args) argv_strings.push_back(arg);
  argv_strings.push_back(source);
  argv_strings.push_back(target);
  std::vector<char*> argv;
  for (std::string& arg : argv_strings) argv.push_back(arg.data());
  argv.push_back(nullptr);
  const std::string partial = PartialTargetPath(target);
  pid_t pid = fork();
  if (pid == 0) {
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, STDOUT_FILENO);
      dup2(fd, STDERR_FILENO);
    }
    execv(binary.c_str(), argv.data());
    _exit(127);
  }
  CommandResult result;
  if (pid < 0) return result;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  int status = 0;
  bool exited = false;
  while (std::chrono::steady_clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      exited = true;
      break;
    }
    struct stat st {};
    if (stat(partial.c_str(), &st) == 0 &&
        static_cast<uint64_t>(st.st_size) >= kInterruptAfterBytes) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (!exited) {
    kill(pid, signal_number);
    waitpid(pid, &status, 0);
  }
  auto log_bytes = ReadWholeFile(log);
  result.output.assign(log_bytes.begin(), log_bytes.end());
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

class AtomicTargetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu());
    source_ = dir_.File("source.raw");
    target_ = dir_.File("target.qcow2");
    partial_ = PartialTargetPath(target_);
    WriteRawImage(source_, 16 * kMiB, DataKind::kText, /*seed=*/11);
  }

  // Interrupts a conversion of source_ to target_ with `signal_number`; asserts it was
  // interrupted (retrying with a bigger source if the conversion outran the signal).
  void Interrupt(const std::vector<std::string>& args, int signal_number = SIGINT) {
    CommandResult r;
    for (uint64_t size : {16 * kMiB, 64 * kMiB, 128 * kMiB}) {
      if (size != 16 * kMiB) {
        std::filesystem::remove(partial_);
        std::filesystem::remove(RecordOf(partial_));
        if (!old_target_.empty()) {
          testing::WriteWholeFile(target_, old_target_);
        } else {
          std::filesystem::remove(target_);
        }
        WriteRawImage(source_, size, DataKind::kText, /*seed=*/11);
      }
      r = ConvertAndInterrupt(args, source_, target_, dir_.File("log"), signal_number);
      if (r.exit_code != 0) break;
    }
    ASSERT_EQ(r.exit_code, signal_number == SIGINT ? kExitSigint : kExitSigterm) << r.output;
    interrupt_output_ = r.output;
  }

  // What every interrupted conversion must leave.
  void ExpectInterruptedState() {
    if (old_target_.empty()) {
      EXPECT_FALSE(Exists(target_)) << "an interrupted conversion left a file at DST";
    } else {
      EXPECT_EQ(ReadWholeFile(target_), old_target_) << "the old DST was changed";
    }
    ASSERT_TRUE(Exists(partial_));
    EXPECT_TRUE(Exists(RecordOf(partial_)));
    EXPECT_TRUE(DirtyBit(partial_));
    CommandResult check = testing::QemuImgCheck(partial_);
    EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.output;
  }

  // --resume (with `extra` flags) succeeds and leaves the complete image at DST only.
  void ResumeOk(const std::string& extra = "") {
    CommandResult r = Zqcow("convert -c -o compression_level=9 --resume --output=json " + extra +
                            " " + Q(source_) + " " + Q(target_));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    auto json = nlohmann::json::parse(r.output, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(json.is_object()) << r.output;
    EXPECT_GE(json.value("resumed_bytes", uint64_t{0}), 1u) << "nothing was resumed:\n" << r.output;
    EXPECT_LT(json.value("bytes_read", ~uint64_t{0}), std::filesystem::file_size(source_))
        << "the resumed conversion read the whole source again";
    ExpectComplete();
  }

  void ExpectComplete() {
    EXPECT_FALSE(Exists(partial_));
    EXPECT_FALSE(Exists(RecordOf(partial_)));
    CommandResult check = testing::QemuImgCheck(target_);
    EXPECT_EQ(check.exit_code, 0) << check.output;
    EXPECT_EQ(testing::QemuImgCompare(source_, "raw", target_, "qcow2").exit_code, 0);
    EXPECT_EQ(Zqcow("check " + Q(target_)).exit_code, 0);
  }

  TempDir dir_;
  std::string source_;
  std::string target_;
  std::string partial_;
  std::vector<uint8_t> old_target_;  // --force: the DST that must survive an interruption
  std::string interrupt_output_;
};

TEST_F(AtomicTargetTest, SignalsLeaveNoTargetAndResumeFinishes) {
  for (int signal_number : {SIGINT, SIGTERM}) {
    SCOPED_TRACE(signal_number == SIGINT ? "SIGINT" : "SIGTERM");
    Interrupt({}, signal_number);
    ExpectInterruptedState();
    EXPECT_NE(interrupt_output_.find(partial_), std::string::npos) << interrupt_output_;
    EXPECT_NE(interrupt_output_.find("--resume"), std::string::npos) << interrupt_output_;
    CommandResult check = Zqcow("check " + Q(target_));
    EXPECT_EQ(check.exit_code, 1) << "zqcow check accepted a DST that is not there";

    // Without --resume, an interrupted conversion's partial image is not silently lost.
    const std::vector<uint8_t> partial_bytes = ReadWholeFile(partial_);
    CommandResult again = Zqcow("convert -c " + Q(source_) + " " + Q(target_));
    EXPECT_EQ(again.exit_code, 1) << again.output;
    EXPECT_NE(again.output.find("--resume"), std::string::npos) << again.output;
    EXPECT_EQ(ReadWholeFile(partial_), partial_bytes);
    EXPECT_FALSE(Exists(target_));

    ResumeOk();
    std::filesystem::remove(target_);
  }
}

TEST_F(AtomicTargetTest, QemuClearingTheDirtyBitDoesNotMakeATarget) {
  Interrupt({});
  ExpectInterruptedState();
  // Any QEMU tool that opens the image for writing clears its dirty bit.
  CommandResult io = RunCommand("qemu-io -f qcow2 -c 'read 0 512' " + Q(partial_));
  ASSERT_EQ(io.exit_code, 0) << io.output;
  EXPECT_FALSE(DirtyBit(partial_)) << "qemu-io no longer clears the dirty bit; test is moot";
  EXPECT_FALSE(Exists(target_));
  EXPECT_EQ(Zqcow("check " + Q(target_)).exit_code, 1);
  // The partial image still holds part of the data only, and --resume still finishes it.
  EXPECT_NE(testing::QemuImgCompare(source_, "raw", partial_, "qcow2").exit_code, 0);
  ResumeOk();
}

TEST_F(AtomicTargetTest, ForceKeepsTheOldTargetUntilTheNewOneIsComplete) {
  // The old DST: another image, complete.
  const std::string old_source = dir_.File("old.raw");
  WriteRawImage(old_source, 4 * kMiB, DataKind::kMixed, /*seed=*/3);
  ASSERT_EQ(Zqcow("convert -c " + Q(old_source) + " " + Q(target_)).exit_code, 0);
  old_target_ = ReadWholeFile(target_);
  struct stat old_stat {};
  ASSERT_EQ(stat(target_.c_str(), &old_stat), 0);

  Interrupt({"--force"});
  ExpectInterruptedState();
  EXPECT_NE(interrupt_output_.find("left as it was"), std::string::npos) << interrupt_output_;
  EXPECT_EQ(testing::QemuImgCompare(old_source, "raw", target_, "qcow2").exit_code, 0);

  // Resuming still needs --force to replace the old DST.
  CommandResult refused =
      Zqcow("convert -c -o compression_level=9 --resume " + Q(source_) + " " + Q(target_));
  EXPECT_EQ(refused.exit_code, 1) << refused.output;
  EXPECT_NE(refused.output.find("--force"), std::string::npos) << refused.output;
  EXPECT_EQ(ReadWholeFile(target_), old_target_);

  ResumeOk("--force");
  struct stat new_stat {};
  ASSERT_EQ(stat(target_.c_str(), &new_stat), 0);
  EXPECT_NE(new_stat.st_ino, old_stat.st_ino) << "DST was rewritten in place, not replaced";
}

TEST_F(AtomicTargetTest, ResumeIsRefusedForAChangedSource) {
  Interrupt({});
  ExpectInterruptedState();
  const std::vector<uint8_t> partial_bytes = ReadWholeFile(partial_);
  auto expect_refused = [&](const std::string& why) {
    SCOPED_TRACE(why);
    CommandResult r =
        Zqcow("convert -c -o compression_level=9 --resume " + Q(source_) + " " + Q(target_));
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find("changed since the interrupted conversion"), std::string::npos)
        << r.output;
    EXPECT_NE(r.output.find(source_), std::string::npos) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
    EXPECT_FALSE(Exists(target_));
    EXPECT_EQ(ReadWholeFile(partial_), partial_bytes) << "a refused resume touched the partial";
  };

  // Touched: same bytes, newer modification time.
  const auto mtime = std::filesystem::last_write_time(source_);
  std::filesystem::last_write_time(source_, mtime + std::chrono::seconds(1));
  expect_refused("touch");
  // Rewritten with other bytes of the same size, its modification time set back.
  std::vector<uint8_t> bytes = ReadWholeFile(source_);
  bytes[0] ^= 0xff;
  testing::WriteWholeFile(source_, bytes);
  std::filesystem::last_write_time(source_, mtime);
  expect_refused("rewritten, mtime restored");
  // Grown.
  bytes.resize(bytes.size() + 65536, 'x');
  testing::WriteWholeFile(source_, bytes);
  std::filesystem::last_write_time(source_, mtime);
  expect_refused("grown");

  // --force starts over from the changed source.
  CommandResult fresh = Zqcow("convert -c --force " + Q(source_) + " " + Q(target_));
  ASSERT_EQ(fresh.exit_code, 0) << fresh.output;
  ExpectComplete();
}

TEST_F(AtomicTargetTest, ResumeIsRefusedWithOtherOptions) {
  Interrupt({});
  ExpectInterruptedState();
  for (const std::string& options :
       {std::string("-c -o compression_level=9,cluster_size=128k"),
        std::string("-c -o compression_level=9,compression_type=zstd"),
        std::string("-c -o compression_level=8"), std::string("-O qcow2 -o compression_level=9"),
        std::string("-c -o compression_level=9,refcount_bits=8")}) {
    SCOPED_TRACE(options);
    CommandResult r = Zqcow("convert " + options + " --resume " + Q(source_) + " " + Q(target_));
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find("cannot resume"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("interrupted conversion used"), std::string::npos) << r.output;
    EXPECT_FALSE(Exists(target_));
  }
  ResumeOk();
}

// Leaks are what a crash leaves in the partial image (refcounts written by a checkpoint
// whose L2 tables never made it). The resumed image must not keep them.
TEST_F(AtomicTargetTest, ResumeRepairsLeaksOfTheInterruptedImage) {
  Interrupt({});
  ExpectInterruptedState();
  std::vector<uint8_t> image = ReadWholeFile(partial_);
  ASSERT_EQ(format::LoadBE32(image.data() + kHeaderRefcountOrderOffset), 4u);
  const uint32_t cluster_bits = format::LoadBE32(image.data() + kHeaderClusterBitsOffset);
  const uint64_t cluster_size = uint64_t{1} << cluster_bits;
  ASSERT_EQ(image.size() % cluster_size, 0u);
  // A cluster at the end that nothing references, with refcount 1: a leak.
  const uint64_t leaked = image.size() / cluster_size;
  const uint64_t table = format::LoadBE64(image.data() + kHeaderRefcountTableOffset);
  const uint64_t block = format::LoadBE64(image.data() + table);  // covers the first 32768
  ASSERT_LT(leaked, cluster_size / 2);
  image.resize(image.size() + cluster_size, 0);
  image[block + leaked * 2 + 1] = 1;
  testing::WriteWholeFile(partial_, image);
  CommandResult before = testing::QemuImgCheck(partial_);
  ASSERT_EQ(before.exit_code, 3) << "the injected leak is not one:\n" << before.output;

  ResumeOk();
}

TEST_F(AtomicTargetTest, ResumeWithNothingToResumeStartsANewConversion) {
  // A stale record (a crash before its image was created) is replaced, not obeyed.
  testing::WriteWholeFile(RecordOf(partial_), {'x', '\n'});
  CommandResult r = Zqcow("convert -c --resume " + Q(source_) + " " + Q(target_));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  ExpectComplete();
}

TEST_F(AtomicTargetTest, APartialWithoutItsRecordIsNotResumed) {
  Interrupt({});
  ExpectInterruptedState();
  std::filesystem::remove(RecordOf(partial_));
  CommandResult r =
      Zqcow("convert -c -o compression_level=9 --resume " + Q(source_) + " " + Q(target_));
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("missing"), std::string::npos) << r.output;
  EXPECT_FALSE(Exists(target_));
  CommandResult fresh = Zqcow("convert -c --force " + Q(source_) + " " + Q(target_));
  ASSERT_EQ(fresh.exit_code, 0) << fresh.output;
  ExpectComplete();
}

TEST_F(AtomicTargetTest, ASymlinkTargetKeepsPointingAtTheNewImage) {
  const std::string real = dir_.File("real.qcow2");
  const std::string link = dir_.File("link.qcow2");
  WriteRawImage(real, 4096, DataKind::kText, 1);  // an old file the link names
  std::filesystem::create_symlink(real, link);
  CommandResult r = Zqcow("convert -c --force " + Q(source_) + " " + Q(link));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(std::filesystem::is_symlink(link));
  EXPECT_FALSE(Exists(PartialTargetPath(link)));
  EXPECT_EQ(testing::QemuImgCompare(source_, "raw", real, "qcow2").exit_code, 0);
}

// The same contract through the library: a cancel leaves no target; resume = true
// continues, reading only what the partial image does not hold.
class CancellingFile final : public io::File {
 public:
  CancellingFile(std::unique_ptr<io::File> base, std::atomic<bool>* cancel, int64_t writes)
      : base_(std::move(base)), cancel_(cancel), writes_left_(writes) {}
  Result<size_t> ReadAt(uint64_t o, void* b, size_t l) override { return base_->ReadAt(o, b, l); }
  Status WriteAt(uint64_t o, const void* b, size_t l) override {
    Count();
    return base_->WriteAt(o, b, l);
  }
  Status ReadBatch(std::span<const io::IoRequest> r) override { return base_->ReadBatch(r); }
  Status WriteBatch(std::span<const io::IoRequest> r) override {
    Count();
    return base_->WriteBatch(r);
  }
  Status Sync() override { return base_->Sync(); }
  Result<uint64_t> Size() override { return base_->Size(); }
  Status Truncate(uint64_t s) override { return base_->Truncate(s); }
  Status DropCache(uint64_t o, uint64_t l) override { return base_->DropCache(o, l); }
  Result<uint64_t> NextData(uint64_t o) override { return base_->NextData(o); }
  Result<uint64_t> NextHole(uint64_t o) override { return base_->NextHole(o); }
  bool direct_io() const override { return base_->direct_io(); }
  size_t alignment() const override { return base_->alignment(); }
  const std::string& path() const override { return base_->path(); }

 private:
  void Count() {
    if (writes_left_.fetch_sub(1) == 1) cancel_->store(true);
  }
  std::unique_ptr<io::File> base_;
  std::atomic<bool>* cancel_;
  std::atomic<int64_t> writes_left_;
};

TEST_F(AtomicTargetTest, LibraryCancelThenResume) {
  for (bool direct_io : {false, true}) {
    SCOPED_TRACE(direct_io ? "O_DIRECT" : "buffered");
    std::atomic<bool> cancel{false};
    ConvertOptions options;
    options.workers = 2;
    options.cancel = &cancel;
    options.target_io.direct_io = direct_io;
    options.target_io.write_cache = IoOptions::WriteCache::kOff;  // a write per run
    options.wrap_target_file = [&](std::unique_ptr<io::File> file) -> std::unique_ptr<io::File> {
      return std::make_unique<CancellingFile>(std::move(file), &cancel, 10);
    };
    Result<ConvertStats> stats = Convert(source_, target_, options);
    ASSERT_FALSE(stats.ok());
    EXPECT_EQ(stats.status().code(), Status::Code::kInterrupted) << stats.status().ToString();
    EXPECT_NE(stats.status().message().find(partial_), std::string::npos);
    ExpectInterruptedState();

    ConvertOptions resume;
    resume.resume = true;
    resume.target_io.direct_io = direct_io;
    Result<ConvertStats> resumed = Convert(source_, target_, resume);
    ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
    EXPECT_GT(resumed->resumed_bytes, 0u);
    EXPECT_EQ(resumed->bytes_read + resumed->resumed_bytes, resumed->virtual_size);
    // Every guest cluster is counted once, as written now, zero, or kept from before.
    const uint64_t clusters = resumed->virtual_size / resume.cluster_size;
    EXPECT_EQ(resumed->clusters_compressed + resumed->clusters_uncompressed +
                  resumed->clusters_zero + resumed->resumed_bytes / resume.cluster_size,
              clusters);
    ExpectComplete();
    std::filesystem::remove(target_);
  }
}

}  // namespace
}  // namespace zqcow
