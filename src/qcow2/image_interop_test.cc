// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Images written by qemu-io (write, write -c, write -z, discard) read back through zqcow
// exactly as `qemu-img convert -O raw` reads them; zqcow can then append to them and the
// result still passes qemu-img check.

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "qcow2/image_test_util.h"
#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow::qcow2 {
namespace {

using testing::ExpectCleanAndEqual;
using testing::NewCompressor;
using testing::RawTwin;
using zqcow::testing::DataKind;
using zqcow::testing::MakeData;
using zqcow::testing::ReadWholeFile;
using zqcow::testing::RunCommand;
using zqcow::testing::ShellQuote;
using zqcow::testing::TempDir;

struct Params {
  std::string create_options;  // qemu-img create -o
  uint32_t cluster_size;
};

class QemuWrittenTest : public ::testing::TestWithParam<Params> {};

std::string Kib(uint64_t clusters, uint32_t cluster_size) {
  return std::to_string(clusters * cluster_size / 1024) + "k";
}

TEST_P(QemuWrittenTest, ReadsBackLikeQemuAndAppends) {
  const Params p = GetParam();
  ASSERT_TRUE(zqcow::testing::HaveQemu());
  TempDir dir;
  const std::string image = dir.File("q.qcow2");
  const uint64_t clusters = 24;
  // Not a multiple of the cluster size.
  const uint64_t size = clusters * p.cluster_size - 512;
  auto created = RunCommand("qemu-img create -q -f qcow2 -o " + p.create_options +
                            ",cluster_size=" + std::to_string(p.cluster_size) + " " +
                            ShellQuote(image) + " " + std::to_string(size));
  ASSERT_EQ(created.exit_code, 0) << created.output;
  auto at = [&](uint64_t c) { return Kib(c, p.cluster_size); };
  std::string cmds;
  cmds += " -c " + ShellQuote("write -P 0x11 0 " + at(3));
  cmds += " -c " + ShellQuote("write -c -P 0x22 " + at(3) + " " + at(1));
  cmds += " -c " + ShellQuote("write -c -P 0x33 " + at(4) + " " + at(1));
  cmds += " -c " + ShellQuote("write -c -P 0x44 " + at(5) + " " + at(2));
  cmds += " -c " + ShellQuote("write -P 0x55 " + at(8) + " " + at(4));
  cmds += " -c " + ShellQuote("write -z " + at(9) + " " + at(2));
  cmds += " -c " + ShellQuote("discard " + at(11) + " " + at(1));
  cmds += " -c " + ShellQuote("write -P 0x66 1234 777");  // partial, inside cluster 0
  cmds += " -c " + ShellQuote("write -c -P 0x77 " + at(clusters - 1) + " " +
                              std::to_string(p.cluster_size - 512));  // last, partial
  auto written = RunCommand("qemu-io -f qcow2" + cmds + " " + ShellQuote(image));
  ASSERT_EQ(written.exit_code, 0) << written.output;
  const std::string expected_path = dir.File("q.raw");
  auto converted =
      RunCommand("qemu-img convert -O raw " + ShellQuote(image) + " " + ShellQuote(expected_path));
  ASSERT_EQ(converted.exit_code, 0) << converted.output;
  std::vector<uint8_t> expected = ReadWholeFile(expected_path);
  ASSERT_EQ(expected.size(), size);

  {
    OpenOptions options;
    auto opened = Image::Open(image, options);
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    std::vector<uint8_t> back(size);
    Status s = (*opened)->Read(0, back);
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(back == expected);
    // Unaligned small reads too.
    std::vector<uint8_t> piece(1000);
    ASSERT_TRUE((*opened)->Read(1000, piece).ok());
    EXPECT_TRUE(std::equal(piece.begin(), piece.end(), expected.begin() + 1000));
    auto map = (*opened)->Map(0, size);
    ASSERT_TRUE(map.ok()) << map.status().ToString();
    bool saw_compressed = false;
    uint64_t covered = 0;
    for (const auto& e : *map) {
      saw_compressed |= e.kind == MapExtent::Kind::kCompressed;
      EXPECT_EQ(e.guest_offset, covered);
      covered += e.length;
    }
    EXPECT_EQ(covered, size);
    EXPECT_TRUE(saw_compressed);
    EXPECT_TRUE((*opened)->Write(0, piece).ToString().find("read-only") != std::string::npos);
    ASSERT_TRUE((*opened)->Close().ok());
  }

  // Append through zqcow: overwrite some clusters compressed, some normal, zero and
  // discard a few, then qemu-img check and compare.
  RawTwin raw(dir.File("r.raw"), size);
  raw.Write(0, expected);
  {
    OpenOptions options;
    options.writable = true;
    auto opened = Image::Open(image, options);
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    Image* img = opened->get();
    auto compressor = NewCompressor(img->compression());
    for (uint64_t c : {1u, 3u, 8u, 13u, 20u}) {
      auto data = MakeData(c % 2 ? DataKind::kText : DataKind::kRandom, p.cluster_size, c);
      Status s = testing::WriteCluster(img, compressor.get(), c * p.cluster_size, data);
      ASSERT_TRUE(s.ok()) << s.ToString();
      raw.Write(c * p.cluster_size, data);
    }
    ASSERT_TRUE(img->WriteZeroes(4 * p.cluster_size, p.cluster_size + 100).ok());
    raw.Zero(4 * p.cluster_size, p.cluster_size + 100);
    ASSERT_TRUE(img->Discard(5 * p.cluster_size + 100, 2 * p.cluster_size).ok());
    // Discard only releases the whole cluster 6.
    raw.Zero(6 * p.cluster_size, p.cluster_size);
    Status s = img->Close();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  ExpectCleanAndEqual(image, raw);
}

INSTANTIATE_TEST_SUITE_P(Formats, QemuWrittenTest,
                         ::testing::Values(Params{"compat=1.1", 65536},
                                           Params{"compat=1.1,compression_type=zstd", 65536},
                                           Params{"compat=0.10", 65536},
                                           Params{"compat=1.1,refcount_bits=1", 4096},
                                           Params{"compat=1.1", 512},
                                           Params{"compat=1.1,compression_type=zstd", 2097152}));

}  // namespace
}  // namespace zqcow::qcow2
