// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// What QEMU needs from our deflate streams: raw deflate that a plain zlib inflate with
// windowBits -12 reads, and no back-reference farther than 4 KiB.

#include <gtest/gtest.h>
#include <zlib.h>

#include <string>
#include <vector>

#include "codec/codec.h"
#include "testing/test_util.h"

namespace zqcow::codec {
namespace {

using ::zqcow::testing::DataKind;
using ::zqcow::testing::MakeData;

constexpr int kQemuWindowBits = -12;  // raw deflate, 4 KiB window: how QEMU inflates
constexpr size_t kWindowSize = size_t{1} << kDeflateWindowBits;
constexpr size_t kFarRepeat = 8192;  // a repeat distance only a 32 KiB window can use
constexpr size_t kOutputSlack = 4096;

size_t WorstCaseOutput(size_t input_size) { return input_size + input_size / 16 + kOutputSlack; }

// Inflates the way QEMU does: one inflate(Z_FINISH) call into the whole cluster; done when
// the cluster is full.
bool QemuStyleInflate(const std::vector<uint8_t>& stream, std::vector<uint8_t>& cluster) {
  z_stream z{};
  if (inflateInit2(&z, kQemuWindowBits) != Z_OK) return false;
  z.next_in = const_cast<Bytef*>(stream.data());
  z.avail_in = static_cast<uInt>(stream.size());
  z.next_out = cluster.data();
  z.avail_out = static_cast<uInt>(cluster.size());
  const int ret = inflate(&z, Z_FINISH);
  const bool ok = (ret == Z_STREAM_END || ret == Z_OK || ret == Z_BUF_ERROR) && z.avail_out == 0;
  inflateEnd(&z);
  return ok;
}

// Inflates with a 4 KiB window, producing ONE byte per call: every back-reference must then
// be served from zlib's 4 KiB window, so any distance > 4096 fails ("invalid distance too
// far back"). An exact check that the stream fits QEMU's window.
bool FitsFourKiBWindow(const std::vector<uint8_t>& stream, const std::vector<uint8_t>& expected) {
  z_stream z{};
  if (inflateInit2(&z, kQemuWindowBits) != Z_OK) return false;
  z.next_in = const_cast<Bytef*>(stream.data());
  z.avail_in = static_cast<uInt>(stream.size());
  size_t produced = 0;
  bool ok = true;
  while (produced < expected.size()) {
    uint8_t byte = 0;
    z.next_out = &byte;
    z.avail_out = 1;
    const int ret = inflate(&z, Z_NO_FLUSH);
    if (ret != Z_OK && ret != Z_STREAM_END) {
      ok = false;
      break;
    }
    if (z.avail_out == 0) {
      if (byte != expected[produced]) {
        ok = false;
        break;
      }
      ++produced;
    } else if (ret == Z_STREAM_END) {
      ok = false;  // ended early
      break;
    }
  }
  inflateEnd(&z);
  return ok;
}

// Random 8 KiB blocks, each repeated once: the only matches are 8 KiB back.
std::vector<uint8_t> FarRepeatData(size_t size) {
  std::vector<uint8_t> data(size);
  for (size_t offset = 0; offset < size; offset += 2 * kFarRepeat) {
    const auto block = MakeData(DataKind::kRandom, kFarRepeat, offset);
    for (size_t i = 0; i < 2 * kFarRepeat && offset + i < size; ++i) {
      data[offset + i] = block[i % kFarRepeat];
    }
  }
  return data;
}

// The same data half text: near matches too, so the stream is not just literals.
std::vector<uint8_t> FarRepeatTextData(size_t size) {
  std::vector<uint8_t> data = FarRepeatData(size);
  const auto text = MakeData(DataKind::kText, size, 5);
  for (size_t i = 0; i < size; ++i) {
    if ((i / 512) % 2 == 0) data[i] = text[i];
  }
  return data;
}

std::vector<uint8_t> Compress(Compressor& compressor, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> stream(WorstCaseOutput(data.size()));
  auto size = compressor.Compress(data, stream);
  EXPECT_TRUE(size.ok()) << size.status().ToString();
  EXPECT_GT(size.ok() ? *size : 0, 0u);
  stream.resize(size.ok() ? *size : 0);
  return stream;
}

// Sanity of the checker: zlib with a 32 KiB window uses the 8 KiB repeats, and the check
// catches it, while QEMU-style inflate of the same stream into one buffer would not.
TEST(DeflateWindowTest, CheckerCatchesFarBackReferences) {
  const auto data = FarRepeatData(65536);
  z_stream z{};
  ASSERT_EQ(deflateInit2(&z, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY), Z_OK);
  std::vector<uint8_t> stream(WorstCaseOutput(data.size()));
  z.next_in = const_cast<Bytef*>(data.data());
  z.avail_in = static_cast<uInt>(data.size());
  z.next_out = stream.data();
  z.avail_out = static_cast<uInt>(stream.size());
  ASSERT_EQ(deflate(&z, Z_FINISH), Z_STREAM_END);
  stream.resize(z.total_out);
  deflateEnd(&z);
  EXPECT_LT(stream.size(), data.size() * 3 / 4);  // it did use the far repeats
  EXPECT_FALSE(FitsFourKiBWindow(stream, data));
}

class DeflateLevelTest : public ::testing::TestWithParam<int> {};

TEST_P(DeflateLevelTest, NeverReachesBeyondFourKiB) {
  auto compressor = MakeCompressor(CompressionType::kDeflate, GetParam());
  ASSERT_TRUE(compressor.ok());
  for (const auto& data :
       {FarRepeatData(65536), FarRepeatTextData(65536), FarRepeatTextData(size_t{2} << 20)}) {
    const auto stream = Compress(**compressor, data);
    EXPECT_TRUE(FitsFourKiBWindow(stream, data)) << data.size();
  }
  for (size_t cluster_size : {size_t{512}, size_t{4096}, size_t{65536}}) {
    for (DataKind kind : {DataKind::kText, DataKind::kMixed, DataKind::kOnes}) {
      const auto data = MakeData(kind, cluster_size, 21);
      const auto stream = Compress(**compressor, data);
      EXPECT_TRUE(FitsFourKiBWindow(stream, data))
          << cluster_size << " kind " << static_cast<int>(kind);
    }
  }
}

TEST_P(DeflateLevelTest, PlainZlibInflateReadsOurStreams) {
  auto compressor = MakeCompressor(CompressionType::kDeflate, GetParam());
  ASSERT_TRUE(compressor.ok());
  for (size_t cluster_size : {size_t{512}, size_t{4096}, size_t{65536}, size_t{2} << 20}) {
    for (DataKind kind : {DataKind::kText, DataKind::kMixed, DataKind::kOnes, DataKind::kRandom}) {
      const auto data = MakeData(kind, cluster_size, 22);
      const auto stream = Compress(**compressor, data);
      std::vector<uint8_t> cluster(cluster_size);
      ASSERT_TRUE(QemuStyleInflate(stream, cluster))
          << cluster_size << " kind " << static_cast<int>(kind);
      ASSERT_TRUE(cluster == data);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllLevels, DeflateLevelTest,
                         ::testing::Range(kMinDeflateLevel, kMaxDeflateLevel + 1));

// A stream written by plain zlib -12 (QEMU's own writer) reads back through our decompressor.
TEST(DeflateDecompressorTest, ReadsQemuStyleStreams) {
  const auto data = MakeData(DataKind::kMixed, 65536, 23);
  z_stream z{};
  ASSERT_EQ(
      deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, kQemuWindowBits, 9, Z_DEFAULT_STRATEGY),
      Z_OK);
  std::vector<uint8_t> stream(WorstCaseOutput(data.size()));
  z.next_in = const_cast<Bytef*>(data.data());
  z.avail_in = static_cast<uInt>(data.size());
  z.next_out = stream.data();
  z.avail_out = static_cast<uInt>(stream.size());
  ASSERT_EQ(deflate(&z, Z_FINISH), Z_STREAM_END);
  stream.resize(z.total_out);
  deflateEnd(&z);
  stream.resize(stream.size() + 300, 0xa5);  // the rest of the sector
  std::vector<uint8_t> cluster(data.size());
  Status status = MakeDecompressor(CompressionType::kDeflate)->Decompress(stream, cluster);
  ASSERT_TRUE(status.ok()) << status.ToString();
  EXPECT_TRUE(cluster == data);
}

// Boundary: a repeat exactly 4096 bytes back is inside QEMU's window. igzip (the default
// level) uses it, and the exact checker accepts it. (zlib itself stops at 4096 - 262.)
TEST(DeflateWindowTest, RepeatExactlyFourKiBBackIsUsedAndAccepted) {
  std::vector<uint8_t> data = MakeData(DataKind::kRandom, kWindowSize, 24);
  data.insert(data.end(), data.begin(), data.end());
  auto compressor =
      MakeCompressor(CompressionType::kDeflate, DefaultLevel(CompressionType::kDeflate));
  ASSERT_TRUE(compressor.ok());
  const auto stream = Compress(**compressor, data);
  EXPECT_LT(stream.size(), data.size() * 3 / 4);  // the 4096-back match was used
  EXPECT_TRUE(FitsFourKiBWindow(stream, data));
  std::vector<uint8_t> cluster(data.size());
  ASSERT_TRUE(MakeDecompressor(CompressionType::kDeflate)->Decompress(stream, cluster).ok());
  EXPECT_TRUE(cluster == data);
}

}  // namespace
}  // namespace zqcow::codec
