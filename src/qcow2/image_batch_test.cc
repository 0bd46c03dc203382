// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Image::WriteCompressedBatch: several threads writing random batches of mixed sizes
// (pieces crossing host clusters, batches broken up by the allocator, data adjacent in
// memory or not), cluster sizes 512 B .. 2 MiB, O_DIRECT and buffered, write cache on and
// off. qemu-img judges the result: check must be clean and compare equal to a raw twin.
// Run under TSan as well.

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "qcow2/image_test_util.h"
#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow::qcow2 {
namespace {

using testing::CompressCluster;
using testing::CreateFaultyImage;
using testing::ExpectCleanAndEqual;
using testing::ImageOptions;
using testing::NewCompressor;
using testing::RawTwin;
using zqcow::testing::DataKind;
using zqcow::testing::MakeData;
using zqcow::testing::TempDir;

constexpr int kWriterThreads = 4;
constexpr size_t kMaxBatchClusters = 12;

struct BatchParams {
  const char* name;
  uint32_t cluster_size;
  uint64_t clusters;
  bool direct_io;
  IoOptions::WriteCache cache;
  Compression compression;
  uint32_t refcount_bits;
};

// The content of guest cluster `c` in round `round`: compressible to very different
// sizes (text, mixed, ones), sometimes incompressible (random) or all zeros.
std::vector<uint8_t> ClusterData(uint64_t c, int round, uint32_t cluster_size) {
  static constexpr DataKind kKinds[] = {DataKind::kText,  DataKind::kMixed,  DataKind::kOnes,
                                        DataKind::kMixed, DataKind::kRandom, DataKind::kText,
                                        DataKind::kZeros};
  const uint64_t seed = c * 31 + static_cast<uint64_t>(round) * 7 + 1;
  return MakeData(kKinds[seed % std::size(kKinds)], cluster_size, seed);
}

// One batch as a worker would hand it in. Its compressed bytes lie back to back in one
// buffer (as the convert pipeline keeps them), or each in its own vector.
struct Batch {
  std::vector<uint8_t> joined;
  std::vector<std::vector<uint8_t>> separate;
  std::vector<CompressedCluster> clusters;
};

Batch MakeBatch(const std::vector<std::pair<uint64_t, std::vector<uint8_t>>>& compressed,
                uint32_t cluster_size, bool join) {
  Batch batch;
  if (join) {
    size_t total = 0;
    for (const auto& [c, bytes] : compressed) total += bytes.size();
    batch.joined.reserve(total);
    for (const auto& [c, bytes] : compressed) {
      batch.joined.insert(batch.joined.end(), bytes.begin(), bytes.end());
    }
    size_t at = 0;
    for (const auto& [c, bytes] : compressed) {
      batch.clusters.push_back({c * cluster_size, {batch.joined.data() + at, bytes.size()}});
      at += bytes.size();
    }
  } else {
    batch.separate.reserve(compressed.size());
    for (const auto& [c, bytes] : compressed) {
      batch.separate.push_back(bytes);
      batch.clusters.push_back({c * cluster_size, batch.separate.back()});
    }
  }
  return batch;
}

class BatchWriteTest : public ::testing::TestWithParam<BatchParams> {};

TEST_P(BatchWriteTest, ConcurrentRandomBatchesPassCheckAndCompare) {
  const BatchParams p = GetParam();
  TempDir dir;
  const std::string path = dir.File("batch.qcow2");
  const uint64_t size = p.clusters * p.cluster_size - p.cluster_size / 2;  // partial last
  CreateOptions options = ImageOptions(size, p.cluster_size, p.compression);
  options.refcount_bits = p.refcount_bits;
  IoOptions io;
  io.direct_io = p.direct_io;
  io.write_cache = p.cache;
  io.write_cache_bytes = 2 * p.cluster_size;  // small: batches wait for each other
  io.metadata_cache_bytes = 1;                // minimum: flushes while batches run
  auto created = Image::Create(path, options, io);
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  auto image = std::move(created).value();
  RawTwin raw(dir.File("batch.raw"), size);

  // Round 0 writes every cluster; round 1 overwrites a random half (releasing the old
  // compressed data, which shares host clusters with data that stays).
  for (int round = 0; round < 2; ++round) {
    std::vector<uint64_t> order;
    for (uint64_t c = 0; c < p.clusters; ++c) {
      if (round == 0 || (c * 2654435761u >> 7) % 2 == 0) order.push_back(c);
    }
    std::mt19937_64 rng(static_cast<uint64_t>(round) + p.cluster_size);
    std::shuffle(order.begin(), order.end(), rng);
    std::vector<std::vector<uint8_t>> data(p.clusters);
    for (uint64_t c : order) {
      data[c] = ClusterData(c, round, p.cluster_size);
      const uint64_t valid = std::min<uint64_t>(p.cluster_size, size - c * p.cluster_size);
      std::fill(data[c].begin() + static_cast<ptrdiff_t>(valid), data[c].end(), 0);
      raw.Write(c * p.cluster_size, {data[c].begin(), data[c].begin() + valid});
    }

    std::atomic<size_t> next{0};
    std::mutex take_mutex;
    std::atomic<int> failures{0};
    std::atomic<uint64_t> batched{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kWriterThreads; ++t) {
      threads.emplace_back([&, t] {
        auto compressor = NewCompressor(p.compression);
        std::mt19937_64 thread_rng(static_cast<uint64_t>(t) * 1000 + round);
        for (;;) {
          size_t first = 0;
          size_t count = 0;
          {
            std::lock_guard lock(take_mutex);
            first = next.load();
            count = std::min(order.size() - first, 1 + thread_rng() % kMaxBatchClusters);
            next.store(first + count);
          }
          if (count == 0) return;
          std::vector<std::pair<uint64_t, std::vector<uint8_t>>> compressed;
          for (size_t i = first; i < first + count; ++i) {
            const uint64_t c = order[i];
            auto bytes = CompressCluster(compressor.get(), data[c], p.cluster_size);
            if (bytes.empty()) {  // incompressible: a normal write, as the pipeline does
              Status s = image->Write(
                  c * p.cluster_size,
                  {data[c].data(), std::min<uint64_t>(p.cluster_size, size - c * p.cluster_size)});
              if (!s.ok()) {
                ADD_FAILURE() << s.ToString();
                ++failures;
              }
              continue;
            }
            compressed.emplace_back(c, std::move(bytes));
          }
          Batch batch = MakeBatch(compressed, p.cluster_size, thread_rng() % 2 == 0);
          Status s = image->WriteCompressedBatch(batch.clusters);
          if (!s.ok()) {
            ADD_FAILURE() << s.ToString();
            ++failures;
          }
          batched += batch.clusters.size();
        }
      });
    }
    for (auto& thread : threads) thread.join();
    ASSERT_EQ(failures.load(), 0);
    EXPECT_GT(batched.load(), 0u);
  }

  // Everything reads back through the image (and its write cache) before close.
  std::vector<uint8_t> back(size);
  ASSERT_TRUE(image->Read(0, back).ok());
  EXPECT_TRUE(back == raw.data());
  Status s = image->Close();
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectCleanAndEqual(path, raw);
}

constexpr uint32_t kKiB = 1024;
INSTANTIATE_TEST_SUITE_P(
    Modes, BatchWriteTest,
    ::testing::Values(BatchParams{"c512_buffered_zlib", 512, 256, false,
                                  IoOptions::WriteCache::kAuto, Compression::kZlib, 16},
                      BatchParams{"c512_direct_cache_zstd", 512, 256, true,
                                  IoOptions::WriteCache::kOn, Compression::kZstd, 16},
                      BatchParams{"c4k_direct_zstd", 4 * kKiB, 192, true,
                                  IoOptions::WriteCache::kAuto, Compression::kZstd, 16},
                      BatchParams{"c64k_direct_zlib", 64 * kKiB, 96, true,
                                  IoOptions::WriteCache::kAuto, Compression::kZlib, 16},
                      BatchParams{"c64k_direct_nocache_zlib", 64 * kKiB, 64, true,
                                  IoOptions::WriteCache::kOff, Compression::kZlib, 16},
                      BatchParams{"c64k_buffered_cache_zstd", 64 * kKiB, 96, false,
                                  IoOptions::WriteCache::kOn, Compression::kZstd, 16},
                      BatchParams{"c64k_direct_refcount1_zlib", 64 * kKiB, 64, true,
                                  IoOptions::WriteCache::kAuto, Compression::kZlib, 1},
                      BatchParams{"c2m_direct_zstd", 2048 * kKiB, 10, true,
                                  IoOptions::WriteCache::kAuto, Compression::kZstd, 16},
                      BatchParams{"c2m_buffered_zlib", 2048 * kKiB, 8, false,
                                  IoOptions::WriteCache::kAuto, Compression::kZlib, 16}),
    [](const ::testing::TestParamInfo<BatchParams>& info) { return info.param.name; });

// A fresh image with 64 KiB clusters (buffered unless `direct_io`).
std::unique_ptr<Image> NewImage(const std::string& path, uint64_t clusters,
                                bool direct_io = false) {
  CreateOptions options;
  options.virtual_size = clusters * 65536;
  IoOptions io;
  io.direct_io = direct_io;
  auto created = Image::Create(path, options, io);
  EXPECT_TRUE(created.ok()) << created.status().ToString();
  return created.ok() ? std::move(created).value() : nullptr;
}

TEST(BatchWriteTest, OneBatchIsAllocatedBackToBackInTheOrderGiven) {
  TempDir dir;
  const std::string path = dir.File("packed.qcow2");
  auto image = NewImage(path, 16, /*direct_io=*/true);
  ASSERT_NE(image, nullptr);
  auto compressor = NewCompressor(Compression::kZlib);
  RawTwin raw(dir.File("packed.raw"), 16 * 65536);
  // Guest clusters in a scrambled order; mixed data compresses to ~half a cluster, so the
  // batch runs across several host clusters.
  const std::vector<uint64_t> guest = {9, 2, 14, 0, 5, 11, 7};
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> compressed;
  for (uint64_t c : guest) {
    auto data = MakeData(DataKind::kMixed, 65536, c + 100);
    raw.Write(c * 65536, data);
    compressed.emplace_back(c, CompressCluster(compressor.get(), data, 65536));
    ASSERT_FALSE(compressed.back().second.empty());
  }
  Batch batch = MakeBatch(compressed, 65536, /*join=*/false);
  ASSERT_TRUE(image->WriteCompressedBatch(batch.clusters).ok());
  uint64_t expected_host = 0;
  for (const auto& [c, bytes] : compressed) {
    auto map = image->Map(c * 65536, 65536);
    ASSERT_TRUE(map.ok()) << map.status().ToString();
    ASSERT_EQ(map->size(), 1u);
    EXPECT_EQ((*map)[0].kind, MapExtent::Kind::kCompressed);
    if (expected_host != 0) {
      EXPECT_EQ((*map)[0].host_offset, expected_host) << "cluster " << c;
    }
    expected_host = (*map)[0].host_offset + bytes.size();
  }
  ASSERT_TRUE(image->Close().ok());
  ExpectCleanAndEqual(path, raw);
}

// A cluster of `random_bytes` incompressible bytes and zeros after them: it compresses to
// a little more than `random_bytes`.
std::vector<uint8_t> SizedCluster(size_t random_bytes, uint64_t seed) {
  std::vector<uint8_t> data = MakeData(DataKind::kRandom, random_bytes, seed);
  data.resize(65536, 0);
  return data;
}

// A normal cluster written between two batches takes the host cluster after the one being
// filled: the piece that no longer fits starts a fresh cluster, and smaller pieces of the
// same batch fill the tail left behind instead of wasting it. The pieces reach the cache
// in host order (the hole first), which the O_DIRECT write cache needs.
TEST(BatchWriteTest, PiecesOfABatchFillTheTailABreakLeftBehind) {
  TempDir dir;
  const std::string path = dir.File("holes.qcow2");
  auto image = NewImage(path, 8, /*direct_io=*/true);
  ASSERT_NE(image, nullptr);
  auto compressor = NewCompressor(Compression::kZlib);
  RawTwin raw(dir.File("holes.raw"), 8 * 65536);
  auto compress = [&](uint64_t c, const std::vector<uint8_t>& data) {
    raw.Write(c * 65536, data);
    auto bytes = CompressCluster(compressor.get(), data, 65536);
    EXPECT_FALSE(bytes.empty());
    return std::make_pair(c, bytes);
  };
  Batch first = MakeBatch({compress(0, SizedCluster(40000, 1))}, 65536, true);
  ASSERT_TRUE(image->WriteCompressedBatch(first.clusters).ok());
  auto incompressible = MakeData(DataKind::kRandom, 65536, 2);
  raw.Write(1 * 65536, incompressible);
  ASSERT_TRUE(image->Write(1 * 65536, incompressible).ok());
  Batch second =
      MakeBatch({compress(2, SizedCluster(30000, 3)), compress(3, SizedCluster(20000, 4)),
                 compress(4, SizedCluster(3000, 5))},
                65536, true);
  ASSERT_TRUE(image->WriteCompressedBatch(second.clusters).ok());
  auto host = [&](uint64_t c) {
    auto map = image->Map(c * 65536, 65536);
    EXPECT_TRUE(map.ok() && map->size() == 1);
    return map.ok() && !map->empty() ? (*map)[0].host_offset : 0;
  };
  const uint64_t tail = host(0) + first.clusters[0].data.size();
  EXPECT_EQ(host(3), tail) << "the 20000-byte piece fills the tail of cluster 0's host cluster";
  EXPECT_EQ(host(4), tail + second.clusters[1].data.size());
  EXPECT_GT(host(2), host(1)) << "the 30000-byte piece starts a fresh cluster";
  std::vector<uint8_t> back(8 * 65536);
  ASSERT_TRUE(image->Read(0, back).ok());
  EXPECT_TRUE(back == raw.data());
  ASSERT_TRUE(image->Close().ok());
  ExpectCleanAndEqual(path, raw);
}

TEST(BatchWriteTest, InvalidClusterFailsTheBatchBeforeAnythingIsWritten) {
  TempDir dir;
  const std::string path = dir.File("invalid.qcow2");
  auto image = NewImage(path, 8);
  ASSERT_NE(image, nullptr);
  auto compressor = NewCompressor(Compression::kZlib);
  auto data = MakeData(DataKind::kText, 65536, 3);
  auto bytes = CompressCluster(compressor.get(), data, 65536);
  ASSERT_FALSE(bytes.empty());
  const std::vector<uint8_t> too_long(65536, 1);
  const std::vector<std::vector<CompressedCluster>> bad = {
      {{0, bytes}, {65536 + 512, bytes}},  // not cluster aligned
      {{0, bytes}, {8 * 65536, bytes}},    // beyond the virtual size
      {{0, bytes}, {65536, {}}},           // empty
      {{0, bytes}, {65536, too_long}},     // not shorter than a cluster
  };
  for (const auto& batch : bad) {
    Status s = image->WriteCompressedBatch(batch);
    EXPECT_EQ(s.code(), Status::Code::kInvalidArgument) << s.ToString();
    EXPECT_NE(s.message().find(path), std::string::npos) << s.ToString();
    auto map = image->Map(0, 8 * 65536);
    ASSERT_TRUE(map.ok());
    ASSERT_EQ(map->size(), 1u);
    EXPECT_EQ((*map)[0].kind, MapExtent::Kind::kUnallocated) << "nothing written";
  }
  // The image is not failed by bad arguments: an empty and a valid batch work.
  EXPECT_TRUE(image->WriteCompressedBatch({}).ok());
  const std::vector<CompressedCluster> good = {{65536, bytes}};
  ASSERT_TRUE(image->WriteCompressedBatch(good).ok());
  ASSERT_TRUE(image->Close().ok());
  RawTwin raw(dir.File("invalid.raw"), 8 * 65536);
  raw.Write(65536, data);
  ExpectCleanAndEqual(path, raw);
}

TEST(BatchWriteTest, BatchesAfterReopenAndOverTheirOwnClustersStayClean) {
  TempDir dir;
  const std::string path = dir.File("reopen.qcow2");
  RawTwin raw(dir.File("reopen.raw"), 32 * 65536);
  auto compressor = NewCompressor(Compression::kZlib);
  auto write_batch = [&](Image* image, uint64_t first, uint64_t count, uint64_t seed) {
    std::vector<std::pair<uint64_t, std::vector<uint8_t>>> compressed;
    for (uint64_t c = first; c < first + count; ++c) {
      auto data = MakeData(DataKind::kText, 65536, seed + c);
      raw.Write(c * 65536, data);
      compressed.emplace_back(c, CompressCluster(compressor.get(), data, 65536));
    }
    Batch batch = MakeBatch(compressed, 65536, /*join=*/true);
    Status s = image->WriteCompressedBatch(batch.clusters);
    EXPECT_TRUE(s.ok()) << s.ToString();
  };
  {
    auto image = NewImage(path, 32, /*direct_io=*/true);
    ASSERT_NE(image, nullptr);
    write_batch(image.get(), 0, 12, 1);
    ASSERT_TRUE(image->Close().ok());
  }
  OpenOptions open;
  open.writable = true;
  open.io.direct_io = true;
  auto reopened = Image::Open(path, open);
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  write_batch(reopened->get(), 8, 12, 50);  // overlaps the first batch's clusters 8..11
  write_batch(reopened->get(), 20, 12, 90);
  ASSERT_TRUE((*reopened)->Close().ok());
  ExpectCleanAndEqual(path, raw);
}

// With the write cache off, a batch is written the way QEMU writes compressed clusters: one
// write per cluster (the baseline the cache is measured against). With the cache on, each
// host cluster the batch fills is written once, however the writer thread's timing groups
// them: at most one write per host cluster (plus the flush's few metadata writes). A
// buffered image that drops what it writes from the page cache has the cache on by default.
TEST(BatchWriteTest, WithoutTheCacheEveryClusterIsItsOwnWrite) {
  struct Case {
    IoOptions::WriteCache mode;
    bool drop_page_cache;
    bool cache_on;
    const char* name;
  };
  for (const Case& c : {Case{IoOptions::WriteCache::kOff, false, false, "cache off"},
                        Case{IoOptions::WriteCache::kOn, false, true, "cache on"},
                        Case{IoOptions::WriteCache::kAuto, true, true, "auto, drop page cache"}}) {
    const IoOptions::WriteCache mode = c.mode;
    const bool cache_on = c.cache_on;
    SCOPED_TRACE(c.name);
    TempDir dir;
    const std::string path = dir.File("count.qcow2");
    auto controller = std::make_shared<io::FaultController>();
    CreateOptions options;
    constexpr uint64_t kClusters = 64;
    options.virtual_size = kClusters * 65536;
    IoOptions io;
    io.write_cache = mode;
    io.drop_page_cache = c.drop_page_cache;
    auto image = CreateFaultyImage(path, options, io, controller);
    ASSERT_NE(image, nullptr);
    auto compressor = NewCompressor(Compression::kZlib);
    RawTwin raw(dir.File("count.raw"), kClusters * 65536);
    std::vector<std::pair<uint64_t, std::vector<uint8_t>>> compressed;
    uint64_t compressed_bytes = 0;
    for (uint64_t c = 0; c < kClusters; ++c) {
      auto data = MakeData(DataKind::kMixed, 65536, c + 7);
      raw.Write(c * 65536, data);
      compressed.emplace_back(c, CompressCluster(compressor.get(), data, 65536));
      ASSERT_FALSE(compressed.back().second.empty());
      compressed_bytes += compressed.back().second.size();
    }
    // Host clusters the batch can touch (it may start inside a partly used one), and an
    // upper bound of the metadata one Flush writes here (refcount block, L2 table, L1,
    // header, refcount table), so that the two cases cannot overlap.
    const uint64_t host_clusters = compressed_bytes / 65536 + 2;
    constexpr uint64_t kMetadataWrites = 8;
    ASSERT_LT(host_clusters + kMetadataWrites, kClusters);
    ASSERT_TRUE(image->Flush().ok());  // the new image's own metadata is not counted
    Batch batch = MakeBatch(compressed, 65536, /*join=*/true);
    const uint64_t writes_before = controller->count(io::FaultController::Op::kWrite);
    ASSERT_TRUE(image->WriteCompressedBatch(batch.clusters).ok());
    ASSERT_TRUE(image->Flush().ok());
    const uint64_t writes = controller->count(io::FaultController::Op::kWrite) - writes_before;
    if (cache_on) {
      EXPECT_LE(writes, host_clusters + kMetadataWrites);
    } else {
      EXPECT_GE(writes, kClusters);
    }
    ASSERT_TRUE(image->Close().ok());
    ExpectCleanAndEqual(path, raw);
  }
}

}  // namespace
}  // namespace zqcow::qcow2
