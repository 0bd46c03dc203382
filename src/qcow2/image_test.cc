// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// End-to-end tests of the image engine against the real qemu-img / qemu-io: images zqcow
// writes must pass `qemu-img check` and compare equal to a raw file with the same data;
// images qemu writes must read back identically through zqcow.

#include "zqcow/image.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "codec/codec.h"
#include "qcow2/image_test_util.h"
#include "testing/test_util.h"

namespace zqcow {
namespace {

using testing::DataKind;
using testing::MakeData;
using testing::QemuImgCheck;
using testing::QemuImgCompare;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;

using qcow2::testing::CodecOf;
using qcow2::testing::CompressCluster;
using qcow2::testing::ExpectCleanAndEqual;
using qcow2::testing::RawTwin;

struct Params {
  uint32_t cluster_size;
  uint32_t refcount_bits;
  Compression compression;
};

class ImageWriteTest : public ::testing::TestWithParam<Params> {};

TEST_P(ImageWriteTest, MixedNormalAndCompressedPassCheckAndCompare) {
  const Params p = GetParam();
  TempDir dir;
  const std::string path = dir.File("a.qcow2");
  // Not a multiple of the cluster size.
  const uint64_t clusters = 40;
  const uint64_t size = clusters * p.cluster_size - p.cluster_size / 2 + 7;
  CreateOptions options;
  options.virtual_size = size;
  options.cluster_size = p.cluster_size;
  options.refcount_bits = p.refcount_bits;
  options.compression = p.compression;
  auto created = Image::Create(path, options);
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  auto image = std::move(created).value();
  auto compressor =
      codec::MakeCompressor(CodecOf(p.compression), codec::DefaultLevel(CodecOf(p.compression)));
  ASSERT_TRUE(compressor.ok());
  RawTwin raw(dir.File("a.raw"), size);
  for (uint64_t c = 0; c < clusters; ++c) {
    uint64_t offset = c * p.cluster_size;
    uint64_t len = std::min<uint64_t>(p.cluster_size, size - offset);
    switch (c % 5) {
      case 0:
      case 1:
      case 3: {  // compressed
        auto data = MakeData(c % 2 ? DataKind::kText : DataKind::kMixed, len, c);
        auto compressed = CompressCluster(compressor->get(), data, p.cluster_size);
        if (compressed.empty()) {
          ASSERT_TRUE(image->Write(offset, data).ok());
        } else {
          Status s = image->WriteCompressed(offset, compressed);
          ASSERT_TRUE(s.ok()) << s.ToString();
        }
        raw.Write(offset, data);
        break;
      }
      case 2: {  // normal, written in two unaligned halves
        auto data = MakeData(DataKind::kRandom, len, c);
        uint64_t half = len / 2 + 3;
        half = std::min(half, len);
        ASSERT_TRUE(image->Write(offset, {data.data(), half}).ok());
        ASSERT_TRUE(image->Write(offset + half, {data.data() + half, len - half}).ok());
        raw.Write(offset, data);
        break;
      }
      default:  // left unallocated
        break;
    }
  }
  // Partial overwrite of a compressed cluster (read-modify-write, old reference released).
  auto patch = MakeData(DataKind::kRandom, 100, 99);
  ASSERT_TRUE(image->Write(p.cluster_size + 10, patch).ok());
  raw.Write(p.cluster_size + 10, patch);
  // Read back through zqcow.
  std::vector<uint8_t> back(size);
  Status s = image->Read(0, back);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_TRUE(back == raw.data());
  s = image->Close();
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectCleanAndEqual(path, raw);
}

INSTANTIATE_TEST_SUITE_P(
    Geometries, ImageWriteTest,
    ::testing::Values(Params{65536, 16, Compression::kZlib}, Params{65536, 16, Compression::kZstd},
                      Params{512, 16, Compression::kZlib}, Params{4096, 1, Compression::kZstd},
                      Params{4096, 64, Compression::kZlib}, Params{2097152, 16, Compression::kZstd},
                      Params{512, 1, Compression::kZlib}, Params{65536, 64, Compression::kZstd}));

}  // namespace
}  // namespace zqcow

namespace zqcow {
namespace {

using qcow2::testing::NewCompressor;
using qcow2::testing::WriteCluster;

// Image::Read of many whole clusters groups their data into few requests: compressed
// clusters packed back to back (also across host clusters and small gaps), normal clusters
// on consecutive host clusters. Written here in an order that puts the host data in every
// arrangement: ascending runs, descending runs, runs broken by normal clusters and by
// clusters left unallocated or zero. Every read (whole image, odd windows), with and
// without O_DIRECT and from the reopened image, must match the raw twin.
class GroupedReadTest : public ::testing::TestWithParam<std::tuple<uint32_t, bool>> {};

TEST_P(GroupedReadTest, EveryLayoutReadsBackIdentically) {
  const auto [cluster_size, direct_io] = GetParam();
  TempDir dir;
  const std::string path = dir.File("g.qcow2");
  const uint64_t clusters = 300;
  const uint64_t size = clusters * cluster_size;
  IoOptions io;
  io.direct_io = direct_io;
  auto created =
      Image::Create(path, qcow2::testing::ImageOptions(size, cluster_size, Compression::kZstd), io);
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  auto image = std::move(created).value();
  RawTwin raw(dir.File("g.raw"), size);
  auto compressor = NewCompressor(Compression::kZstd);
  std::vector<uint64_t> order;
  for (uint64_t c = 0; c < 100; ++c) order.push_back(c);             // ascending
  for (uint64_t c = 200; c-- > 100;) order.push_back(c);             // descending
  for (uint64_t c = 200; c < clusters; c += 2) order.push_back(c);   // every other ...
  for (uint64_t c = 201; c < clusters; c += 2) order.push_back(c);   // ... then the rest
  for (uint64_t c : order) {
    const uint64_t offset = c * cluster_size;
    if (c % 11 == 5) continue;  // unallocated
    DataKind kind = c % 7 == 3 ? DataKind::kRandom : (c % 3 ? DataKind::kText : DataKind::kMixed);
    auto data = MakeData(kind, cluster_size, c + 1);
    if (c % 13 == 4) std::fill(data.begin(), data.end(), 0);  // all zero, still written
    Status s = c % 17 == 8 ? image->Write(offset, data)
                           : WriteCluster(image.get(), compressor.get(), offset, data);
    ASSERT_TRUE(s.ok()) << s.ToString();
    raw.Write(offset, data);
  }
  auto check_reads = [&](Image& img) {
    std::vector<uint8_t> back(size);
    Status s = img.Read(0, back);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_TRUE(back == raw.data());
    // Windows starting and ending inside clusters, and whole-cluster windows.
    std::mt19937_64 rng(cluster_size);
    for (int i = 0; i < 40; ++i) {
      const uint64_t start = i % 2 ? rng() % size : (rng() % clusters) * cluster_size;
      const uint64_t length = std::min<uint64_t>(size - start, 1 + rng() % (40 * cluster_size));
      std::vector<uint8_t> window(length);
      s = img.Read(start, window);
      ASSERT_TRUE(s.ok()) << s.ToString();
      ASSERT_TRUE(std::equal(window.begin(), window.end(), raw.data().begin() + start))
          << "window " << start << " +" << length;
    }
  };
  check_reads(*image);  // some data may still be in the write cache
  Status s = image->Close();
  ASSERT_TRUE(s.ok()) << s.ToString();
  OpenOptions open;
  open.io = io;
  auto opened = Image::Open(path, open);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  check_reads(**opened);
  ASSERT_TRUE((*opened)->Close().ok());
  ExpectCleanAndEqual(path, raw);
}

INSTANTIATE_TEST_SUITE_P(Layouts, GroupedReadTest,
                         ::testing::Combine(::testing::Values(512u, 4096u, 65536u),
                                            ::testing::Bool()));

}  // namespace
}  // namespace zqcow
