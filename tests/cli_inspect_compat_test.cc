// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// check, info, map and compare as drop-ins for qemu-img's: a table of command lines run
// through both `qemu-img` and `zqcow` on the same small images, comparing exit codes and
// stdout (exactly, or JSON key by key and value by value, zqcow's documented extra keys
// aside). Then the leak repair (-r leaks) against qemu-img's, and the error line of every
// option zqcow does not support.

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow {
namespace {

using testing::CommandResult;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;
using testing::ZqcowBinary;

// JSON keys zqcow prints that qemu-img 7.2 does not (docs/CLI.md): check's "incomplete",
// "corrupt-flag", "messages"; info's "file-size", "incomplete"; map's "compressed" (which
// newer QEMU prints too).
const std::set<std::string> kZqcowOnlyKeys = {"incomplete", "corrupt-flag", "messages",
                                              "file-size", "compressed"};

// kProgress: the same, after the last progress line (its steps differ: zqcow reports per
// 1 GiB window, qemu-img per block status extent).
enum class Match { kExact, kProgress, kJson, kExitOnly };

std::string AfterProgress(const std::string& text) {
  const size_t cr = text.rfind('\r');
  return cr == std::string::npos ? text : text.substr(cr + 1);
}

struct Row {
  std::string args;  // after the program name; image names relative to the directory
  Match match;
};

class InspectCompatTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(testing::HaveQemu()) << "qemu-img and qemu-io are needed (scripts/setup)";
    dir_ = new TempDir();
    const std::vector<std::string> setup = {
        "qemu-img create -q -f qcow2 base.qcow2 4M",
        "qemu-io -c 'write -P 1 0 1M' base.qcow2",
        "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2",
        "qemu-io -c 'write -P 2 512k 1M' top.qcow2",
        "qemu-img bitmap --add top.qcow2 b0",
        "qemu-img convert -O raw top.qcow2 top.raw",
        "qemu-img convert -O qcow2 base.qcow2 copy.qcow2",
        "qemu-img create -q -f qcow2 comp.qcow2 4M",
        "qemu-io -c 'write -c -P 3 0 128k' comp.qcow2",
        "qemu-img convert -O qcow2 comp.qcow2 uncomp.qcow2",
        "qemu-img create -q -f qcow2 -o compression_type=zstd zstd.qcow2 1M",
        "qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M",
        "qemu-img create -q -f qcow2 empty.qcow2 4M",
        "qemu-img create -q -f qcow2 big.qcow2 8M",
        "qemu-img create -q -f qcow2 zero.qcow2 4M",
        "qemu-io -c 'write -z 0 64k' zero.qcow2",
        "qemu-img create -q -f qcow2 zerodata.qcow2 4M",
        "qemu-io -c 'write -P 0 0 64k' zerodata.qcow2",
        "qemu-img create -q -f qcow2 frag.qcow2 4M",
        "qemu-io -c 'write -P 4 192k 64k' -c 'write -P 5 0 64k' frag.qcow2",
        // A leak: the header cluster's refcount raised to 2.
        "qemu-img create -q -f qcow2 leak.qcow2 4M",
        "qemu-io -c 'write -P 1 0 256k' leak.qcow2",
        // The refcount table moved past end of file.
        "cp base.qcow2 reftable.qcow2",
        // Extended L2 entries (subclusters): partial clusters allocated, zeroed, compressed,
        // over a backing file that has them too; and 16 KiB clusters (512-byte subclusters).
        "qemu-img create -q -f qcow2 -o extended_l2=on xbase.qcow2 4M",
        "qemu-io -c 'write -P 7 0 1M' -c 'write -P 8 3M 100k' xbase.qcow2",
        "qemu-img create -q -f qcow2 -o extended_l2=on -b xbase.qcow2 -F qcow2 xtop.qcow2",
        "qemu-io -c 'write -P 9 4k 4k' -c 'write -P 10 70k 8k' -c 'write -z 200k 6k' "
        "-c 'write -z 2M 128k' -c 'write -c -P 11 1536k 64k' -c 'write -P 12 3000k 2k' "
        "xtop.qcow2",
        "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16k xsmall.qcow2 1M",
        "qemu-io -c 'write -P 5 1k 1k' -c 'write -z 8k 1k' -c 'write -P 6 15k 2k' xsmall.qcow2",
    };
    for (const std::string& command : setup) {
      CommandResult r = RunCommand("cd " + ShellQuote(dir_->path()) + " && " + command);
      ASSERT_EQ(r.exit_code, 0) << command << ": " << r.output;
    }
    PatchBE(dir_->File("reftable.qcow2"), 48, 8, 100 * 65536);
    std::vector<uint8_t> leak = testing::ReadWholeFile(dir_->File("leak.qcow2"));
    const uint64_t table = ReadBE(leak, 48, 8);
    const uint64_t block = ReadBE(leak, table, 8);
    PatchBE(dir_->File("leak.qcow2"), block, 2, 2);
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
  }

  static uint64_t ReadBE(const std::vector<uint8_t>& bytes, size_t offset, size_t width) {
    uint64_t value = 0;
    for (size_t i = 0; i < width; ++i) value = (value << 8) | bytes.at(offset + i);
    return value;
  }
  static void PatchBE(const std::string& path, size_t offset, size_t width, uint64_t value) {
    std::vector<uint8_t> bytes = testing::ReadWholeFile(path);
    for (size_t i = 0; i < width; ++i) {
      bytes.at(offset + width - 1 - i) = static_cast<uint8_t>(value >> (8 * i));
    }
    testing::WriteWholeFile(path, bytes);
  }

  // Runs `program args` in the image directory; stdout only (stderr dropped).
  static CommandResult Run(const std::string& program, const std::string& args) {
    return RunCommand("cd " + ShellQuote(dir_->path()) + " && " + program + " " + args +
                      " 2>/dev/null");
  }
  static CommandResult RunWithStderr(const std::string& program, const std::string& args) {
    return RunCommand("cd " + ShellQuote(dir_->path()) + " && " + program + " " + args);
  }

  static TempDir* dir_;
};
TempDir* InspectCompatTest::dir_ = nullptr;

// Every key and value qemu-img prints must be in zqcow's output, equal; zqcow may add only
// kZqcowOnlyKeys.
void ExpectJsonMatches(const nlohmann::json& qemu, const nlohmann::json& ours,
                       const std::string& where) {
  if (qemu.is_object()) {
    ASSERT_TRUE(ours.is_object()) << where;
    for (const auto& [key, value] : qemu.items()) {
      ASSERT_TRUE(ours.contains(key)) << where << ": zqcow lacks key " << key;
      ExpectJsonMatches(value, ours[key], where + "." + key);
    }
    for (const auto& [key, value] : ours.items()) {
      EXPECT_TRUE(qemu.contains(key) || kZqcowOnlyKeys.count(key) != 0)
          << where << ": zqcow adds key " << key;
    }
  } else if (qemu.is_array()) {
    ASSERT_TRUE(ours.is_array()) << where;
    ASSERT_EQ(qemu.size(), ours.size()) << where << "\nqemu: " << qemu << "\nzqcow: " << ours;
    for (size_t i = 0; i < qemu.size(); ++i) {
      ExpectJsonMatches(qemu[i], ours[i], where + "[" + std::to_string(i) + "]");
    }
  } else {
    EXPECT_EQ(qemu, ours) << where;
  }
}

TEST_F(InspectCompatTest, SameCommandLinesGiveTheSameResults) {
  const std::vector<Row> rows = {
      // check
      {"check top.qcow2", Match::kExact},  // persistent bitmaps: clean, no false leaks
      {"check --output=json top.qcow2", Match::kJson},
      {"check comp.qcow2", Match::kExact},  // fragmented (compressed) clusters
      {"check --output=json comp.qcow2", Match::kJson},
      {"check frag.qcow2", Match::kExact},
      {"check --output=json frag.qcow2", Match::kJson},
      {"check empty.qcow2", Match::kExact},
      {"check --output=json empty.qcow2", Match::kJson},
      {"check leak.qcow2", Match::kExact},
      {"check --output=json leak.qcow2", Match::kJson},
      {"check -q leak.qcow2", Match::kExact},
      {"check -q --output=json leak.qcow2", Match::kExact},
      {"check -U top.qcow2", Match::kExact},
      {"check reftable.qcow2", Match::kExact},  // exit 2
      {"check --output=json reftable.qcow2", Match::kJson},
      {"check -f qcow2 v2.qcow2", Match::kExact},
      {"check missing.qcow2", Match::kExitOnly},
      // info
      {"info top.qcow2", Match::kExact},
      {"info --output=json top.qcow2", Match::kJson},
      {"info --backing-chain top.qcow2", Match::kExact},
      {"info --backing-chain --output=json top.qcow2", Match::kJson},
      {"info -U --output=json base.qcow2", Match::kJson},
      {"info --output=json comp.qcow2", Match::kJson},
      {"info --output=json zstd.qcow2", Match::kJson},
      {"info zstd.qcow2", Match::kExact},
      {"info --output=json v2.qcow2", Match::kJson},
      {"info v2.qcow2", Match::kExact},
      {"info --output=json top.raw", Match::kJson},
      {"info missing.qcow2", Match::kExitOnly},
      // map
      {"map top.qcow2", Match::kExact},
      {"map --output=json top.qcow2", Match::kJson},
      {"map --start-offset=600k --max-length=1M top.qcow2", Match::kExact},
      {"map --output=json --start-offset=600k --max-length=1M top.qcow2", Match::kJson},
      {"map --output=json --start-offset=5M top.qcow2", Match::kJson},
      {"map --output=json --max-length=100000 top.qcow2", Match::kJson},
      {"map --output=json comp.qcow2", Match::kJson},
      {"map --output=json zero.qcow2", Match::kJson},
      {"map top.raw", Match::kExact},
      {"map --output=json top.raw", Match::kJson},
      // compare
      {"compare base.qcow2 copy.qcow2", Match::kExact},
      {"compare -s base.qcow2 copy.qcow2", Match::kExact},
      {"compare zero.qcow2 empty.qcow2", Match::kExact},
      {"compare -s zero.qcow2 empty.qcow2", Match::kExact},    // zero != unallocated
      {"compare -s zero.qcow2 zerodata.qcow2", Match::kExact}, // zero != zero data
      {"compare top.qcow2 base.qcow2", Match::kExact},
      {"compare -s top.qcow2 base.qcow2", Match::kExact},
      {"compare big.qcow2 empty.qcow2", Match::kExact},
      {"compare -s big.qcow2 empty.qcow2", Match::kExact},  // size mismatch
      {"compare -q top.qcow2 base.qcow2", Match::kExact},
      {"compare -q base.qcow2 copy.qcow2", Match::kExact},
      {"compare top.raw top.qcow2", Match::kExact},
      {"compare -s top.raw top.qcow2", Match::kExact},
      {"compare -s comp.qcow2 uncomp.qcow2", Match::kExact},  // compressed != normal
      {"compare -p top.raw top.qcow2", Match::kProgress},
      {"compare -f raw -F qcow2 top.raw top.qcow2", Match::kExact},
      {"compare -s -f raw -F raw top.raw top.raw", Match::kExact},
      {"compare top.qcow2 missing.qcow2", Match::kExitOnly},
      // extended L2 entries
      {"check xbase.qcow2", Match::kExact},
      {"check xtop.qcow2", Match::kExact},
      {"check --output=json xtop.qcow2", Match::kJson},
      {"check xsmall.qcow2", Match::kExact},
      {"info xtop.qcow2", Match::kExact},
      {"info --output=json --backing-chain xtop.qcow2", Match::kJson},
      {"map xbase.qcow2", Match::kExact},  // (xtop has a compressed cluster: see docs)
      {"compare xtop.qcow2 xbase.qcow2", Match::kExact},
      {"compare xbase.qcow2 base.qcow2", Match::kExact},
      {"compare -s xsmall.qcow2 xsmall.qcow2", Match::kExact},
  };
  for (const Row& row : rows) {
    SCOPED_TRACE(row.args);
    CommandResult qemu = Run("qemu-img", row.args);
    CommandResult ours = Run(ZqcowBinary(), row.args);
    EXPECT_EQ(qemu.exit_code, ours.exit_code) << "qemu-img: " << qemu.output
                                              << "\nzqcow: " << ours.output;
    switch (row.match) {
      case Match::kExact:
        EXPECT_EQ(qemu.output, ours.output);
        break;
      case Match::kProgress:
        EXPECT_EQ(AfterProgress(qemu.output), AfterProgress(ours.output));
        EXPECT_EQ(ours.output.rfind("    (0.00/100%)\r", 0), 0u) << ours.output;
        break;
      case Match::kJson: {
        auto q = nlohmann::json::parse(qemu.output, nullptr, false);
        auto z = nlohmann::json::parse(ours.output, nullptr, false);
        ASSERT_FALSE(q.is_discarded()) << qemu.output;
        ASSERT_FALSE(z.is_discarded()) << ours.output;
        // "actual-size" is the file's allocation, which the two reads see alike; keep it.
        ExpectJsonMatches(q, z, row.args);
        break;
      }
      case Match::kExitOnly:
        EXPECT_NE(ours.exit_code, 0);
        break;
    }
  }
}

// Where qemu-img's map says a range reads as zeros, zqcow's says so too, and the same for
// data (with the same host offset). qemu-img also gives the host offset of unallocated and
// zero subclusters of an allocated cluster, which zqcow leaves out (docs/CLI.md).
void ExpectSameMapIgnoringZeroOffsets(nlohmann::json qemu, nlohmann::json ours) {
  for (auto* list : {&qemu, &ours}) {
    for (auto& e : *list) {
      if (!e["data"].get<bool>()) e.erase("offset");
      e.erase("compressed");
    }
  }
  // Merge neighbours that became equal.
  auto merged = [](const nlohmann::json& list) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& e : list) {
      if (!out.empty()) {
        auto& last = out.back();
        auto a = last, b = e;
        a.erase("start"), a.erase("length"), b.erase("start"), b.erase("length");
        if (a == b && !a.contains("offset")) {
          last["length"] = last["length"].get<uint64_t>() + e["length"].get<uint64_t>();
          continue;
        }
      }
      out.push_back(e);
    }
    return out;
  };
  EXPECT_EQ(merged(qemu), merged(ours));
}

TEST_F(InspectCompatTest, ExtendedL2ImagesReadLikeQemu) {
  for (const std::string image : {"xbase.qcow2", "xtop.qcow2", "xsmall.qcow2"}) {
    SCOPED_TRACE(image);
    ExpectSameMapIgnoringZeroOffsets(
        nlohmann::json::parse(Run("qemu-img", "map --output=json " + image).output),
        nlohmann::json::parse(Run(ZqcowBinary(), "map --output=json " + image).output));
    for (const std::string options : {"-O qcow2", "-O qcow2 -c"}) {
      SCOPED_TRACE(options);
      const std::string out = "out-" + image;
      CommandResult convert = Run(ZqcowBinary(), "convert -f qcow2 " + options + " " + image +
                                                     " " + out + " --force");
      ASSERT_EQ(convert.exit_code, 0) << convert.output;
      EXPECT_EQ(Run("qemu-img", "compare " + image + " " + out).exit_code, 0);
      {
        EXPECT_EQ(testing::QemuImgCheck(dir_->File(out)).exit_code, 0);
      }
    }
  }
  // Read only: a writable open is refused, naming the feature.
  OpenOptions writable;
  writable.writable = true;
  auto opened = Image::Open(dir_->File("xtop.qcow2"), writable);
  ASSERT_FALSE(opened.ok());
  EXPECT_NE(opened.status().message().find("extended L2"), std::string::npos)
      << opened.status().message();
}

TEST_F(InspectCompatTest, RepairLeaksLikeQemuImg) {
  for (const std::string& output : {std::string(), std::string("--output=json ")}) {
    SCOPED_TRACE(output);
    ASSERT_EQ(RunCommand("cd " + ShellQuote(dir_->path()) +
                         " && cp leak.qcow2 q.qcow2 && cp leak.qcow2 z.qcow2")
                  .exit_code,
              0);
    CommandResult qemu = Run("qemu-img", "check -r leaks " + output + "q.qcow2");
    CommandResult ours = Run(ZqcowBinary(), "check -r leaks " + output + "z.qcow2");
    EXPECT_EQ(qemu.exit_code, 0) << qemu.output;
    EXPECT_EQ(ours.exit_code, 0) << ours.output;
    if (output.empty()) {
      EXPECT_EQ(qemu.output, ours.output);
    } else {
      auto q = nlohmann::json::parse(qemu.output);
      auto z = nlohmann::json::parse(ours.output);
      q.erase("filename");
      z.erase("filename");
      ExpectJsonMatches(q, z, "check -r leaks --output=json");
    }
    // The repaired image is clean for qemu-img and byte-identical to QEMU's repair.
    EXPECT_EQ(testing::QemuImgCheck(dir_->File("z.qcow2")).exit_code, 0);
    EXPECT_EQ(testing::ReadWholeFile(dir_->File("z.qcow2")),
              testing::ReadWholeFile(dir_->File("q.qcow2")));
  }
}

TEST_F(InspectCompatTest, RepairKeepsPersistentBitmaps) {
  // top.qcow2 carries bitmap b0; a leak added to it (the header cluster's refcount raised).
  const std::string image = dir_->File("bitmap-leak.qcow2");
  ASSERT_EQ(RunCommand("cp " + ShellQuote(dir_->File("top.qcow2")) + " " + ShellQuote(image))
                .exit_code,
            0);
  std::vector<uint8_t> bytes = testing::ReadWholeFile(image);
  const uint64_t block = ReadBE(bytes, ReadBE(bytes, 48, 8), 8);
  PatchBE(image, block, 2, 2);
  EXPECT_EQ(testing::QemuImgCheck(image).exit_code, 3);
  CommandResult r = Run(ZqcowBinary(), "check -r leaks bitmap-leak.qcow2");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  // Clean for qemu-img: the bitmap's clusters were not taken for leaks.
  EXPECT_EQ(testing::QemuImgCheck(image).exit_code, 0);
  CommandResult info = Run("qemu-img", "info --output=json bitmap-leak.qcow2");
  EXPECT_NE(info.output.find("\"b0\""), std::string::npos) << info.output;
}

TEST_F(InspectCompatTest, RepairRefusesImagesWithCorruption) {
  ASSERT_EQ(RunCommand("cd " + ShellQuote(dir_->path()) + " && cp reftable.qcow2 r.qcow2")
                .exit_code,
            0);
  const std::vector<uint8_t> before = testing::ReadWholeFile(dir_->File("r.qcow2"));
  CommandResult r = RunWithStderr(ZqcowBinary(), "check -r leaks r.qcow2");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(testing::ReadWholeFile(dir_->File("r.qcow2")), before) << "nothing written";
}

TEST_F(InspectCompatTest, RepairTakesTheWriteLock) {
  // A qemu-io holding the image open for writing (it reads commands from a FIFO this shell
  // keeps open) locks zqcow out; closing the FIFO ends it.
  const std::string image = dir_->File("locked.qcow2");
  const std::string fifo = dir_->File("qemu-io.fifo");
  ASSERT_EQ(RunCommand("cp " + ShellQuote(dir_->File("leak.qcow2")) + " " + ShellQuote(image))
                .exit_code,
            0);
  const std::string script =
      "mkfifo " + ShellQuote(fifo) + " && (qemu-io " + ShellQuote(image) + " <" +
      ShellQuote(fifo) + " >/dev/null 2>&1 &) && exec 3>" + ShellQuote(fifo) +
      // Wait until qemu-io holds the image (qemu-img info then fails on the lock).
      " && i=0; while qemu-img info " + ShellQuote(image) +
      " >/dev/null 2>&1 && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; " + ZqcowBinary() +
      " check -r leaks " + ShellQuote(image) + "; echo rc=$?; exec 3>&-";
  CommandResult r = RunCommand(script);
  EXPECT_NE(r.output.find("rc=1"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("lock"), std::string::npos) << r.output;
  // Nothing was written: QEMU still finds the leak.
  EXPECT_EQ(testing::QemuImgCheck(image).exit_code, 3);
}

TEST_F(InspectCompatTest, UnsupportedOptionsAreNamed) {
  struct Refusal {
    std::string args;
    std::string named;  // what the error line must name
  };
  const std::vector<Refusal> refusals = {
      {"check -r all leak.qcow2", "-r all"},
      {"check --image-opts leak.qcow2", "--image-opts"},
      {"check -T none leak.qcow2", "-T"},
      {"check --object secret,id=s0,data=x leak.qcow2", "--object"},
      {"info --image-opts top.qcow2", "--image-opts"},
      {"info --object secret,id=s0,data=x top.qcow2", "--object"},
      {"map --image-opts top.qcow2", "--image-opts"},
      {"map --object secret,id=s0,data=x top.qcow2", "--object"},
      {"compare --image-opts base.qcow2 copy.qcow2", "--image-opts"},
      {"compare -T none base.qcow2 copy.qcow2", "-T"},
      {"compare --object secret,id=s0,data=x base.qcow2 copy.qcow2", "--object"},
  };
  for (const Refusal& refusal : refusals) {
    SCOPED_TRACE(refusal.args);
    CommandResult r = RunWithStderr(ZqcowBinary(), refusal.args);
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find(refusal.named), std::string::npos) << r.output;
  }
}

}  // namespace
}  // namespace zqcow
