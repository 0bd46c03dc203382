// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Images with backing files, built by qemu-img and qemu-io: opened read-only, zqcow reads
// them through the whole chain exactly as `qemu-img convert -O raw` does, and maps them as
// `qemu-img map` does (depth included). Broken chains fail with a clear error.

#include "qcow2/backing.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow::qcow2 {
namespace {

using zqcow::testing::ReadWholeFile;
using zqcow::testing::RunCommand;
using zqcow::testing::ShellQuote;
using zqcow::testing::TempDir;

void RunOk(const std::string& command) {
  auto result = RunCommand(command);
  ASSERT_EQ(result.exit_code, 0) << command << "\n" << result.output;
}

void QemuIo(const std::string& image, const std::vector<std::string>& commands) {
  std::string line = "qemu-io -f qcow2";
  for (const std::string& c : commands) line += " -c " + ShellQuote(c);
  RunOk(line + " " + ShellQuote(image));
}

// What qemu-img reads from `image`, as a raw file.
std::vector<uint8_t> QemuContents(const TempDir& dir, const std::string& image) {
  const std::string raw = dir.File("expected.raw");
  auto converted =
      RunCommand("qemu-img convert -O raw " + ShellQuote(image) + " " + ShellQuote(raw));
  EXPECT_EQ(converted.exit_code, 0) << converted.output;
  return ReadWholeFile(raw);
}

std::unique_ptr<Image> OpenReadOnly(const std::string& path, bool direct_io = false) {
  OpenOptions options;
  options.io.direct_io = direct_io;
  auto opened = Image::Open(path, options);
  EXPECT_TRUE(opened.ok()) << opened.status().ToString();
  return opened.ok() ? std::move(opened).value() : nullptr;
}

// The fields of `qemu-img map --output=json` both tools print, extent by extent.
std::string QemuMap(const std::string& image) {
  auto map = RunCommand("qemu-img map --output=json " + ShellQuote(image));
  EXPECT_EQ(map.exit_code, 0) << map.output;
  std::string out;
  for (const auto& e : nlohmann::json::parse(map.output)) {
    out += std::to_string(e["start"].get<uint64_t>()) + "+" +
           std::to_string(e["length"].get<uint64_t>()) + " depth " +
           std::to_string(e["depth"].get<int>()) + (e["present"].get<bool>() ? " present" : "") +
           (e["zero"].get<bool>() ? " zero" : "") + (e["data"].get<bool>() ? " data" : "") + "\n";
  }
  return out;
}

std::string OurMap(Image* image) {
  auto extents = image->Map(0, image->virtual_size());
  EXPECT_TRUE(extents.ok()) << extents.status().ToString();
  std::string out;
  if (!extents.ok()) return out;
  // Merge as qemu-img does: same depth and flags, adjacent (compressed counts as data).
  struct Flat {
    uint64_t start, length;
    uint32_t depth;
    bool present, zero, data;
  };
  std::vector<Flat> flat;
  for (const MapExtent& e : *extents) {
    const bool present = e.kind != MapExtent::Kind::kUnallocated;
    const bool data = e.kind == MapExtent::Kind::kData || e.kind == MapExtent::Kind::kCompressed;
    Flat f{e.guest_offset, e.length, e.depth, present, !data, data};
    if (!flat.empty() && flat.back().start + flat.back().length == f.start &&
        flat.back().depth == f.depth && flat.back().present == f.present &&
        flat.back().data == f.data) {
      flat.back().length += f.length;
    } else {
      flat.push_back(f);
    }
  }
  for (const Flat& f : flat) {
    out += std::to_string(f.start) + "+" + std::to_string(f.length) + " depth " +
           std::to_string(f.depth) + (f.present ? " present" : "") + (f.zero ? " zero" : "") +
           (f.data ? " data" : "") + "\n";
  }
  return out;
}

void ExpectReadsLikeQemu(Image* image, const std::vector<uint8_t>& expected) {
  ASSERT_EQ(image->virtual_size(), expected.size());
  std::vector<uint8_t> back(expected.size());
  Status s = image->Read(0, back);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(back == expected);
  // Small unaligned reads across cluster edges too.
  for (uint64_t offset : {uint64_t{1000}, uint64_t{65536 - 100}, expected.size() - 3000}) {
    std::vector<uint8_t> piece(2000);
    ASSERT_TRUE(image->Read(offset, piece).ok());
    EXPECT_TRUE(std::equal(piece.begin(), piece.end(), expected.begin() + offset)) << offset;
  }
}

// base (zstd, 64 KiB clusters, 6 MiB) <- mid (4 KiB clusters, 8 MiB) <- top (zlib, 64 KiB
// clusters, 10 MiB, bigger than both): data, compressed data, zero clusters and discards
// at each level, some covering data below.
class ChainTest : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(zqcow::testing::HaveQemu());
    base_ = dir_.File("base.qcow2");
    mid_ = dir_.File("mid.qcow2");
    top_ = dir_.File("top.qcow2");
    RunOk("qemu-img create -q -f qcow2 -o compression_type=zstd " + ShellQuote(base_) + " 6M");
    QemuIo(base_, {"write -P 0x11 0 2M", "write -c -P 0x12 2M 1M", "write -P 0x13 5M 1M"});
    // Names relative to the directory of the image that names them.
    RunOk(
        "cd " + ShellQuote(dir_.path()) +
        " && qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 mid.qcow2 8M");
    QemuIo(mid_, {"write -P 0x21 1M 512k", "write -z 2M 256k", "write -c -P 0x22 7M 64k",
                  "discard 5M 128k"});
    RunOk("cd " + ShellQuote(dir_.path()) +
          " && qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 10M");
    QemuIo(top_, {"write -P 0x31 1536k 1M", "write -c -P 0x32 9M 64k", "write -z 5M 64k",
                  "write -P 0x33 100 3000"});
  }

  TempDir dir_;
  std::string base_, mid_, top_;
};

TEST_P(ChainTest, ReadsAndMapsThroughTheChainLikeQemu) {
  const bool direct_io = GetParam();
  const std::vector<uint8_t> expected = QemuContents(dir_, top_);
  auto image = OpenReadOnly(top_, direct_io);
  ASSERT_NE(image, nullptr);
  EXPECT_EQ(image->Info().backing_file, "mid.qcow2");
  EXPECT_EQ(image->Info().backing_format, "qcow2");
  ExpectReadsLikeQemu(image.get(), expected);
  EXPECT_EQ(OurMap(image.get()), QemuMap(top_));
  EXPECT_TRUE(image->Close().ok());
}

TEST_P(ChainTest, WithoutBackingFormatTheBackingFileIsProbed) {
  // Images written before QEMU required a backing format have no such extension. Turn
  // top's into an unknown (ignored) extension type: the backing file is probed then.
  std::vector<uint8_t> bytes = ReadWholeFile(top_);
  const uint8_t type[4] = {0xe2, 0x79, 0x2a, 0xca};
  auto found = std::search(bytes.begin() + 104, bytes.begin() + 4096, type, type + 4);
  ASSERT_NE(found, bytes.begin() + 4096);
  found[0] = 0x0f;  // some type nobody defines
  zqcow::testing::WriteWholeFile(top_, bytes);
  auto image = OpenReadOnly(top_, GetParam());
  ASSERT_NE(image, nullptr);
  EXPECT_EQ(image->Info().backing_format, "");
  ExpectReadsLikeQemu(image.get(), QemuContents(dir_, top_));
}

INSTANTIATE_TEST_SUITE_P(IoModes, ChainTest, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Direct" : "Buffered"; });

TEST(BackingTest, RawBackingFile) {
  ASSERT_TRUE(zqcow::testing::HaveQemu());
  TempDir dir;
  const std::string raw = dir.File("base.raw");
  const std::string top = dir.File("top.qcow2");
  // Sparse, odd-sized raw file: the overlay is bigger and reads zeros past it.
  RunOk("truncate -s 3000000 " + ShellQuote(raw));
  RunOk("printf 'hello backing' | dd of=" + ShellQuote(raw) +
        " bs=1 seek=1500000 conv=notrunc status=none");
  RunOk("qemu-img create -q -f qcow2 -b " + ShellQuote(raw) + " -F raw " + ShellQuote(top) + " 4M");
  QemuIo(top, {"write -P 0x44 1M 64k"});
  auto image = OpenReadOnly(top);
  ASSERT_NE(image, nullptr);
  EXPECT_EQ(image->Info().backing_format, "raw");
  ExpectReadsLikeQemu(image.get(), QemuContents(dir, top));
  // Holes of the raw file map as zeros at depth 1, its data as data, the rest at depth 0.
  auto extents = image->Map(0, image->virtual_size());
  ASSERT_TRUE(extents.ok());
  bool raw_data = false, beyond = false;
  for (const MapExtent& e : *extents) {
    if (e.depth == 1 && e.kind == MapExtent::Kind::kData) {
      raw_data = true;
      EXPECT_LE(e.guest_offset, 1500000u);
      EXPECT_GE(e.guest_offset + e.length, 1500013u);
    }
    if (e.guest_offset + e.length == image->virtual_size()) {
      beyond = e.depth == 0 && e.kind == MapExtent::Kind::kUnallocated;
    }
  }
  EXPECT_TRUE(raw_data);
  EXPECT_TRUE(beyond);
}

TEST(BackingTest, BrokenChainsFailNamingTheFile) {
  ASSERT_TRUE(zqcow::testing::HaveQemu());
  TempDir dir;
  const std::string missing = dir.File("missing.qcow2");
  RunOk("qemu-img create -q -f qcow2 -u -b gone.qcow2 -F qcow2 " + ShellQuote(missing) + " 1M");
  auto opened = Image::Open(missing, OpenOptions());
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), Status::Code::kNotFound);
  EXPECT_NE(opened.status().message().find("gone.qcow2"), std::string::npos)
      << opened.status().ToString();

  const std::string loop = dir.File("loop.qcow2");
  RunOk("qemu-img create -q -f qcow2 " + ShellQuote(loop) + " 1M");
  RunOk("qemu-img rebase -u -b loop.qcow2 -F qcow2 " + ShellQuote(loop));
  opened = Image::Open(loop, OpenOptions());
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), Status::Code::kNotSupported);
  EXPECT_NE(opened.status().message().find("deeper than"), std::string::npos)
      << opened.status().ToString();
  EXPECT_LT(opened.status().message().size(), 200u) << "one line, not the chain repeated";

  const std::string other = dir.File("other.qcow2");
  RunOk("qemu-img create -q -f qcow2 -u -b x.vmdk -F vmdk " + ShellQuote(other) + " 1M");
  opened = Image::Open(other, OpenOptions());
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), Status::Code::kNotSupported);
  EXPECT_NE(opened.status().message().find("vmdk"), std::string::npos);
}

// Overlays open writable (src/qcow2/overlay_test.cc), with their chain: a missing backing
// file is refused the same way as when reading.
TEST(BackingTest, WritableOverlayNeedsItsBackingFile) {
  ASSERT_TRUE(zqcow::testing::HaveQemu());
  TempDir dir;
  const std::string base = dir.File("base.qcow2");
  const std::string top = dir.File("top.qcow2");
  RunOk("qemu-img create -q -f qcow2 " + ShellQuote(base) + " 1M");
  RunOk("qemu-img create -q -f qcow2 -b " + ShellQuote(base) + " -F qcow2 " + ShellQuote(top));
  OpenOptions options;
  options.writable = true;
  auto opened = Image::Open(top, options);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  EXPECT_EQ((*opened)->Info().backing_chain, std::vector<std::string>{base});
  ASSERT_TRUE((*opened)->Close().ok());
  ASSERT_EQ(unlink(base.c_str()), 0);
  opened = Image::Open(top, options);
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), Status::Code::kNotFound) << opened.status().ToString();
  EXPECT_NE(opened.status().message().find("backing file"), std::string::npos);
}

}  // namespace
}  // namespace zqcow::qcow2
