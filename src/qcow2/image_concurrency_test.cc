// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Many threads calling WriteCompressed (and Write) on one image at once, with O_DIRECT on
// and off and the compressed write cache on and off: the result must pass qemu-img check
// and compare equal to the raw data. Run under TSan as well.

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <string>
#include <thread>
#include <vector>

#include "qcow2/image_test_util.h"
#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow::qcow2 {
namespace {

using testing::ExpectCleanAndEqual;
using testing::ImageOptions;
using testing::NewCompressor;
using testing::RawTwin;
using zqcow::testing::DataKind;
using zqcow::testing::MakeData;
using zqcow::testing::TempDir;

constexpr int kThreads = 16;

struct Params {
  bool direct_io;
  IoOptions::WriteCache cache;
  uint32_t cluster_size;
};

IoOptions ModeIo(const Params& p) {
  IoOptions io;
  io.direct_io = p.direct_io;
  io.write_cache = p.cache;
  return io;
}

class ConcurrentWriteTest : public ::testing::TestWithParam<Params> {};

TEST_P(ConcurrentWriteTest, SixteenWritersPassCheckAndCompare) {
  const Params p = GetParam();
  TempDir dir;
  const std::string path = dir.File("c.qcow2");
  const uint64_t clusters = 192;
  const uint64_t size = clusters * p.cluster_size;
  IoOptions io = ModeIo(p);
  io.write_cache_bytes = 4 * p.cluster_size;  // small: writers must wait for each other
  io.metadata_cache_bytes = 1;                // minimum: forces flushes while writing
  auto created =
      Image::Create(path, ImageOptions(size, p.cluster_size, Compression::kZstd), io);
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  auto image = std::move(created).value();

  // Data first, so the raw twin is complete; threads then write disjoint clusters.
  RawTwin raw(dir.File("c.raw"), size);
  std::vector<std::vector<uint8_t>> data(clusters);
  for (uint64_t c = 0; c < clusters; ++c) {
    DataKind kind = c % 7 == 3 ? DataKind::kRandom : (c % 2 ? DataKind::kText : DataKind::kMixed);
    data[c] = MakeData(kind, p.cluster_size, c + 1);
    raw.Write(c * p.cluster_size, data[c]);
  }
  std::atomic<uint64_t> next{0};
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      auto compressor = NewCompressor(Compression::kZstd);
      for (uint64_t c = next++; c < clusters; c = next++) {
        Status s =
            testing::WriteCluster(image.get(), compressor.get(), c * p.cluster_size, data[c]);
        if (!s.ok()) {
          ADD_FAILURE() << s.ToString();
          ++failures;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_EQ(failures.load(), 0);
  // Concurrent reads of everything, through the cache.
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&, t] {
      std::vector<uint8_t> back(p.cluster_size);
      for (uint64_t c = static_cast<uint64_t>(t); c < clusters; c += 4) {
        Status s = image->Read(c * p.cluster_size, back);
        EXPECT_TRUE(s.ok()) << s.ToString();
        EXPECT_TRUE(back == data[c]) << "cluster " << c;
      }
    });
  }
  for (auto& t : readers) t.join();
  Status s = image->Close();
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectCleanAndEqual(path, raw);
}

INSTANTIATE_TEST_SUITE_P(Modes, ConcurrentWriteTest,
                         ::testing::Values(Params{true, IoOptions::WriteCache::kOn, 65536},
                                           Params{true, IoOptions::WriteCache::kOff, 65536},
                                           Params{false, IoOptions::WriteCache::kOn, 65536},
                                           Params{false, IoOptions::WriteCache::kOff, 65536},
                                           Params{true, IoOptions::WriteCache::kAuto, 4096},
                                           Params{false, IoOptions::WriteCache::kAuto, 4096},
                                           Params{true, IoOptions::WriteCache::kOn, 512}));

}  // namespace
}  // namespace zqcow::qcow2

namespace zqcow::qcow2 {
namespace {

// Regression (found in review): two threads writing different parts of the same guest
// cluster each read-modify-wrote the whole cluster, and one write was lost. With the write
// cache on, normal clusters go through it: the second write of each cluster replaces the
// cached first one (Discard, then the merged cluster), so nothing stale is written after it.
class ConcurrentPartialWriteTest : public ::testing::TestWithParam<Params> {};

TEST_P(ConcurrentPartialWriteTest, WritesToDisjointPartsOfOneClusterAllLand) {
  const Params p = GetParam();
  TempDir dir;
  const std::string path = dir.File("partial.qcow2");
  const uint64_t size = 16ull << 20;
  auto created =
      Image::Create(path, ImageOptions(size, p.cluster_size, Compression::kZlib), ModeIo(p));
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  Image& image = **created;
  const uint64_t cluster = image.cluster_size();
  const uint64_t clusters = size / cluster;
  const std::vector<uint8_t> a(4096, 0xaa), b(4096, 0xbb);
  std::barrier start_together(2);
  auto writer = [&](const std::vector<uint8_t>& piece, uint64_t in_cluster) {
    for (uint64_t i = 0; i < clusters; ++i) {
      start_together.arrive_and_wait();
      EXPECT_TRUE(image.Write(i * cluster + in_cluster, piece).ok());
    }
  };
  std::thread first(writer, std::cref(a), 0);
  std::thread second(writer, std::cref(b), 8192);
  first.join();
  second.join();
  std::vector<uint8_t> back(cluster);
  for (uint64_t i = 0; i < clusters; ++i) {
    ASSERT_TRUE(image.Read(i * cluster, back).ok());
    ASSERT_EQ(back[0], 0xaa) << "cluster " << i;
    ASSERT_EQ(back[8192], 0xbb) << "cluster " << i;
    ASSERT_EQ(back[4096], 0) << "cluster " << i;
  }
  ASSERT_TRUE(image.Close().ok());
  EXPECT_EQ(zqcow::testing::QemuImgCheck(path).exit_code, 0);
}

INSTANTIATE_TEST_SUITE_P(Modes, ConcurrentPartialWriteTest,
                         ::testing::Values(Params{false, IoOptions::WriteCache::kAuto, 65536},
                                           Params{false, IoOptions::WriteCache::kOn, 65536},
                                           Params{true, IoOptions::WriteCache::kOn, 65536},
                                           Params{true, IoOptions::WriteCache::kOff, 65536},
                                           Params{true, IoOptions::WriteCache::kOn, 16384}));

// Normal clusters written through the cache are rewritten in place while their first write
// may still be cached or in flight, read back before any flush, flushed in between, and
// freed by a compressed overwrite: every read and the closed image must show the last data.
class NormalClusterRewriteTest : public ::testing::TestWithParam<Params> {};

TEST_P(NormalClusterRewriteTest, LastWriteWinsBeforeAndAfterFlush) {
  const Params p = GetParam();
  TempDir dir;
  const std::string path = dir.File("rewrite.qcow2");
  const uint64_t clusters = 24;
  const uint64_t size = clusters * p.cluster_size - 1536;  // last cluster partial (if > 2 KiB)
  IoOptions io = ModeIo(p);
  io.write_cache_bytes = 4 * p.cluster_size;
  auto created =
      Image::Create(path, ImageOptions(size, p.cluster_size, Compression::kZlib), io);
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  auto image = std::move(created).value();
  RawTwin raw(dir.File("rewrite.raw"), size);
  auto compressor = NewCompressor(Compression::kZlib);
  auto write = [&](uint64_t offset, const std::vector<uint8_t>& data) {
    Status s = image->Write(offset, data);
    ASSERT_TRUE(s.ok()) << s.ToString();
    raw.Write(offset, data);
  };
  auto expect_equal = [&] {
    std::vector<uint8_t> back(size);
    Status s = image->Read(0, back);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_TRUE(back == raw.data());
  };
  for (uint64_t c = 0; c * p.cluster_size < size; ++c) {
    const uint64_t offset = c * p.cluster_size;
    const uint64_t length = std::min<uint64_t>(p.cluster_size, size - offset);
    write(offset, MakeData(DataKind::kRandom, length, c + 1));        // fresh, whole
    write(offset + 100, MakeData(DataKind::kRandom, 300, c + 1000));  // in place, partial
    if (c % 3 == 0) write(offset, MakeData(DataKind::kText, length, c + 2000));  // whole again
    if (c % 8 == 5) {
      Status s = image->Flush();
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
    if (c % 4 == 1) expect_equal();
  }
  // A compressed overwrite frees a normal cluster that may still be cached.
  const auto text = MakeData(DataKind::kText, p.cluster_size, 77);
  Status s = testing::WriteCluster(image.get(), compressor.get(), 2 * p.cluster_size, text);
  ASSERT_TRUE(s.ok()) << s.ToString();
  raw.Write(2 * p.cluster_size, text);
  write(2 * p.cluster_size + 5, MakeData(DataKind::kRandom, 50, 78));  // normal again
  expect_equal();
  s = image->Close();
  ASSERT_TRUE(s.ok()) << s.ToString();
  ExpectCleanAndEqual(path, raw);
}

INSTANTIATE_TEST_SUITE_P(Modes, NormalClusterRewriteTest,
                         ::testing::Values(Params{false, IoOptions::WriteCache::kOn, 65536},
                                           Params{true, IoOptions::WriteCache::kOn, 65536},
                                           Params{true, IoOptions::WriteCache::kOn, 4096},
                                           Params{true, IoOptions::WriteCache::kOn, 512},
                                           Params{true, IoOptions::WriteCache::kOff, 65536}));

}  // namespace
}  // namespace zqcow::qcow2
