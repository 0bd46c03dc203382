// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/chunk_pool.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace zqcow::convert {
namespace {

TEST(ChunkPoolTest, ChunksAreAlignedDisjointAndWritable) {
  for (size_t alignment : {size_t{512}, size_t{4096}, size_t{65536}}) {
    // Also sizes that are not a multiple of the alignment: chunks still start aligned.
    for (size_t chunk_bytes :
         {size_t{65536}, size_t{65536} + 512, size_t{1} << 20, size_t{3} << 20}) {
      constexpr size_t kCount = 5;
      ChunkPool pool(kCount, chunk_bytes, alignment);
      ASSERT_EQ(pool.count(), kCount);
      std::vector<Chunk*> chunks;
      for (size_t i = 0; i < kCount; ++i) {
        Chunk* chunk = pool.TryAcquire();
        ASSERT_NE(chunk, nullptr);
        EXPECT_EQ(chunk->buffer.size(), chunk_bytes);
        EXPECT_EQ(reinterpret_cast<uintptr_t>(chunk->buffer.data()) % alignment, 0u);
        std::memset(chunk->buffer.data(), static_cast<int>(i + 1), chunk->buffer.size());
        chunks.push_back(chunk);
      }
      EXPECT_EQ(pool.TryAcquire(), nullptr);  // all taken
      // No chunk overlaps another: each still holds only its own fill byte.
      for (size_t i = 0; i < kCount; ++i) {
        const auto& buffer = chunks[i]->buffer;
        EXPECT_TRUE(std::all_of(buffer.begin(), buffer.end(),
                                [&](uint8_t b) { return b == static_cast<uint8_t>(i + 1); }))
            << "chunk " << i << " alignment " << alignment << " size " << chunk_bytes;
      }
      for (Chunk* chunk : chunks) pool.Release(chunk);
    }
  }
}

TEST(ChunkPoolTest, AcquireWaitsForAReleaseAndStopWakesWaiters) {
  ChunkPool pool(1, 4096, 4096);
  Chunk* held = pool.Acquire();
  ASSERT_NE(held, nullptr);
  std::atomic<Chunk*> got{nullptr};
  std::thread waiter([&] { got = pool.Acquire(); });
  // Whatever the timing, the waiter cannot have a chunk before one is released.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(got.load(), nullptr);
  pool.Release(held);
  waiter.join();
  EXPECT_EQ(got.load(), held);
  std::atomic<bool> woke{false};
  std::thread stopped([&] {
    EXPECT_EQ(pool.Acquire(), nullptr);
    woke = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_FALSE(woke.load());  // no chunk is free: still waiting
  pool.Stop();
  stopped.join();
  EXPECT_TRUE(woke.load());
  EXPECT_EQ(pool.TryAcquire(), nullptr);
}

}  // namespace
}  // namespace zqcow::convert
