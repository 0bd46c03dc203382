// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/zero_detect.h"

#include <gtest/gtest.h>

#include <vector>

namespace zqcow::convert {
namespace {

TEST(ZeroDetectTest, EmptyIsZero) { EXPECT_TRUE(IsAllZero({})); }

TEST(ZeroDetectTest, FindsAnySingleNonZeroByteAtEveryPositionAndAlignment) {
  // Sizes around the block and word boundaries; every offset of the start (alignment).
  for (size_t size : {1u, 7u, 8u, 9u, 255u, 256u, 257u, 1000u, 4096u}) {
    std::vector<uint8_t> storage(size + 16, 0);
    for (size_t shift = 0; shift < 8; ++shift) {
      std::span<uint8_t> data(storage.data() + shift, size);
      EXPECT_TRUE(IsAllZero(data)) << size << " " << shift;
      for (size_t pos = 0; pos < size; ++pos) {
        data[pos] = 0x80;
        ASSERT_FALSE(IsAllZero(data)) << "size " << size << " shift " << shift << " pos " << pos;
        data[pos] = 0;
      }
    }
  }
}

TEST(ZeroDetectTest, IgnoresBytesOutsideTheSpan) {
  std::vector<uint8_t> storage(300, 0xff);
  std::fill(storage.begin() + 10, storage.begin() + 290, 0);
  EXPECT_TRUE(IsAllZero({storage.data() + 10, 280}));
  EXPECT_FALSE(IsAllZero({storage.data() + 9, 281}));
}

}  // namespace
}  // namespace zqcow::convert
