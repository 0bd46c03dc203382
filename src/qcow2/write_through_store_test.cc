// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Tests of the kWriteThrough store: the baseline that writes every piece at once, and the
// store Create gives for a cluster smaller than the file's alignment; and WriteBatch, where
// the two strategies differ.

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <span>
#include <vector>

#include "qcow2/cluster_store_test_util.h"

namespace zqcow::qcow2::store_test {
namespace {

// Cluster smaller than the alignment (never opened O_DIRECT by the image): the store writes
// through, and the block's other clusters (metadata) are kept.
TEST(ClusterStoreTest, SmallClustersKeepNeighbouringBytesOfTheBlock) {
  MemoryFile file(4096, /*direct=*/true);
  std::vector<uint8_t> initial(8192, 0);
  std::fill_n(initial.begin(), 1024, 0xEE);  // clusters 0 and 1: metadata
  file.SetContents(initial);
  auto cache = ClusterStore::Create(&file, 512, Inline());
  EXPECT_EQ(cache->strategy(), Strategy::kWriteThrough);
  const std::vector<uint8_t> data(700, 0x11);
  ASSERT_TRUE(cache->Write(1024, data).ok());  // clusters 2 and part of 3
  ASSERT_TRUE(cache->SetClusterEnd(1536, 700 - 512).ok());
  std::vector<uint8_t> expected = initial;
  std::copy(data.begin(), data.end(), expected.begin() + 1024);
  EXPECT_EQ(file.contents(), expected);
  std::vector<uint8_t> back(2000);
  ASSERT_TRUE(cache->Read(0, back).ok());
  EXPECT_TRUE(std::equal(back.begin(), back.end(), expected.begin()));
}

TEST(ClusterStoreTest, WriteThroughDirectModeReadModifyWritesEachPiece) {
  MemoryFile file(4096, /*direct=*/true);
  std::vector<uint8_t> initial(8192, 0x77);
  file.SetContents(initial);
  Options options;
  options.strategy = Strategy::kWriteThrough;
  auto cache = ClusterStore::Create(&file, 65536, options);
  const std::vector<uint8_t> data(100, 0x22);
  ASSERT_TRUE(cache->Write(4000, data).ok());
  EXPECT_EQ(file.writes(), 1u);
  std::vector<uint8_t> expected = initial;
  std::copy(data.begin(), data.end(), expected.begin() + 4000);
  EXPECT_EQ(file.contents(), expected);
  std::vector<uint8_t> back(100);
  ASSERT_TRUE(cache->Read(4000, back).ok());
  EXPECT_EQ(back, data);
  file.FailWrite(1);
  EXPECT_EQ(cache->Write(0, data).error_number(), EIO);
  EXPECT_EQ(cache->Flush().error_number(), EIO);
}


// A batch's pieces reach an assembling store in host-offset order, one Write per run of
// pieces back to back in the file; a write-through store gets one write per piece.
TEST(ClusterStoreTest, WriteBatchDeliversRunsInHostOrder) {
  Watchdog watchdog("WriteBatch order");
  constexpr uint32_t kCluster = 4096;
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, 1800, 9);
  const std::span<const uint8_t> all(data);
  // Placed: a piece in a hole (below) after two that lie further up, one of them in the
  // next cluster.
  const CompressedCluster batch[] = {
      {0, all.subspan(0, 1000)}, {0, all.subspan(1000, 500)}, {0, all.subspan(1500, 300)}};
  const format::HostOffset hosts[] = {format::HostOffset(kCluster + 500),
                                      format::HostOffset(2 * kCluster),
                                      format::HostOffset(kCluster + 200)};
  for (bool assemble : {true, false}) {
    MemoryFile file(512, /*direct=*/true);
    Options options = Inline();
    options.max_clusters = 1;
    options.strategy = assemble ? Strategy::kAssemble : Strategy::kWriteThrough;
    auto store = ClusterStore::Create(&file, kCluster, options);
    ASSERT_TRUE(store->SetClusterEnd(kCluster, 1500).ok());
    ASSERT_TRUE(store->SetClusterEnd(2 * kCluster, 500).ok());
    // The placement's earlier pieces of the first cluster.
    ASSERT_TRUE(store->Write(kCluster, std::vector<uint8_t>(200, 0x5A)).ok());
    ASSERT_TRUE(store->WriteBatch(batch, hosts).ok());
    ASSERT_TRUE(store->Flush().ok());
    std::vector<uint8_t> expected(3 * kCluster, 0);
    std::fill_n(expected.begin() + kCluster, 200, 0x5A);
    std::copy_n(data.begin() + 1500, 300, expected.begin() + kCluster + 200);
    std::copy_n(data.begin(), 1000, expected.begin() + kCluster + 500);
    std::copy_n(data.begin() + 1000, 500, expected.begin() + 2 * kCluster);
    ExpectFileMatches(file.contents(), expected, assemble ? "assemble" : "write-through");
    // Assembled: the hole's piece and the one after it are one run (one piece).
    EXPECT_EQ(store->stats().pieces, assemble ? 3u : 4u);
    if (assemble) {
      EXPECT_EQ(store->stats().clusters_written_whole, 2u);
    }
  }
}

}  // namespace
}  // namespace zqcow::qcow2::store_test
