// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Fuzzes both cluster decompressors (raw deflate, zstd) on arbitrary input, for cluster sizes
// from 512 B to 64 KiB: a malformed stream must give kCorruption, never a crash or an
// overflow of the one-cluster output buffer. Then round-trips the input through the
// compressor: whatever compresses must decompress to exactly the same cluster.

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>
#include <vector>

#include "codec/codec.h"
#include "fuzz_require.h"
#include "zqcow/status.h"

namespace {

namespace codec = zqcow::codec;

constexpr uint32_t kMinClusterBits = 9;
constexpr uint32_t kMaxFuzzedClusterBits = 16;

void FuzzType(codec::CompressionType type, std::span<const uint8_t> input, size_t cluster_size) {
  // Output exactly one cluster (ASan catches any write beyond it).
  std::vector<uint8_t> cluster(cluster_size);
  auto decompressor = codec::MakeDecompressor(type);
  FUZZ_REQUIRE(decompressor != nullptr);
  zqcow::Status status = decompressor->Decompress(input, cluster);
  if (!status.ok()) {
    FUZZ_REQUIRE(status.code() == zqcow::Status::Code::kCorruption);
    FUZZ_REQUIRE(!status.message().empty());
  }
  // The same object must be reusable after a failure.
  status = decompressor->Decompress(input, cluster);
  if (!status.ok()) FUZZ_REQUIRE(status.code() == zqcow::Status::Code::kCorruption);

  // Round trip: the input, padded to one cluster, through the default-level compressor.
  std::vector<uint8_t> plain(cluster_size, 0);
  if (!input.empty()) {
    std::memcpy(plain.data(), input.data(), std::min(input.size(), cluster_size));
  }
  auto compressor = codec::MakeCompressor(type, codec::DefaultLevel(type));
  FUZZ_REQUIRE(compressor.ok());
  std::vector<uint8_t> compressed(cluster_size - 1);
  auto compressed_size = (*compressor)->Compress(plain, compressed);
  FUZZ_REQUIRE(compressed_size.ok());
  if (*compressed_size == 0) return;  // did not fit: stored uncompressed by the writer
  FUZZ_REQUIRE(*compressed_size <= compressed.size());
  // Readers see whole sectors: the stream followed by garbage up to the sector end.
  std::vector<uint8_t> sectors(compressed.begin(), compressed.begin() + *compressed_size);
  sectors.resize((sectors.size() + 511) / 512 * 512, 0xa5);
  std::vector<uint8_t> back(cluster_size, 0x5a);
  FUZZ_REQUIRE(decompressor->Decompress(sectors, back).ok());
  FUZZ_REQUIRE(back == plain);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider provider(data, size);
  const uint32_t cluster_bits =
      provider.ConsumeIntegralInRange<uint32_t>(kMinClusterBits, kMaxFuzzedClusterBits);
  std::vector<uint8_t> input = provider.ConsumeRemainingBytes<uint8_t>();
  const size_t cluster_size = size_t{1} << cluster_bits;
  FuzzType(codec::CompressionType::kDeflate, input, cluster_size);
  FuzzType(codec::CompressionType::kZstd, input, cluster_size);
  return 0;
}
