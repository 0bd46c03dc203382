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
