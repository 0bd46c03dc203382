// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/refcount.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "format/endian.h"
#include "format/header.h"
#include "testing/test_util.h"

namespace zqcow::format {
namespace {

using ::zqcow::testing::ReadWholeFile;
using ::zqcow::testing::RunCommand;
using ::zqcow::testing::ShellQuote;
using ::zqcow::testing::TempDir;

TEST(RefcountGeometryTest, DerivedSizes) {
  RefcountGeometry g{16, 4};
  EXPECT_EQ(g.refcount_bits(), 16u);
  EXPECT_EQ(g.max_refcount(), 0xffffu);
  EXPECT_EQ(g.block_entries(), 32768u);
  EXPECT_EQ(g.table_index(HostCluster(32768 * 3 + 5)), 3u);
  EXPECT_EQ(g.block_index(HostCluster(32768 * 3 + 5)), 5u);
  EXPECT_EQ((RefcountGeometry{9, 0}.block_entries()), 4096u);
  EXPECT_EQ((RefcountGeometry{9, 6}.block_entries()), 64u);
  EXPECT_EQ((RefcountGeometry{9, 0}.max_refcount()), 1u);
  EXPECT_EQ((RefcountGeometry{9, 6}.max_refcount()), ~uint64_t{0});
}

class RefcountOrderTest : public ::testing::TestWithParam<uint32_t> {};

// Every entry set to a distinct value (including the maximum) reads back; neighbours are
// untouched; the block size is exactly the entries times their width.
TEST_P(RefcountOrderTest, PackingAndMaximum) {
  const uint32_t order = GetParam();
  const RefcountGeometry g{9, order};
  std::vector<uint8_t> block(512, 0);
  const uint64_t entries = g.block_entries();
  ASSERT_EQ(entries * g.refcount_bits(), block.size() * 8);
  std::mt19937_64 rng(order);
  std::vector<uint64_t> values(entries);
  for (uint64_t i = 0; i < entries; ++i) {
    values[i] = i % 3 == 0 ? g.max_refcount() : rng() & g.max_refcount();
    SetRefcount(block, i, order, values[i]);
  }
  for (uint64_t i = 0; i < entries; ++i) ASSERT_EQ(GetRefcount(block, i, order), values[i]) << i;
  // Overwrite with smaller values; nothing else moves.
  for (uint64_t i = 0; i < entries; i += 2) {
    values[i] = 0;
    SetRefcount(block, i, order, 0);
  }
  for (uint64_t i = 0; i < entries; ++i) ASSERT_EQ(GetRefcount(block, i, order), values[i]) << i;
}

INSTANTIATE_TEST_SUITE_P(Orders, RefcountOrderTest, ::testing::Range<uint32_t>(0, 7));

TEST(RefcountTest, BitLayout) {
  std::vector<uint8_t> b(16, 0);
  SetRefcount(b, 0, 0, 1);
  EXPECT_EQ(b[0], 0x01);
  SetRefcount(b, 7, 0, 1);
  EXPECT_EQ(b[0], 0x81);
  SetRefcount(b, 9, 0, 1);
  EXPECT_EQ(b[1], 0x02);
  std::fill(b.begin(), b.end(), 0);
  SetRefcount(b, 1, 1, 3);
  EXPECT_EQ(b[0], 0x0c);
  SetRefcount(b, 3, 1, 2);
  EXPECT_EQ(b[0], 0x8c);
  std::fill(b.begin(), b.end(), 0);
  SetRefcount(b, 1, 2, 0xa);
  EXPECT_EQ(b[0], 0xa0);
  SetRefcount(b, 2, 3, 0xfe);
  EXPECT_EQ(b[2], 0xfe);
  SetRefcount(b, 2, 4, 0x1234);
  EXPECT_EQ(b[4], 0x12);
  EXPECT_EQ(b[5], 0x34);
  SetRefcount(b, 1, 5, 0x89abcdef);
  EXPECT_EQ(LoadBE32(b.data() + 4), 0x89abcdefu);
  SetRefcount(b, 1, 6, 0x0102030405060708ull);
  EXPECT_EQ(LoadBE64(b.data() + 8), 0x0102030405060708ull);
  EXPECT_EQ(GetRefcount(b, 1, 6), 0x0102030405060708ull);
}

TEST(RefcountTest, TableEntries) {
  Geometry g{16};
  auto ok = DecodeRefcountTableEntry(0x30000, g);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->value(), 0x30000u);
  auto empty = DecodeRefcountTableEntry(0, g);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(empty->value(), 0u);
  EXPECT_TRUE(DecodeRefcountTableEntry(0x30001, g).status().IsCorruption());
  EXPECT_TRUE(DecodeRefcountTableEntry(0x30100, g).status().IsCorruption());
  EXPECT_TRUE(DecodeRefcountTableEntry(0x30200, g).status().IsCorruption());
  // High bits are part of the offset in the refcount table (no reserved high bits).
  auto high = DecodeRefcountTableEntry(0x8000000000000000ull, g);
  ASSERT_TRUE(high.ok());
  EXPECT_EQ(high->value(), 0x8000000000000000ull);
}

// Refcount blocks written by qemu-img for every width read as one reference per cluster in
// use (header, refcount table, refcount block, L1, L2, data) and zero after.
TEST(RefcountTest, ReadsQemuRefcountBlocks) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  TempDir dir;
  for (uint32_t order = 0; order <= kMaxRefcountOrder; ++order) {
    const std::string image = dir.File(std::to_string(order) + ".qcow2");
    auto r = RunCommand("qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=" +
                        std::to_string(1u << order) + " " + ShellQuote(image) + " 1M");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    r = RunCommand("qemu-io -f qcow2 -c 'write -P 0x11 0 12k' -c 'write -P 0x22 64k 4k' " +
                   ShellQuote(image));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const std::vector<uint8_t> file = ReadWholeFile(image);
    auto h = ParseHeader(file, file.size());
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    ASSERT_EQ(h->refcount_order, order);
    const Geometry g{h->cluster_bits};
    auto block_offset =
        DecodeRefcountTableEntry(LoadBE64(file.data() + h->refcount_table_offset), g);
    ASSERT_TRUE(block_offset.ok());
    ASSERT_LE(block_offset->value() + g.cluster_size(), file.size());
    std::span<const uint8_t> block(file.data() + block_offset->value(), g.cluster_size());
    const uint64_t file_clusters = (file.size() + g.cluster_size() - 1) / g.cluster_size();
    // header, reftable, refblock, L1, L2, 3 + 1 data clusters.
    EXPECT_EQ(file_clusters, 9u) << "order " << order;
    for (uint64_t i = 0; i < 64; ++i) {
      EXPECT_EQ(GetRefcount(block, i, order), i < file_clusters ? 1u : 0u)
          << "order " << order << " cluster " << i;
    }
  }
}

}  // namespace
}  // namespace zqcow::format
