// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "measure.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <random>
#include <vector>

#include "codec/codec.h"

namespace zqcow::cli {

namespace {

constexpr uint64_t kL1EntrySize = 8;
constexpr uint64_t kL2EntrySize = 8;
constexpr uint64_t kRefcountTableEntrySize = 8;
// Two-sided 95% quantile of the normal distribution.
constexpr double kZ95 = 1.959964;
// Fixed, so that measuring the same source twice gives the same estimate.
constexpr uint64_t kSampleSeed = 0x7a71636f77;
// Guest bytes asked of the source at a time while counting data clusters.
constexpr uint64_t kScanStep = 1ull << 30;

uint64_t DivRoundUp(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
uint64_t RoundUp(uint64_t a, uint64_t b) { return DivRoundUp(a, b) * b; }

// QEMU's qcow2_refcount_metadata_size (without its generous increase): refcount blocks and
// table clusters for `clusters` clusters and themselves, found as a fixed point.
uint64_t RefcountMetadataSize(uint64_t clusters, uint64_t cluster_size, uint32_t refcount_bits) {
  const uint64_t blocks_per_table_cluster = cluster_size / kRefcountTableEntrySize;
  const uint64_t refcounts_per_block = cluster_size * 8 / refcount_bits;
  uint64_t table = 0;
  uint64_t blocks = 0;
  uint64_t n = 0;
  uint64_t last = 0;
  do {
    last = n;
    blocks = DivRoundUp(clusters + table + blocks, refcounts_per_block);
    table = DivRoundUp(blocks, blocks_per_table_cluster);
    n = clusters + blocks + table;
  } while (n != last);
  return (blocks + table) * cluster_size;
}

// The guest clusters (of `cluster_size`) that hold data, in order, as qemu-img measure
// counts them: every cluster a data range touches, once.
Result<std::vector<uint64_t>> DataClusters(convert::Source& source, uint64_t cluster_size) {
  std::vector<uint64_t> clusters;
  for (uint64_t offset = 0; offset < source.size(); offset += kScanStep) {
    const uint64_t length = std::min(kScanStep, source.size() - offset);
    ZQ_ASSIGN_OR_RETURN(std::vector<convert::ByteRange> ranges, source.DataRanges(offset, length));
    for (const convert::ByteRange& range : ranges) {
      if (range.length == 0) continue;
      uint64_t first = range.offset / cluster_size;
      const uint64_t last = (range.end() - 1) / cluster_size;
      if (!clusters.empty() && clusters.back() >= first) first = clusters.back() + 1;
      for (uint64_t c = first; c <= last; ++c) clusters.push_back(c);
    }
  }
  return clusters;
}

// Bytes zqcow's compressed image needs besides the compressed data: header, refcount
// metadata, L1, and the L2 tables of the clusters that hold data.
uint64_t CompressedMetadata(const std::vector<uint64_t>& clusters, uint64_t virtual_size,
                            uint64_t cluster_size, uint32_t refcount_bits, uint64_t data_bytes) {
  const uint64_t l2_entries = cluster_size / kL2EntrySize;
  uint64_t l2_tables = 0;
  uint64_t last_table = UINT64_MAX;
  for (uint64_t c : clusters) {
    if (c / l2_entries != last_table) ++l2_tables;
    last_table = c / l2_entries;
  }
  const uint64_t l1_bytes =
      RoundUp(std::max<uint64_t>(1, DivRoundUp(DivRoundUp(virtual_size, cluster_size),
                                               l2_entries)) * kL1EntrySize,
              cluster_size);
  const uint64_t meta = cluster_size + l1_bytes + l2_tables * cluster_size;
  return meta + RefcountMetadataSize(DivRoundUp(meta + data_bytes, cluster_size), cluster_size,
                                     refcount_bits);
}

Result<CompressedEstimate> EstimateCompressed(convert::Source& source,
                                              const std::vector<uint64_t>& clusters,
                                              const ConvertOptions& options, uint64_t samples,
                                              uint64_t virtual_size) {
  const codec::CompressionType type = options.compression == Compression::kZstd
                                          ? codec::CompressionType::kZstd
                                          : codec::CompressionType::kDeflate;
  const int level =
      options.compression_level == 0 ? codec::DefaultLevel(type) : options.compression_level;
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<codec::Compressor> compressor,
                      codec::MakeCompressor(type, level));
  const uint64_t total = clusters.size();
  const uint64_t n = std::min(samples, total);
  // A uniform sample without replacement (selection sampling keeps disk order).
  std::vector<uint64_t> picked;
  picked.reserve(n);
  std::mt19937_64 random(kSampleSeed);
  std::sample(clusters.begin(), clusters.end(), std::back_inserter(picked), n, random);

  const size_t cluster_size = options.cluster_size;
  std::vector<uint8_t> in(cluster_size);
  std::vector<uint8_t> out(cluster_size - 1);
  double sum = 0;
  double sum_squares = 0;
  for (uint64_t cluster : picked) {
    const io::IoRequest request{cluster * cluster_size, in.data(), cluster_size};
    ZQ_RETURN_IF_ERROR(source.Read(std::span<const io::IoRequest>(&request, 1)));
    double stored = 0;  // an all-zero cluster is left unallocated
    if (std::any_of(in.begin(), in.end(), [](uint8_t b) { return b != 0; })) {
      ZQ_ASSIGN_OR_RETURN(size_t compressed, compressor->Compress(in, out));
      stored = compressed == 0 ? static_cast<double>(cluster_size) : static_cast<double>(compressed);
    }
    sum += stored;
    sum_squares += stored * stored;
  }
  CompressedEstimate estimate;
  estimate.sampled_clusters = n;
  double data = 0;
  double half_width = 0;
  if (n > 0) {
    const double mean = sum / static_cast<double>(n);
    data = mean * static_cast<double>(total);
    if (n > 1 && n < total) {
      const double variance =
          std::max(0.0, (sum_squares - sum * mean) / static_cast<double>(n - 1));
      const double finite_population =
          static_cast<double>(total - n) / static_cast<double>(total - 1);
      half_width = kZ95 * static_cast<double>(total) *
                   std::sqrt(variance / static_cast<double>(n) * finite_population);
    }
  }
  auto image_size = [&](double data_bytes) {
    const uint64_t bytes = static_cast<uint64_t>(std::llround(std::max(0.0, data_bytes)));
    return CompressedMetadata(clusters, virtual_size, cluster_size, options.refcount_bits,
                              bytes) +
           bytes;
  };
  estimate.estimate = image_size(data);
  estimate.low = image_size(data - half_width);
  estimate.high = image_size(data + half_width);
  return estimate;
}

}  // namespace

uint64_t FullyAllocatedSize(uint64_t virtual_size, uint64_t cluster_size, uint32_t refcount_bits) {
  const uint64_t aligned = RoundUp(virtual_size, cluster_size);
  uint64_t meta = cluster_size;  // header
  uint64_t l2_entries = aligned / cluster_size;
  l2_entries = RoundUp(l2_entries, cluster_size / kL2EntrySize);
  meta += l2_entries * kL2EntrySize;
  uint64_t l1_entries = l2_entries * kL2EntrySize / cluster_size;
  l1_entries = RoundUp(l1_entries, cluster_size / kL1EntrySize);
  meta += l1_entries * kL1EntrySize;
  meta += RefcountMetadataSize((meta + aligned) / cluster_size, cluster_size, refcount_bits);
  return meta + aligned;
}

Result<Measurement> Measure(convert::Source* source, uint64_t virtual_size,
                            const ConvertOptions& options, uint64_t sample_clusters) {
  const uint64_t cluster_size = options.cluster_size;
  const uint64_t aligned = RoundUp(virtual_size, cluster_size);
  Measurement m;
  m.fully_allocated = FullyAllocatedSize(virtual_size, cluster_size, options.refcount_bits);
  std::vector<uint64_t> clusters;
  if (source != nullptr) {
    ZQ_ASSIGN_OR_RETURN(clusters, DataClusters(*source, cluster_size));
  }
  m.data_clusters = clusters.size();
  m.required = m.fully_allocated - aligned + m.data_clusters * cluster_size;
  if (options.compress) {
    if (source == nullptr) {
      m.compressed = CompressedEstimate{};
      m.compressed->estimate = m.compressed->low = m.compressed->high =
          CompressedMetadata(clusters, virtual_size, cluster_size, options.refcount_bits, 0);
    } else {
      ZQ_ASSIGN_OR_RETURN(m.compressed, EstimateCompressed(*source, clusters, options,
                                                           sample_clusters, virtual_size));
    }
  }
  return m;
}

}  // namespace zqcow::cli
