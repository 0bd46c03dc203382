// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// NBD sources: conversions and info/map/compare from qemu-nbd and nbdkit exports on unix
// sockets, dirty bitmaps read through convert::OpenSource, and the faults (server gone,
// connection refused, missing bitmap) each ending in one clear line.

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "convert/source.h"
#include "testing/nbd_server.h"
#include "testing/test_util.h"
#include "zqcow/convert.h"

namespace zqcow {
namespace {

using testing::CommandResult;
using testing::DataKind;
using testing::NbdServer;
using testing::ReadWholeFile;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;
using testing::WriteRawImage;
using testing::ZqcowBinary;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kImageSize = 4 * kMiB;
constexpr uint64_t kSeed = 7;
constexpr size_t kHeaderIncompatibleFeaturesLastByte = 79;  // bit 0 = dirty

CommandResult Zqcow(const std::string& args) { return RunCommand(ZqcowBinary() + " " + args); }
std::string Q(const std::string& text) { return ShellQuote(text); }

nlohmann::json ParseJson(const std::string& text) {
  auto parsed = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(parsed.is_discarded()) << "not JSON: " << text;
  return parsed;
}

convert::SourceOptions BitmapOptions(const std::string& bitmap) {
  convert::SourceOptions options;
  options.bitmap = bitmap;
  return options;
}

size_t Lines(const std::string& text) {
  size_t lines = 0;
  for (char c : text) lines += c == '\n';
  return lines;
}

class NbdSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(testing::HaveQemu()) << "qemu-img, qemu-io and qemu-nbd are needed (scripts/setup)";
    raw_ = dir_.File("source.raw");
    target_ = dir_.File("target.qcow2");
    WriteRawImage(raw_, kImageSize, DataKind::kMixed, kSeed);
  }

  // Converts `uri` into target_ (with `flags`) and returns the JSON statistics.
  nlohmann::json ConvertOk(const std::string& uri, const std::string& flags = "-c") {
    CommandResult r =
        Zqcow("convert " + flags + " --force --output=json " + Q(uri) + " " + Q(target_));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return r.exit_code == 0 ? ParseJson(r.output) : nlohmann::json();
  }

  void ExpectTargetEquals(const std::string& reference, const std::string& format) {
    CommandResult same = testing::QemuImgCompare(reference, format, target_, "qcow2");
    EXPECT_EQ(same.exit_code, 0) << same.output;
    CommandResult check = testing::QemuImgCheck(target_);
    EXPECT_EQ(check.exit_code, 0) << check.output;
  }

  TempDir dir_;
  std::string raw_;
  std::string target_;
};

TEST_F(NbdSourceTest, ConvertFromAnExportEqualsTheSource) {
  auto server = NbdServer::QemuNbd(dir_.path(), {"-f", "raw", "-r", raw_});
  ASSERT_TRUE(server);
  nlohmann::json stats = ConvertOk(server->uri());
  EXPECT_EQ(stats.value("virtual_size", 0u), kImageSize);
  ExpectTargetEquals(raw_, "raw");
  // A named export over nbd+unix, the way libvirt names them.
  auto named = NbdServer::QemuNbd(dir_.path(), {"-f", "raw", "-r", "-x", "disk0", raw_});
  ASSERT_TRUE(named);
  ConvertOk(named->uri("disk0"));
  ExpectTargetEquals(raw_, "raw");
}

TEST_F(NbdSourceTest, ZeroRangesAreNeverRead) {
  // 32 MiB of guest space with 1 MiB of data: base:allocation says the rest reads as
  // zeros, so it must not cross the socket.
  const std::string image = dir_.File("sparse.qcow2");
  ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 " + Q(image) + " 32M").exit_code, 0);
  ASSERT_EQ(RunCommand("qemu-io -f qcow2 -c 'write -P 0x5a 8M 512k' -c 'write -P 0x11 30M 512k' " +
                       Q(image))
                .exit_code,
            0);
  auto server = NbdServer::QemuNbd(dir_.path(), {"-f", "qcow2", "-r", image});
  ASSERT_TRUE(server);
  nlohmann::json stats = ConvertOk(server->uri());
  EXPECT_EQ(stats.value("bytes_read", ~0ull), 1 * kMiB);
  ExpectTargetEquals(image, "qcow2");
}

TEST_F(NbdSourceTest, SharedExportIsReadOverSeveralConnections) {
  // nbdkit's log filter shows which connection each read came on; the blocksize-policy
  // filter advertises a 64 KiB maximum and fails any read that breaks it.
  const std::string log = dir_.File("reads.log");
  auto server =
      NbdServer::Nbdkit(dir_.path(), {"--filter=log", "--filter=blocksize-policy", "file", raw_,
                                      "logfile=" + log, "blocksize-minimum=4096",
                                      "blocksize-maximum=65536", "blocksize-error-policy=error"});
  ASSERT_TRUE(server);
  ConvertOk(server->uri());
  ExpectTargetEquals(raw_, "raw");
  std::set<std::string> connections;
  const std::vector<uint8_t> bytes = ReadWholeFile(log);
  const std::string text(bytes.begin(), bytes.end());
  for (size_t at = text.find(" Read "); at != std::string::npos; at = text.find(" Read ", at + 1)) {
    const size_t line = text.rfind("connection=", at);
    connections.insert(text.substr(line, at - line));
  }
  EXPECT_GT(connections.size(), 1u) << text;

  // qemu-nbd -e 4 (shared) advertises multi-conn too.
  auto shared = NbdServer::QemuNbd(dir_.path(), {"-f", "raw", "-r", "-e", "4", raw_});
  ASSERT_TRUE(shared);
  ConvertOk(shared->uri());
  ExpectTargetEquals(raw_, "raw");
}

TEST_F(NbdSourceTest, UnalignedReadsRespectTheMinimumBlockSize) {
  auto server = NbdServer::Nbdkit(
      dir_.path(), {"--filter=blocksize-policy", "file", raw_, "blocksize-minimum=4096",
                    "blocksize-maximum=65536", "blocksize-error-policy=error"});
  ASSERT_TRUE(server);
  auto source = convert::OpenSource(server->uri(), {});
  ASSERT_TRUE(source.ok()) << source.status().ToString();
  const std::vector<uint8_t> expected = ReadWholeFile(raw_);
  // Odd offsets and lengths, one past the export's end.
  for (auto [offset, length] : std::vector<std::pair<uint64_t, size_t>>{
           {1, 100}, {4095, 2}, {65536 - 7, 200000}, {kImageSize - 10, 30}}) {
    std::vector<uint8_t> got(length, 0xee);
    const io::IoRequest request{offset, got.data(), length};
    ASSERT_TRUE((*source)->Read({&request, 1}).ok()) << offset;
    for (size_t i = 0; i < length; ++i) {
      const uint8_t want = offset + i < kImageSize ? expected[offset + i] : 0;
      ASSERT_EQ(got[i], want) << "offset " << offset + i;
    }
  }
}

// A qcow2 image with a persistent bitmap added after a first round of writes: the bitmap
// marks exactly the clusters written after it.
class DirtyBitmapTest : public NbdSourceTest {
 protected:
  void SetUp() override {
    NbdSourceTest::SetUp();
    image_ = dir_.File("disk.qcow2");
    ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 " + Q(image_) + " 4M").exit_code, 0);
    ASSERT_EQ(RunCommand("qemu-io -f qcow2 -c 'write -P 1 0 2M' " + Q(image_)).exit_code, 0);
    ASSERT_EQ(RunCommand("qemu-img bitmap --add " + Q(image_) + " b0").exit_code, 0);
    // Dirty after the checkpoint: the cluster at 1 MiB, two clusters from 3 MiB + 100 KiB
    // (a write straddling a cluster boundary), and the last cluster.
    ASSERT_EQ(RunCommand("qemu-io -f qcow2 -c 'write -P 2 1M 64k' -c 'write -P 3 3172k 40k' "
                         "-c 'write -P 4 4032k 4k' " +
                         Q(image_))
                  .exit_code,
              0);
  }
  std::string image_;
};

TEST_F(DirtyBitmapTest, DirtyRangesAreExactlyTheDirtyClusters) {
  auto server = NbdServer::QemuNbd(dir_.path(), {"-f", "qcow2", "-r", "-B", "b0", image_});
  ASSERT_TRUE(server);
  auto source = convert::OpenSource(server->uri(), BitmapOptions("b0"));
  ASSERT_TRUE(source.ok()) << source.status().ToString();
  auto dirty = (*source)->DirtyRanges(0, kImageSize);
  ASSERT_TRUE(dirty.ok()) << dirty.status().ToString();
  std::vector<std::pair<uint64_t, uint64_t>> got;
  for (const convert::ByteRange& range : *dirty) got.emplace_back(range.offset, range.length);
  const std::vector<std::pair<uint64_t, uint64_t>> want = {
      {1 * kMiB, 64 * kKiB}, {3136 * kKiB, 128 * kKiB}, {4032 * kKiB, 64 * kKiB}};
  EXPECT_EQ(got, want);
  // A window inside: clipped to it.
  auto inside = (*source)->DirtyRanges(1 * kMiB + 4 * kKiB, 3200 * kKiB - (1 * kMiB + 4 * kKiB));
  ASSERT_TRUE(inside.ok()) << inside.status().ToString();
  ASSERT_EQ(inside->size(), 2u);
  EXPECT_EQ((*inside)[0].offset, 1 * kMiB + 4 * kKiB);
  EXPECT_EQ((*inside)[0].length, 60 * kKiB);
  EXPECT_EQ((*inside)[1].offset, 3136 * kKiB);
  EXPECT_EQ((*inside)[1].length, 64 * kKiB);
  // qemu-nbd without -e serves one client at a time.
  ASSERT_TRUE((*source)->Close().ok());
  // Without --bitmap there is nothing to read changes from.
  auto plain = convert::OpenSource(server->uri(), {});
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ((*plain)->DirtyRanges(0, kImageSize).status().code(), Status::Code::kNotSupported);
  ASSERT_TRUE((*plain)->Close().ok());

  // `map --bitmap` shows the same ranges.
  CommandResult map = Zqcow("map --output=json --bitmap b0 " + Q(server->uri()));
  ASSERT_EQ(map.exit_code, 0) << map.output;
  std::vector<std::pair<uint64_t, uint64_t>> mapped;
  for (const auto& entry : ParseJson(map.output)) {
    if (entry["dirty"].get<bool>()) {
      mapped.emplace_back(entry["start"].get<uint64_t>(), entry["length"].get<uint64_t>());
    }
  }
  EXPECT_EQ(mapped, want);
}

TEST_F(DirtyBitmapTest, ABitmapTheServerDoesNotExportFailsClearly) {
  auto server = NbdServer::QemuNbd(dir_.path(), {"-f", "qcow2", "-r", "-B", "b0", image_});
  ASSERT_TRUE(server);
  auto source = convert::OpenSource(server->uri(), BitmapOptions("nope"));
  ASSERT_FALSE(source.ok());
  EXPECT_EQ(source.status().message(),
            server->uri() + ": dirty bitmap 'nope' is not exported by the server");
  // An incremental (--bitmap goes with -B) over a full backup of the same export.
  const std::string previous = dir_.File("previous.qcow2");
  CommandResult full = Zqcow("convert -c " + Q(server->uri()) + " " + Q(previous));
  ASSERT_EQ(full.exit_code, 0) << full.output;
  CommandResult r = Zqcow("convert -c -B " + Q(previous) + " --bitmap nope " +
                          Q(server->uri()) + " " + Q(target_));
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(Lines(r.output), 1u) << r.output;
  EXPECT_NE(r.output.find("dirty bitmap 'nope' is not exported"), std::string::npos) << r.output;
  struct stat st {};
  EXPECT_NE(stat(target_.c_str(), &st), 0) << "no target for a backup that never started";
  EXPECT_NE(stat(PartialTargetPath(target_).c_str(), &st), 0) << "nor a partial image";
}

TEST_F(NbdSourceTest, ConnectionRefusedIsOneLineNamingTheUri) {
  const std::string uri = "nbd+unix:///?socket=" + dir_.File("nobody.sock");
  for (const std::string& command : {"convert " + Q(uri) + " " + Q(target_), "info " + Q(uri),
                                     "map " + Q(uri), "compare " + Q(uri) + " " + Q(raw_)}) {
    CommandResult r = Zqcow(command);
    EXPECT_NE(r.exit_code, 0) << command;
    EXPECT_EQ(Lines(r.output), 1u) << r.output;
    EXPECT_NE(r.output.find(uri + ": cannot connect to the NBD server"), std::string::npos)
        << r.output;
  }
  // TCP, nothing listening on the port.
  CommandResult tcp = Zqcow("info nbd://127.0.0.1:1/x");
  EXPECT_NE(tcp.exit_code, 0);
  EXPECT_NE(tcp.output.find("nbd://127.0.0.1:1/x: cannot connect to the NBD server"),
            std::string::npos)
      << tcp.output;
  EXPECT_NE(tcp.output.find("refused"), std::string::npos) << tcp.output;
  // qcow2 over NBD is not something zqcow reads.
  CommandResult format = Zqcow("convert -f qcow2 " + Q(uri) + " " + Q(target_));
  EXPECT_NE(format.exit_code, 0);
  EXPECT_NE(format.output.find("read as raw"), std::string::npos) << format.output;
}

TEST_F(NbdSourceTest, ServerKilledMidConversionFailsAndLeavesNoCompleteTarget) {
  // Every read waits 1 s: 64 MiB cannot be read before the server is killed.
  auto server =
      NbdServer::Nbdkit(dir_.path(), {"--filter=delay", "pattern", "size=64M", "rdelay=1"});
  ASSERT_TRUE(server);
  const std::string log = dir_.File("convert.log");
  const std::string binary = ZqcowBinary();
  const std::string uri = server->uri();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, STDOUT_FILENO);
      dup2(fd, STDERR_FILENO);
    }
    execl(binary.c_str(), binary.c_str(), "convert", "-c", uri.c_str(), target_.c_str(),
          static_cast<char*>(nullptr));
    _exit(127);
  }
  // Kill the server once the conversion is under way (its partial image exists).
  const std::string partial = PartialTargetPath(target_);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  struct stat st {};
  while (stat(partial.c_str(), &st) != 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // reads in flight, likely
  server->Kill();
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  const std::vector<uint8_t> bytes = ReadWholeFile(log);
  const std::string output(bytes.begin(), bytes.end());
  ASSERT_TRUE(WIFEXITED(status)) << output;
  EXPECT_EQ(WEXITSTATUS(status), 1) << output;
  EXPECT_EQ(Lines(output), 1u) << output;
  EXPECT_NE(output.find(uri + ": "), std::string::npos) << output;
  EXPECT_NE(output.find("the connection to the NBD server was lost"), std::string::npos) << output;
  EXPECT_NE(stat(target_.c_str(), &st), 0) << "DST appears only when complete";
  if (stat(partial.c_str(), &st) == 0) {
    const std::vector<uint8_t> image = ReadWholeFile(partial);
    ASSERT_GT(image.size(), kHeaderIncompatibleFeaturesLastByte);
    EXPECT_TRUE(image[kHeaderIncompatibleFeaturesLastByte] & 1) << "the partial looks complete";
  }
}

TEST_F(NbdSourceTest, MemoryStaysBoundedWhateverTheExportSize) {
  if (testing::kSanitizerBuild) GTEST_SKIP() << "resident memory is only bounded in plain builds";
  constexpr uint64_t kMaxRss = 64 * kMiB;
  // 1 TiB that reads as zeros (block status says so: nothing is read) ...
  auto empty = NbdServer::Nbdkit(dir_.path(), {"null", "1T"});
  ASSERT_TRUE(empty);
  nlohmann::json stats = ConvertOk(empty->uri());
  EXPECT_EQ(stats.value("bytes_read", ~0ull), 0u);
  EXPECT_LT(stats.value("peak_rss_bytes", ~0ull), kMaxRss);
  empty.reset();
  // ... and 48 MiB of data, all read over several connections.
  auto full = NbdServer::Nbdkit(dir_.path(), {"pattern", "48M"});
  ASSERT_TRUE(full);
  stats = ConvertOk(full->uri());
  EXPECT_EQ(stats.value("bytes_read", 0ull), 48 * kMiB);
  EXPECT_LT(stats.value("peak_rss_bytes", ~0ull), kMaxRss);
}

TEST_F(NbdSourceTest, InfoMapAndCompareAgreeWithQemuImg) {
  const std::string image = dir_.File("disk.qcow2");
  ASSERT_EQ(RunCommand("qemu-img convert -O qcow2 " + Q(raw_) + " " + Q(image)).exit_code, 0);
  ASSERT_EQ(RunCommand("qemu-io -f qcow2 -c 'write -z 1M 1M' " + Q(image)).exit_code, 0);
  auto server = NbdServer::QemuNbd(dir_.path(), {"-f", "qcow2", "-r", image});
  ASSERT_TRUE(server);
  const std::string uri = server->uri();

  CommandResult ours = Zqcow("info --output=json " + Q(uri));
  CommandResult qemu = RunCommand("qemu-img info --output=json " + Q(uri));
  ASSERT_EQ(ours.exit_code, 0) << ours.output;
  ASSERT_EQ(qemu.exit_code, 0) << qemu.output;
  nlohmann::json a = ParseJson(ours.output), b = ParseJson(qemu.output);
  EXPECT_EQ(a["virtual-size"], b["virtual-size"]);
  EXPECT_EQ(a["format"], b["format"]);
  CommandResult human = Zqcow("info " + Q(uri));
  EXPECT_NE(human.output.find("file format: raw"), std::string::npos) << human.output;
  EXPECT_NE(human.output.find("disk size: unavailable"), std::string::npos) << human.output;

  ours = Zqcow("map --output=json " + Q(uri));
  qemu = RunCommand("qemu-img map --output=json " + Q(uri));
  ASSERT_EQ(ours.exit_code, 0) << ours.output;
  ASSERT_EQ(qemu.exit_code, 0) << qemu.output;
  auto normalize = [](const nlohmann::json& list) {
    std::vector<std::tuple<uint64_t, uint64_t, bool, bool, uint64_t>> out;
    for (const auto& e : list) {
      out.emplace_back(e["start"].get<uint64_t>(), e["length"].get<uint64_t>(),
                       e["data"].get<bool>(), e["zero"].get<bool>(), e.value("offset", ~0ull));
    }
    return out;
  };
  const auto ours_map = normalize(ParseJson(ours.output));
  EXPECT_EQ(ours_map, normalize(ParseJson(qemu.output)));
  EXPECT_GT(ours_map.size(), 1u) << "the export has zero and data ranges";

  CommandResult same = Zqcow("compare " + Q(uri) + " " + Q(raw_));
  EXPECT_EQ(same.exit_code, 1) << "the zeroed MiB differs from the raw file: " << same.output;
  CommandResult qemu_same = RunCommand("qemu-img compare " + Q(uri) + " " + Q(raw_));
  EXPECT_EQ(same.output, qemu_same.output);
  CommandResult identical = Zqcow("compare " + Q(uri) + " " + Q(image));
  EXPECT_EQ(identical.exit_code, 0) << identical.output;
}

}  // namespace
}  // namespace zqcow
