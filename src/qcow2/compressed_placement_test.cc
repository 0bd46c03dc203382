// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "qcow2/cluster_store.h"

#include <gtest/gtest.h>

#include <utility>
#include <vector>

#include "io/file.h"
#include "qcow2/metadata_cache.h"
#include "qcow2/refcounts.h"
#include "testing/test_util.h"

namespace zqcow::qcow2 {
namespace {

using format::HostCluster;

constexpr uint32_t kClusterBits = 12;
constexpr uint64_t kClusterSize = uint64_t{1} << kClusterBits;

// Records the placement's SetClusterEnd and Discard calls; stores nothing.
class RecordingStore : public ClusterStore {
 public:
  Strategy strategy() const override { return Strategy::kAssemble; }
  Status Write(uint64_t, std::span<const uint8_t>) override { return Status::OK(); }
  Status WriteBatch(std::span<const CompressedCluster>,
                    std::span<const format::HostOffset>) override {
    return Status::OK();
  }
  Status Rewrite(uint64_t, std::span<const uint8_t>) override { return Status::OK(); }
  Status SetClusterEnd(uint64_t host_cluster_offset, uint32_t data_end) override {
    ends.emplace_back(host_cluster_offset, data_end);
    return Status::OK();
  }
  Status Flush() override { return Status::OK(); }
  Status Read(uint64_t, std::span<uint8_t>) override { return Status::OK(); }
  void Discard(uint64_t host_cluster_offset) override { discards.push_back(host_cluster_offset); }
  Status error() const override { return Status::OK(); }
  Stats stats() const override { return {}; }

  std::vector<std::pair<uint64_t, uint32_t>> ends;
  std::vector<uint64_t> discards;
};

class CompressedPlacementTest : public ::testing::Test {
 protected:
  void Init(uint32_t refcount_order) {
    io::FileOptions options;
    options.writable = true;
    options.create = true;
    auto file = io::OpenFile(dir_.File("alloc.img"), options);
    ASSERT_TRUE(file.ok()) << file.status().ToString();
    file_ = std::move(file).value();
    cache_ = std::make_unique<MetadataCache>(1 << 20, kClusterSize);
    // Cluster 0 "header", cluster 1 the refcount table; allocation starts at 2.
    refcounts_ = std::make_unique<Refcounts>(
        file_.get(), cache_.get(), format::RefcountGeometry{kClusterBits, refcount_order},
        kClusterSize, 1, io::AlignedBuffer(kClusterSize), HostCluster(2));
    placement_ = std::make_unique<CompressedPlacement>(format::Geometry{kClusterBits},
                                                       refcounts_.get(), &store_);
  }
  uint64_t Refcount(uint64_t cluster) {
    auto r = refcounts_->Get(HostCluster(cluster));
    EXPECT_TRUE(r.ok());
    return r.ok() ? *r : ~uint64_t{0};
  }
  uint64_t Allocate(uint64_t length) {
    auto r = placement_->Allocate(length);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? r->value() : 0;
  }

  zqcow::testing::TempDir dir_;
  std::unique_ptr<io::File> file_;
  std::unique_ptr<MetadataCache> cache_;
  std::unique_ptr<Refcounts> refcounts_;
  RecordingStore store_;
  std::unique_ptr<CompressedPlacement> placement_;
};

TEST_F(CompressedPlacementTest, PacksBackToBackAndCountsEachPiece) {
  Init(4);
  // The first allocation places the refcount block (cluster 2), then data at cluster 3.
  uint64_t a = Allocate(1000);
  EXPECT_EQ(a % kClusterSize, 0u);
  EXPECT_EQ(Allocate(1000), a + 1000);
  EXPECT_EQ(Allocate(1000), a + 2000);
  EXPECT_EQ(Refcount(a / kClusterSize), 3u);
  EXPECT_TRUE(store_.ends.empty());
  EXPECT_EQ(placement_->high_water(), a + 3000);
}

TEST_F(CompressedPlacementTest, SpillsIntoNextClusterOnlyWhenContiguous) {
  Init(4);
  uint64_t a = Allocate(3000);
  uint64_t b = Allocate(3000);  // spills into the next (free) cluster
  EXPECT_EQ(b, a + 3000);
  EXPECT_EQ(Refcount(a / kClusterSize), 2u);
  EXPECT_EQ(Refcount(a / kClusterSize + 1), 1u);
  // Something else (an L2 table) takes the next free cluster: no longer contiguous.
  auto other = refcounts_->Allocate(1);
  ASSERT_TRUE(other.ok());
  uint64_t c = Allocate(3000);
  EXPECT_EQ(c, (other->value() + 1) * kClusterSize);
  ASSERT_EQ(store_.ends.size(), 1u);
  EXPECT_EQ(store_.ends[0].first, a + kClusterSize);
  EXPECT_EQ(store_.ends[0].second, 6000 - kClusterSize);
}

TEST_F(CompressedPlacementTest, OneBitRefcountsStartANewClusterPerPiece) {
  Init(0);
  uint64_t a = Allocate(100);
  uint64_t b = Allocate(100);
  EXPECT_EQ(b, a + kClusterSize);
  EXPECT_EQ(Refcount(a / kClusterSize), 1u);
  EXPECT_EQ(Refcount(b / kClusterSize), 1u);
  ASSERT_EQ(store_.ends.size(), 1u);
  EXPECT_EQ(store_.ends[0], std::make_pair(a, uint32_t{100}));
}

TEST_F(CompressedPlacementTest, FreedCurrentClusterIsNotContinued) {
  Init(4);
  uint64_t a = Allocate(100);
  placement_->OnClusterFreed(HostCluster(a / kClusterSize));
  uint64_t b = Allocate(100);
  EXPECT_EQ(b % kClusterSize, 0u);
  EXPECT_GT(b, a);
  EXPECT_TRUE(store_.ends.empty());  // a freed cluster is not closed, it is dropped
  EXPECT_EQ(store_.discards, std::vector<uint64_t>{a});  // from the store too
}

TEST_F(CompressedPlacementTest, PlaceBatchFillsHolesAndClosesThemAtTheEnd) {
  Init(4);
  const uint64_t a = Allocate(3000);
  ASSERT_TRUE(refcounts_->Allocate(1).ok());  // the next cluster is taken
  const std::vector<uint8_t> bytes(2000, 1);
  const std::span<const uint8_t> all(bytes);
  const CompressedCluster batch[] = {{0, all.first(2000)}, {0, all.first(600)}};
  std::vector<format::HostOffset> hosts(2);
  ASSERT_TRUE(placement_->PlaceBatch(batch, hosts).ok());
  EXPECT_EQ(hosts[0].value() % kClusterSize, 0u);  // a fresh cluster
  EXPECT_EQ(hosts[1].value(), a + 3000);           // the tail left behind
  ASSERT_EQ(store_.ends.size(), 1u);                // the hole closed when the batch ended
  EXPECT_EQ(store_.ends[0], std::make_pair(a, uint32_t{3600}));
}

TEST_F(CompressedPlacementTest, InABatchLaterPiecesFillTheTailLeftBehind) {
  Init(4);
  const uint64_t a = Allocate(3000);
  ASSERT_TRUE(refcounts_->Allocate(1).ok());  // the next cluster is taken (a normal cluster)
  placement_->BeginBatch();
  const uint64_t b = Allocate(2000);  // does not fit the 1096-byte tail: a fresh cluster
  EXPECT_EQ(b % kClusterSize, 0u);
  EXPECT_GT(b, a + kClusterSize);
  EXPECT_EQ(Allocate(600), a + 3000);  // into the tail left behind
  EXPECT_EQ(Allocate(700), b + 2000);  // does not fit what is left there (496)
  EXPECT_EQ(Allocate(400), a + 3600);  // fits
  EXPECT_TRUE(store_.ends.empty()) << "holes stay open until the batch ends";
  ASSERT_TRUE(placement_->EndBatch().ok());
  ASSERT_EQ(store_.ends.size(), 1u);
  EXPECT_EQ(store_.ends[0], std::make_pair(a, uint32_t{4000}));
  EXPECT_EQ(Refcount(a / kClusterSize), 3u);
  EXPECT_EQ(Refcount(b / kClusterSize), 2u);
  // Outside a batch the cluster left behind is closed at once.
  ASSERT_TRUE(refcounts_->Allocate(1).ok());
  const uint64_t c = Allocate(3000);
  EXPECT_EQ(c % kClusterSize, 0u);
  ASSERT_EQ(store_.ends.size(), 2u);
  EXPECT_EQ(store_.ends[1], std::make_pair(b, uint32_t{2700}));
  EXPECT_EQ(Allocate(100), c + 3000);
}

TEST_F(CompressedPlacementTest, AHoleFilledToTheEndNeedsNoClusterEnd) {
  Init(4);
  const uint64_t a = Allocate(3096);
  ASSERT_TRUE(refcounts_->Allocate(1).ok());
  placement_->BeginBatch();
  Allocate(2000);                       // fresh cluster; a's tail (1000) is a hole
  EXPECT_EQ(Allocate(1000), a + 3096);  // exactly fills it
  ASSERT_TRUE(placement_->EndBatch().ok());
  EXPECT_TRUE(store_.ends.empty());
}

TEST_F(CompressedPlacementTest, OneBitRefcountsNeverShareAHole) {
  Init(0);
  placement_->BeginBatch();
  const uint64_t a = Allocate(100);
  const uint64_t b = Allocate(100);
  const uint64_t c = Allocate(100);
  ASSERT_TRUE(placement_->EndBatch().ok());
  EXPECT_EQ(b, a + kClusterSize);
  EXPECT_EQ(c, b + kClusterSize);
  EXPECT_EQ(Refcount(a / kClusterSize), 1u);
}

}  // namespace
}  // namespace zqcow::qcow2
