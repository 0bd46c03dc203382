// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Codec names, levels, and round trips of every level of both codecs over several kinds of
// data and every cluster size that matters (512 B .. 2 MiB).

#include "codec/codec.h"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "testing/test_util.h"

namespace zqcow::codec {
namespace {

using ::zqcow::testing::DataKind;
using ::zqcow::testing::MakeData;

constexpr size_t kClusterSizes[] = {512, 4096, 65536, 2 << 20};
constexpr size_t kLargestCluster = 2 << 20;
// zstd's slowest strategies (btopt and up, levels 16..19) compress ~2 MB/s: at 2 MiB they
// round-trip only the two data kinds that bracket the behaviour, to keep the test fast.
constexpr int kFirstSlowZstdLevel = 16;
bool SkipAtLargestCluster(CompressionType type, int level, const std::string& data_name) {
  return type == CompressionType::kZstd && level >= kFirstSlowZstdLevel && data_name != "ones" &&
         data_name != "random";
}
// Room for any codec's framing around small clusters.
constexpr size_t kOutputSlack = 4096;
// Room for an incompressible cluster: zlib with a 4 KiB window cannot fall back to stored
// blocks for its 16 Ki-symbol blocks and codes random bytes at ~8.1 bits each.
size_t WorstCaseOutput(size_t input_size) { return input_size + input_size / 16 + kOutputSlack; }

// Machine code: the bytes of this test program, tiled if it is shorter than `size`.
std::vector<uint8_t> BinaryData(size_t size) {
  std::ifstream in("/proc/self/exe", std::ios::binary);
  std::vector<uint8_t> data(size);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(size));
  const size_t got = static_cast<size_t>(in.gcount());
  EXPECT_GT(got, 0u);
  for (size_t i = got; i < size && got > 0; ++i) data[i] = data[i % got];
  return data;
}

struct NamedData {
  std::string name;
  std::vector<uint8_t> bytes;
};

// Generated once per cluster size and shared by every test (generation dominates the
// run time under sanitizers otherwise).
const std::vector<NamedData>& TestData(size_t size) {
  static std::map<size_t, std::vector<NamedData>> cache;
  auto it = cache.find(size);
  if (it == cache.end()) {
    std::vector<NamedData> data = {{"text", MakeData(DataKind::kText, size, 1)},
                                   {"binary", BinaryData(size)},
                                   {"ones", MakeData(DataKind::kOnes, size, 2)},
                                   {"random", MakeData(DataKind::kRandom, size, 3)},
                                   {"mixed", MakeData(DataKind::kMixed, size, 4)}};
    it = cache.emplace(size, std::move(data)).first;
  }
  return it->second;
}

std::vector<int> AllLevels(CompressionType type) {
  std::vector<int> levels;
  if (type == CompressionType::kDeflate) {
    for (int level = kMinDeflateLevel; level <= kMaxDeflateLevel; ++level) levels.push_back(level);
  } else {
    for (int level = kMinZstdLevel; level <= kMaxZstdLevel; ++level) {
      if (level != 0) levels.push_back(level);
    }
  }
  return levels;
}

TEST(CodecNamesTest, ParseAndName) {
  auto zlib = ParseCompressionType("zlib");
  ASSERT_TRUE(zlib.ok());
  EXPECT_EQ(*zlib, CompressionType::kDeflate);
  auto deflate = ParseCompressionType("deflate");
  ASSERT_TRUE(deflate.ok());
  EXPECT_EQ(*deflate, CompressionType::kDeflate);
  auto zstd = ParseCompressionType("zstd");
  ASSERT_TRUE(zstd.ok());
  EXPECT_EQ(*zstd, CompressionType::kZstd);
  for (const char* bad : {"", "gzip", "ZSTD", "zlib "}) {
    auto parsed = ParseCompressionType(bad);
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_EQ(parsed.status().code(), Status::Code::kInvalidArgument);
  }
  EXPECT_EQ(CompressionTypeName(CompressionType::kDeflate), "zlib");
  EXPECT_EQ(CompressionTypeName(CompressionType::kZstd), "zstd");
  EXPECT_EQ(static_cast<int>(CompressionType::kDeflate), 0);
  EXPECT_EQ(static_cast<int>(CompressionType::kZstd), 1);
}

TEST(CodecLevelsTest, DefaultsAreValid) {
  for (auto type : {CompressionType::kDeflate, CompressionType::kZstd}) {
    EXPECT_TRUE(ValidateLevel(type, DefaultLevel(type)).ok());
    EXPECT_TRUE(MakeCompressor(type, DefaultLevel(type)).ok());
  }
  EXPECT_EQ(DefaultLevel(CompressionType::kZstd), 3);  // QEMU's fixed zstd level
  // The deflate default is served by igzip (the measured fast engine).
  EXPECT_EQ(kDeflateLevels[DefaultLevel(CompressionType::kDeflate) - kMinDeflateLevel].engine,
            DeflateEngine::kIsal);
  // Level 6 is QEMU's zlib level.
  EXPECT_EQ(kDeflateLevels[6 - kMinDeflateLevel].engine, DeflateEngine::kZlib);
  EXPECT_EQ(kDeflateLevels[6 - kMinDeflateLevel].engine_level, 6);
}

TEST(CodecLevelsTest, OutOfRangeRejected) {
  for (int bad : {-1, 0, 10, 100}) {
    EXPECT_EQ(ValidateLevel(CompressionType::kDeflate, bad).code(), Status::Code::kInvalidArgument)
        << bad;
    auto compressor = MakeCompressor(CompressionType::kDeflate, bad);
    ASSERT_FALSE(compressor.ok());
    EXPECT_EQ(compressor.status().code(), Status::Code::kInvalidArgument);
  }
  for (int bad : {-6, 0, 20, 22}) {
    EXPECT_EQ(ValidateLevel(CompressionType::kZstd, bad).code(), Status::Code::kInvalidArgument)
        << bad;
    EXPECT_FALSE(MakeCompressor(CompressionType::kZstd, bad).ok());
  }
}

class RoundTripTest : public ::testing::TestWithParam<std::tuple<CompressionType, int>> {};

TEST_P(RoundTripTest, EveryClusterSizeAndDataKind) {
  const auto [type, level] = GetParam();
  auto compressor = MakeCompressor(type, level);
  ASSERT_TRUE(compressor.ok()) << compressor.status().ToString();
  auto decompressor = MakeDecompressor(type);
  ASSERT_NE(decompressor, nullptr);
  std::vector<uint8_t> compressed(WorstCaseOutput(kLargestCluster));
  std::vector<uint8_t> restored;
  // The same objects serve every cluster: state must be reset between them.
  for (size_t cluster_size : kClusterSizes) {
    for (const NamedData& data : TestData(cluster_size)) {
      if (cluster_size == kLargestCluster && SkipAtLargestCluster(type, level, data.name)) {
        continue;
      }
      SCOPED_TRACE(data.name + " " + std::to_string(cluster_size));
      auto size = (*compressor)->Compress(data.bytes, compressed);
      ASSERT_TRUE(size.ok()) << size.status().ToString();
      ASSERT_GT(*size, 0u);
      if (data.name == "ones") {
        EXPECT_LT(*size, cluster_size / 4);
      } else if (data.name == "text") {
        EXPECT_LT(*size, cluster_size * 3 / 4);
      }
      restored.assign(cluster_size, 0xee);
      Status status = decompressor->Decompress(std::span(compressed).first(*size), restored);
      ASSERT_TRUE(status.ok()) << status.ToString();
      ASSERT_TRUE(restored == data.bytes);
    }
  }
}

std::vector<std::tuple<CompressionType, int>> AllTypesAndLevels() {
  std::vector<std::tuple<CompressionType, int>> params;
  for (auto type : {CompressionType::kDeflate, CompressionType::kZstd}) {
    for (int level : AllLevels(type)) params.emplace_back(type, level);
  }
  return params;
}

INSTANTIATE_TEST_SUITE_P(AllLevels, RoundTripTest, ::testing::ValuesIn(AllTypesAndLevels()),
                         [](const ::testing::TestParamInfo<RoundTripTest::ParamType>& info) {
                           const int level = std::get<1>(info.param);
                           return std::string(CompressionTypeName(std::get<0>(info.param))) +
                                  "_level_" +
                                  (level < 0 ? "minus_" + std::to_string(-level)
                                             : std::to_string(level));
                         });

class CodecContractTest : public ::testing::TestWithParam<std::tuple<CompressionType, int>> {};

TEST_P(CodecContractTest, IncompressibleDoesNotFit) {
  const auto [type, level] = GetParam();
  auto compressor = MakeCompressor(type, level);
  ASSERT_TRUE(compressor.ok());
  for (size_t cluster_size : {size_t{512}, size_t{65536}}) {
    auto random = MakeData(DataKind::kRandom, cluster_size, 7);
    for (size_t output_size : {cluster_size - 1, cluster_size, cluster_size / 2, size_t{1}}) {
      std::vector<uint8_t> output(output_size);  // exact size: ASan catches any overrun
      auto size = (*compressor)->Compress(random, output);
      ASSERT_TRUE(size.ok()) << size.status().ToString();
      EXPECT_EQ(*size, 0u) << cluster_size << " into " << output_size;
    }
    std::vector<uint8_t> none;
    auto size = (*compressor)->Compress(random, none);
    ASSERT_TRUE(size.ok());
    EXPECT_EQ(*size, 0u);
  }
}

TEST_P(CodecContractTest, TightOutputEitherFitsOrReturnsZero) {
  const auto [type, level] = GetParam();
  auto compressor = MakeCompressor(type, level);
  ASSERT_TRUE(compressor.ok());
  auto decompressor = MakeDecompressor(type);
  const auto data = MakeData(DataKind::kMixed, 65536, 8);
  std::vector<uint8_t> roomy(data.size() + kOutputSlack);
  auto full = (*compressor)->Compress(data, roomy);
  ASSERT_TRUE(full.ok());
  ASSERT_GT(*full, 0u);
  // One byte short never fits; the exact size either fits (same stream) or is refused.
  for (size_t output_size : {*full - 1, *full}) {
    std::vector<uint8_t> output(output_size);
    auto size = (*compressor)->Compress(data, output);
    ASSERT_TRUE(size.ok());
    if (output_size < *full) {
      EXPECT_EQ(*size, 0u);
    } else if (*size != 0) {
      EXPECT_EQ(*size, *full);
      std::vector<uint8_t> restored(data.size());
      ASSERT_TRUE(decompressor->Decompress(std::span(output).first(*size), restored).ok());
      EXPECT_EQ(restored, data);
    }
  }
  // And the compressor is still usable after refusing.
  auto again = (*compressor)->Compress(data, roomy);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *full);
}

TEST_P(CodecContractTest, TrailingBytesIgnoredTruncationAndGarbageRejected) {
  const auto [type, level] = GetParam();
  auto compressor = MakeCompressor(type, level);
  ASSERT_TRUE(compressor.ok());
  auto decompressor = MakeDecompressor(type);
  const auto data = MakeData(DataKind::kText, 4096, 9);
  std::vector<uint8_t> stream(data.size() + kOutputSlack);
  auto size = (*compressor)->Compress(data, stream);
  ASSERT_TRUE(size.ok());
  ASSERT_GT(*size, 0u);
  stream.resize(*size);
  std::vector<uint8_t> restored(data.size());

  // Trailing garbage (the rest of a sector, the next cluster's stream) is ignored.
  std::vector<uint8_t> padded = stream;
  const auto garbage = MakeData(DataKind::kRandom, 1000, 10);
  padded.insert(padded.end(), garbage.begin(), garbage.end());
  ASSERT_TRUE(decompressor->Decompress(padded, restored).ok());
  EXPECT_EQ(restored, data);

  // Every truncation: never a crash; short ones are corruption. (A stream cut only in its
  // final end-of-block bits may still fill the cluster, and QEMU accepts that too.)
  for (size_t cut = 0; cut < stream.size(); ++cut) {
    std::vector<uint8_t> truncated(stream.begin(), stream.begin() + cut);  // exact: ASan
    Status status = decompressor->Decompress(truncated, restored);
    if (status.ok()) {
      EXPECT_GT(cut, stream.size() / 2) << cut;
      EXPECT_EQ(restored, data) << cut;
    } else {
      EXPECT_EQ(status.code(), Status::Code::kCorruption) << cut << ": " << status.ToString();
    }
  }

  // Garbage that is no stream at all.
  std::vector<uint8_t> all_ff(512, 0xff);
  Status status = decompressor->Decompress(all_ff, restored);
  EXPECT_EQ(status.code(), Status::Code::kCorruption) << status.ToString();
  // Random bytes and bit flips: whatever they decode to, never a crash or another error.
  for (uint64_t seed = 0; seed < 64; ++seed) {
    std::vector<uint8_t> mangled =
        seed < 32 ? MakeData(DataKind::kRandom, stream.size(), seed) : stream;
    if (seed >= 32) {
      mangled[seed * 7919 % mangled.size()] ^= static_cast<uint8_t>(1u << (seed % 8));
    }
    status = decompressor->Decompress(mangled, restored);
    if (!status.ok()) {
      EXPECT_EQ(status.code(), Status::Code::kCorruption) << status.ToString();
    }
  }

  // After all those failures the decompressor still works.
  restored.assign(data.size(), 0);
  ASSERT_TRUE(decompressor->Decompress(stream, restored).ok());
  EXPECT_EQ(restored, data);
}

TEST_P(CodecContractTest, StreamEndingBeforeClusterIsFullIsCorruption) {
  const auto [type, level] = GetParam();
  auto compressor = MakeCompressor(type, level);
  ASSERT_TRUE(compressor.ok());
  auto decompressor = MakeDecompressor(type);
  const auto data = MakeData(DataKind::kText, 4096, 11);
  std::vector<uint8_t> stream(data.size() + kOutputSlack);
  auto size = (*compressor)->Compress(data, stream);
  ASSERT_TRUE(size.ok());
  stream.resize(*size);
  std::vector<uint8_t> too_big(data.size() + 1);
  Status status = decompressor->Decompress(stream, too_big);
  EXPECT_EQ(status.code(), Status::Code::kCorruption) << status.ToString();
  // A zero padding after the stream does not complete the cluster either.
  stream.resize(stream.size() + 512, 0);
  status = decompressor->Decompress(stream, too_big);
  EXPECT_EQ(status.code(), Status::Code::kCorruption) << status.ToString();
}

INSTANTIATE_TEST_SUITE_P(DefaultAndEngines, CodecContractTest,
                         ::testing::Values(std::make_tuple(CompressionType::kDeflate, 1),
                                           std::make_tuple(CompressionType::kDeflate, 3),
                                           std::make_tuple(CompressionType::kDeflate, 4),
                                           std::make_tuple(CompressionType::kDeflate, 6),
                                           std::make_tuple(CompressionType::kZstd, -5),
                                           std::make_tuple(CompressionType::kZstd, 3),
                                           std::make_tuple(CompressionType::kZstd, 19)),
                         [](const ::testing::TestParamInfo<CodecContractTest::ParamType>& info) {
                           const int level = std::get<1>(info.param);
                           return std::string(CompressionTypeName(std::get<0>(info.param))) +
                                  "_level_" +
                                  (level < 0 ? "minus_" + std::to_string(-level)
                                             : std::to_string(level));
                         });

// Objects are per thread, but the libraries behind them must share nothing: two threads
// compress and decompress at once (run under TSan in CI).
TEST(CodecThreadsTest, IndependentObjectsInParallelThreads) {
  constexpr int kThreads = 2;
  constexpr int kRounds = 20;
  for (auto type : {CompressionType::kDeflate, CompressionType::kZstd}) {
    for (int level : {DefaultLevel(type), type == CompressionType::kDeflate ? 6 : 9}) {
      std::vector<std::thread> threads;
      std::vector<int> failures(kThreads, 0);
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
          auto compressor = MakeCompressor(type, level);
          auto decompressor = MakeDecompressor(type);
          if (!compressor.ok()) {
            ++failures[t];
            return;
          }
          std::vector<uint8_t> stream(65536 + kOutputSlack);
          std::vector<uint8_t> restored(65536);
          for (int round = 0; round < kRounds; ++round) {
            const auto data = MakeData(DataKind::kMixed, 65536, 100 * t + round);
            auto size = (*compressor)->Compress(data, stream);
            if (!size.ok() || *size == 0 ||
                !decompressor->Decompress(std::span(stream).first(*size), restored).ok() ||
                restored != data) {
              ++failures[t];
            }
          }
        });
      }
      for (auto& thread : threads) thread.join();
      for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], 0) << t;
    }
  }
}

}  // namespace
}  // namespace zqcow::codec
