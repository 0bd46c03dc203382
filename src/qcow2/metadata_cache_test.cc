// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "qcow2/metadata_cache.h"

#include <gtest/gtest.h>

namespace zqcow::qcow2 {
namespace {

constexpr uint32_t kClusterSize = 4096;

TEST(MetadataCacheTest, EvictsOnlyCleanUnpinnedLeastRecentlyUsed) {
  MetadataCache cache(MetadataCache::kMinEntries * kClusterSize, kClusterSize);
  ASSERT_EQ(cache.max_entries(), MetadataCache::kMinEntries);
  auto pinned = cache.Insert(0, TableKind::kL2, io::AlignedBuffer(kClusterSize), false);
  cache.Insert(kClusterSize, TableKind::kRefcountBlock, io::AlignedBuffer(kClusterSize), true);
  for (uint64_t i = 2; i < 40; ++i) {
    cache.Insert(i * kClusterSize, TableKind::kL2, io::AlignedBuffer(kClusterSize), false);
  }
  EXPECT_FALSE(cache.over_budget());
  EXPECT_NE(cache.Find(0), nullptr);                 // pinned: kept although oldest
  EXPECT_NE(cache.Find(kClusterSize), nullptr);      // dirty: kept
  EXPECT_EQ(cache.Find(2 * kClusterSize), nullptr);  // clean, old: evicted
  EXPECT_NE(cache.Find(39 * kClusterSize), nullptr);
}

TEST(MetadataCacheTest, DirtyEntriesStayUntilCleanedAndAreSorted) {
  MetadataCache cache(1, kClusterSize);
  for (uint64_t i = 20; i-- > 0;) {
    cache.Insert(i * kClusterSize, i % 2 ? TableKind::kL2 : TableKind::kRefcountBlock,
                 io::AlignedBuffer(kClusterSize), true);
  }
  EXPECT_EQ(cache.size(), 20u);
  EXPECT_TRUE(cache.over_budget());
  auto l2 = cache.Dirty(TableKind::kL2);
  ASSERT_EQ(l2.size(), 10u);
  for (size_t i = 1; i < l2.size(); ++i) EXPECT_LT(l2[i - 1]->host_offset, l2[i]->host_offset);
  for (auto& t : l2) cache.MarkClean(*t);
  for (auto& t : cache.Dirty(TableKind::kRefcountBlock)) cache.MarkClean(*t);
  l2.clear();
  EXPECT_FALSE(cache.HasDirty());
  cache.Trim();
  EXPECT_FALSE(cache.over_budget());
}

}  // namespace
}  // namespace zqcow::qcow2
