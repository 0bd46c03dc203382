// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "digest/content_digest.h"

#include <gtest/gtest.h>

#include <vector>

namespace zqcow::digest {
namespace {

TEST(ContentDigestTest, ZeroClusterHashEqualsHashOfZeroBytes) {
  for (uint32_t size : {512u, 65536u, 2u << 20}) {
    std::vector<uint8_t> zeros(size, 0);
    EXPECT_EQ(ZeroClusterHash(7, size), ClusterHash(7, zeros)) << size;
  }
}

TEST(ContentDigestTest, HashDependsOnIndexAndEveryByte) {
  std::vector<uint8_t> data(4096, 0x5a);
  const uint64_t base = ClusterHash(3, data);
  EXPECT_NE(base, ClusterHash(4, data));
  for (size_t i : {size_t{0}, size_t{1000}, size_t{4095}}) {
    data[i] ^= 0x01;
    EXPECT_NE(base, ClusterHash(3, data)) << i;
    data[i] ^= 0x01;
  }
  EXPECT_EQ(base, ClusterHash(3, data));
}

TEST(ContentDigestTest, OrderIndependentButNotBlindToSwaps) {
  std::vector<uint8_t> a(512, 1), b(512, 2);
  ContentDigest forward, backward, swapped;
  forward.Add(ClusterHash(0, a));
  forward.Add(ClusterHash(1, b));
  backward.Add(ClusterHash(1, b));
  backward.Add(ClusterHash(0, a));
  EXPECT_EQ(forward, backward);
  swapped.Add(ClusterHash(0, b));  // the two clusters' contents trade places
  swapped.Add(ClusterHash(1, a));
  EXPECT_NE(forward, swapped);
}

TEST(ContentDigestTest, ConcurrentDigestAddsUpLikeContentDigest) {
  ContentDigest plain;
  ConcurrentDigest shared;
  for (uint64_t i = 0; i < 100; ++i) {
    plain.Add(ZeroClusterHash(i, 512));
    shared.Add(ZeroClusterHash(i, 512));
  }
  EXPECT_EQ(plain, shared.value());
  ContentDigest half, other;
  for (uint64_t i = 0; i < 50; ++i) half.Add(ZeroClusterHash(i, 512));
  for (uint64_t i = 50; i < 100; ++i) other.Add(ZeroClusterHash(i, 512));
  half.Merge(other);
  EXPECT_EQ(plain, half);
}

TEST(ContentDigestTest, TextRoundTripsAndRejectsGarbage) {
  ContentDigest digest;
  digest.Add(ClusterHash(1, std::vector<uint8_t>(512, 9)));
  digest.Add(ZeroClusterHash(2, 512));
  Result<ContentDigest> parsed = ContentDigest::Parse(digest.ToString());
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(*parsed, digest);
  EXPECT_EQ(ContentDigest().ToString(), "v1:0:0000000000000000:0000000000000000");
  for (const char* bad :
       {"", "v1:", "v2:0:0000000000000000:0000000000000000",
        "v1:x:0000000000000000:0000000000000000", "v1:1:00:00",
        "v1:1:000000000000000g:0000000000000000", "v1:1:0000000000000000:00000000000000000"}) {
    EXPECT_FALSE(ContentDigest::Parse(bad).ok()) << bad;
  }
}

}  // namespace
}  // namespace zqcow::digest
