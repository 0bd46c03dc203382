// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Tests of the cluster store, one behaviour each: exact lengths and padding, cluster ends,
// partial flushes, caller bugs, progress tests that deadlock without the admission rule
// (guarded by a watchdog), errors, Discard, the writer thread's batches
// (write_through_store_test.cc: the kWriteThrough strategy and WriteBatch of both).

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "io/aligned_buffer.h"
#include "io/file.h"
#include "qcow2/cluster_store_test_util.h"
#include "testing/test_util.h"

namespace zqcow::qcow2::store_test {
namespace {

TEST(ClusterStoreTest, BufferedFileGetsExactLengths) {
  // Alignment 1: a finished cluster is written up to its data end, no padding.
  MemoryFile file(1, /*direct=*/false);
  auto cache = ClusterStore::Create(&file, 4096, Inline());
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, 1000, 1);
  ASSERT_TRUE(cache->Write(4096 + 600, std::span(data).subspan(600)).ok());
  ASSERT_TRUE(cache->Write(4096, std::span(data).first(600)).ok());
  EXPECT_EQ(file.writes(), 0u);
  ASSERT_TRUE(cache->SetClusterEnd(4096, 1000).ok());
  ASSERT_EQ(file.writes(), 1u);
  EXPECT_EQ(file.write_log()[0].offset, 4096u);
  EXPECT_EQ(file.write_log()[0].length, 1000u);
  std::vector<uint8_t> back(1000);
  ASSERT_TRUE(cache->Read(4096, back).ok());
  EXPECT_EQ(back, data);
}

TEST(ClusterStoreTest, ClusterEndBeforePiecesFinishesOnLastPiece) {
  MemoryFile file(512, /*direct=*/true);
  auto cache = ClusterStore::Create(&file, 65536, Inline());
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, 3000, 2);
  ASSERT_TRUE(cache->SetClusterEnd(0, 3000).ok());
  ASSERT_TRUE(cache->Write(1000, std::span(data).subspan(1000)).ok());
  EXPECT_EQ(file.writes(), 0u);
  ASSERT_TRUE(cache->Write(0, std::span(data).first(1000)).ok());
  ASSERT_EQ(file.writes(), 1u);
  EXPECT_EQ(file.write_log()[0].length, io::AlignUp(3000, 512));
  EXPECT_EQ(cache->stats().clusters_written_whole, 1u);
}

TEST(ClusterStoreTest, FlushWritesUnfinishedClusterAndKeepsIt) {
  MemoryFile file(4096, /*direct=*/true);
  auto cache = ClusterStore::Create(&file, 65536, Inline());
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, 9000, 3);
  ASSERT_TRUE(cache->Write(65536, std::span(data).first(5000)).ok());
  ASSERT_TRUE(cache->Flush().ok());
  ASSERT_EQ(file.writes(), 1u);
  EXPECT_EQ(file.write_log()[0].length, 8192u);
  std::vector<uint8_t> contents = file.contents();
  EXPECT_TRUE(std::equal(data.begin(), data.begin() + 5000, contents.begin() + 65536));
  // Nothing new: a second flush writes nothing.
  ASSERT_TRUE(cache->Flush().ok());
  EXPECT_EQ(file.writes(), 1u);
  // The rest arrives; the cluster is written whole.
  ASSERT_TRUE(cache->Write(65536 + 5000, std::span(data).subspan(5000)).ok());
  ASSERT_TRUE(cache->SetClusterEnd(65536, 9000).ok());
  ASSERT_EQ(file.writes(), 2u);
  EXPECT_EQ(file.write_log()[1].length, 12288u);
  contents = file.contents();
  EXPECT_TRUE(std::equal(data.begin(), data.end(), contents.begin() + 65536));
  const auto stats = cache->stats();
  EXPECT_EQ(stats.clusters_written_partial, 1u);
  EXPECT_EQ(stats.clusters_written_whole, 1u);
}

TEST(ClusterStoreTest, PieceBeyondClusterEndIsRejected) {
  MemoryFile file(512, /*direct=*/true);
  auto cache = ClusterStore::Create(&file, 4096, Options{});
  const std::vector<uint8_t> data(100, 7);
  ASSERT_TRUE(cache->Write(0, std::span(data).first(10)).ok());
  ASSERT_TRUE(cache->SetClusterEnd(0, 50).ok());
  Status status;
  EXPECT_DEBUG_DEATH(status = cache->Write(40, std::span(data).first(20)), "data end");
#ifdef NDEBUG
  EXPECT_EQ(status.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(status.message().find(file.path()), std::string::npos) << status.message();
  EXPECT_TRUE(cache->error().ok());  // a caller bug, not a lost write
#endif
}

TEST(ClusterStoreTest, DropPageCacheAfterEachClusterWrite) {
  MemoryFile file(512, /*direct=*/false);
  Options options = Inline();
  options.drop_page_cache = true;
  auto cache = ClusterStore::Create(&file, 4096, options);
  const std::vector<uint8_t> data(8192, 9);
  ASSERT_TRUE(cache->Write(0, data).ok());
  EXPECT_EQ(file.drops(), 2u);
}

// Progress: one worker, max_clusters 1, pieces delivered youngest-first. Without the rule
// "a cluster below every cached cluster is admitted", the second Write waits forever.
TEST(ClusterStoreTest, OneWorkerYoungestFirstMakesProgress) {
  Watchdog watchdog("youngest-first, one worker");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  Options options = Inline();
  options.max_clusters = 1;
  auto cache = ClusterStore::Create(&file, kCluster, options);
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, 3 * kCluster, 4);
  const std::span<const uint8_t> all(data);
  const uint32_t half = kCluster / 2;
  for (int cluster = 2; cluster >= 0; --cluster) {
    ASSERT_TRUE(cache->Write(cluster * kCluster, all.subspan(cluster * kCluster, half)).ok());
  }
  for (int cluster = 0; cluster <= 2; ++cluster) {
    ASSERT_TRUE(
        cache->Write(cluster * kCluster + half, all.subspan(cluster * kCluster + half, half)).ok());
  }
  EXPECT_EQ(file.contents(), data);
  EXPECT_EQ(cache->stats().clusters_written_whole, 3u);
  EXPECT_EQ(cache->stats().peak_clusters, 3u);
}

// Three threads, one per cluster, take turns in the order 2a 1a 0a 0b 1b 2b with
// max_clusters 1: a writer blocked on admission would stall the turn forever.
TEST(ClusterStoreTest, ThreeThreadsYoungestFirstMakeProgress) {
  Watchdog watchdog("youngest-first, three threads");
  constexpr uint32_t kCluster = 65536;
  MemoryFile file(4096, /*direct=*/true);
  Options options;
  options.max_clusters = 1;
  auto cache = ClusterStore::Create(&file, kCluster, options);
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, 3 * kCluster, 5);
  const std::span<const uint8_t> all(data);
  const int order[] = {2, 1, 0, 0, 1, 2};
  std::mutex mutex;
  std::condition_variable turn_cv;
  size_t turn = 0;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int cluster = 0; cluster < 3; ++cluster) {
    threads.emplace_back([&, cluster] {
      for (int half = 0; half < 2; ++half) {
        {
          std::unique_lock lock(mutex);
          turn_cv.wait(lock, [&] { return turn < 6 && order[turn] == cluster; });
        }
        const uint64_t offset = cluster * uint64_t{kCluster} + half * (kCluster / 2);
        if (!cache->Write(offset, all.subspan(offset, kCluster / 2)).ok()) ++failures;
        {
          std::lock_guard lock(mutex);
          ++turn;
        }
        turn_cv.notify_all();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  ASSERT_TRUE(cache->Flush().ok());  // the writer thread may still be writing
  EXPECT_EQ(file.contents(), data);
  EXPECT_EQ(cache->stats().clusters_written_whole, 3u);
}

// A writer whose cluster is above a cached one waits while the cache is full, and goes on
// when that cluster finishes.
TEST(ClusterStoreTest, FullCacheMakesHigherClusterWait) {
  Watchdog watchdog("backpressure");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  Options options;
  options.max_clusters = 1;
  auto cache = ClusterStore::Create(&file, kCluster, options);
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, 2 * kCluster, 6);
  const std::span<const uint8_t> all(data);
  ASSERT_TRUE(cache->Write(0, all.first(100)).ok());
  std::atomic<bool> done{false};
  std::thread writer([&] {
    // A piece that does not finish its cluster: it has to wait for room.
    EXPECT_TRUE(cache->Write(kCluster, all.subspan(kCluster, kCluster - 1)).ok());
    done = true;
  });
  while (cache->stats().waits == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_FALSE(done.load());
  ASSERT_TRUE(cache->Write(100, all.subspan(100, kCluster - 100)).ok());
  writer.join();
  EXPECT_TRUE(done.load());
  ASSERT_TRUE(cache->Write(2 * kCluster - 1, all.subspan(2 * kCluster - 1, 1)).ok());
  ASSERT_TRUE(cache->Flush().ok());
  EXPECT_EQ(file.contents(), data);
}

// A whole cluster (a normal cluster) finishes on arrival: it only waits for finished
// clusters to be written, never for the placement's open cluster, which may finish only
// after it (a cache of one cluster deadlocked two convert workers that way).
TEST(ClusterStoreTest, WholeClusterGetsPastAnOpenCluster) {
  Watchdog watchdog("whole cluster past an open one");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  Options options;
  options.max_clusters = 1;
  auto cache = ClusterStore::Create(&file, kCluster, options);
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, 3 * kCluster, 7);
  const std::span<const uint8_t> all(data);
  ASSERT_TRUE(cache->Write(0, all.first(100)).ok());  // the open cluster
  for (uint64_t c = 1; c < 3; ++c) {                  // whole clusters above it, one after another
    ASSERT_TRUE(cache->Write(c * kCluster, all.subspan(c * kCluster, kCluster)).ok());
  }
  ASSERT_TRUE(cache->Write(100, all.subspan(100, kCluster - 100)).ok());
  ASSERT_TRUE(cache->Flush().ok());
  EXPECT_EQ(file.contents(), data);
}

TEST(ClusterStoreTest, WriteErrorSurfacesAtTheWriterAndIsSticky) {
  MemoryFile file(512, /*direct=*/true);
  auto cache = ClusterStore::Create(&file, 4096, Inline());
  const std::vector<uint8_t> data(4096 * 4, 1);
  const std::span<const uint8_t> all(data);
  ASSERT_TRUE(cache->Write(0, all.first(4096)).ok());
  file.FailWrite(1);
  Status status = cache->Write(4096, all.first(4096));
  EXPECT_EQ(status.code(), Status::Code::kIOError);
  EXPECT_EQ(status.error_number(), EIO);
  EXPECT_NE(status.message().find(file.path()), std::string::npos);
  // Sticky: later calls fail with the same error, even though the file works again.
  EXPECT_EQ(cache->Write(8192, all.first(10)).message(), status.message());
  EXPECT_EQ(cache->SetClusterEnd(8192, 10).message(), status.message());
  EXPECT_EQ(cache->Flush().message(), status.message());
  EXPECT_EQ(cache->error().message(), status.message());
  EXPECT_EQ(file.writes(), 2u);
}

TEST(ClusterStoreTest, WriteErrorDuringFlushIsSticky) {
  MemoryFile file(4096, /*direct=*/true);
  auto cache = ClusterStore::Create(&file, 65536, Options{});
  const std::vector<uint8_t> data(1000, 3);
  ASSERT_TRUE(cache->Write(0, data).ok());
  file.FailWrite(1);
  const Status status = cache->Flush();
  EXPECT_EQ(status.error_number(), EIO);
  EXPECT_EQ(cache->Write(1000, data).error_number(), EIO);
  EXPECT_EQ(cache->Flush().error_number(), EIO);
  std::vector<uint8_t> back(10);
  EXPECT_FALSE(cache->Read(0, back).ok());
}

TEST(ClusterStoreTest, WaitingWriterIsWokenWithTheError) {
  Watchdog watchdog("error wakes waiters");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  Options options = Inline();
  options.max_clusters = 1;
  auto cache = ClusterStore::Create(&file, kCluster, options);
  const std::vector<uint8_t> data(2 * kCluster, 8);
  const std::span<const uint8_t> all(data);
  ASSERT_TRUE(cache->Write(0, all.first(100)).ok());
  Status waiter_status;
  std::thread waiter([&] { waiter_status = cache->Write(kCluster, all.first(100)); });
  while (cache->stats().waits == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  file.FailWrite(1);
  EXPECT_EQ(cache->Write(100, all.subspan(100, kCluster - 100)).error_number(), EIO);
  waiter.join();
  EXPECT_EQ(waiter_status.error_number(), EIO);
}

TEST(ClusterStoreTest, DiscardDropsWithoutWriting) {
  MemoryFile file(512, /*direct=*/true);
  auto cache = ClusterStore::Create(&file, 4096, Inline());
  const std::vector<uint8_t> data(1000, 4);
  ASSERT_TRUE(cache->Write(4096, data).ok());
  cache->Discard(4096);
  ASSERT_TRUE(cache->Flush().ok());
  EXPECT_EQ(file.writes(), 0u);
  // The cluster can be used again from scratch.
  ASSERT_TRUE(cache->Write(4096, std::span(data).first(10)).ok());
  ASSERT_TRUE(cache->SetClusterEnd(4096, 10).ok());
  EXPECT_EQ(file.writes(), 1u);
}

// While a finished cluster's write is held in flight: Read serves it from memory, and
// Discard of it returns only after the write ended.
TEST(ClusterStoreTest, InFlightClusterIsReadableAndDiscardWaits) {
  Watchdog watchdog("in-flight write");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  std::mutex gate_mutex;
  std::condition_variable gate_cv;
  bool write_entered = false;
  bool gate_open = false;
  file.before_write = [&](uint64_t) {
    std::unique_lock lock(gate_mutex);
    write_entered = true;
    gate_cv.notify_all();
    gate_cv.wait(lock, [&] { return gate_open; });
  };
  auto cache = ClusterStore::Create(&file, kCluster, Options{});
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, kCluster, 9);
  std::thread writer([&] { EXPECT_TRUE(cache->Write(0, data).ok()); });
  {
    std::unique_lock lock(gate_mutex);
    gate_cv.wait(lock, [&] { return write_entered; });
  }
  std::vector<uint8_t> back(300);
  ASSERT_TRUE(cache->Read(1000, back).ok());
  EXPECT_TRUE(std::equal(back.begin(), back.end(), data.begin() + 1000));
  std::atomic<bool> discarded{false};
  std::thread discarder([&] {
    cache->Discard(0);
    discarded = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(discarded.load());
  {
    std::lock_guard lock(gate_mutex);
    gate_open = true;
  }
  gate_cv.notify_all();
  writer.join();
  discarder.join();
  EXPECT_TRUE(discarded.load());
  EXPECT_EQ(file.contents(), data);
}

// Holds the file's writes at one offset until opened.
class WriteGate {
 public:
  // Installs itself as `file`'s before_write hook. REQUIRES: the gate outlives every write
  // of `file` (declare it before the cache that writes).
  WriteGate(MemoryFile& file, uint64_t offset) : offset_(offset) {
    file.before_write = [this](uint64_t at) { Hold(at); };
  }
  void Hold(uint64_t offset) {
    if (offset != offset_) return;
    std::unique_lock lock(mutex_);
    entered_ = true;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
  }
  void WaitEntered() {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return entered_; });
  }
  void Open() {
    {
      std::lock_guard lock(mutex_);
      open_ = true;
    }
    cv_.notify_all();
  }

 private:
  const uint64_t offset_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool entered_ = false;
  bool open_ = false;
};

// The writer thread writes finished clusters while the callers go on: a caller never waits
// for the disk, and clusters that finish while a write is in flight go out together in the
// next batch.
TEST(ClusterStoreTest, WriterThreadBatchesClustersThatFinishMeanwhile) {
  Watchdog watchdog("writer thread batches");
  constexpr uint32_t kCluster = 4096;
  constexpr int kClusters = 6;
  MemoryFile file(512, /*direct=*/true);
  WriteGate gate(file, 0);
  auto cache = ClusterStore::Create(&file, kCluster, Options{});
  const std::vector<uint8_t> data =
      testing::MakeData(testing::DataKind::kRandom, kClusters * kCluster, 10);
  const std::span<const uint8_t> all(data);
  ASSERT_TRUE(cache->Write(0, all.first(kCluster)).ok());
  gate.WaitEntered();  // the writer thread holds cluster 0 in flight
  for (int cluster = 1; cluster < kClusters; ++cluster) {
    ASSERT_TRUE(cache->Write(cluster * kCluster, all.subspan(cluster * kCluster, kCluster)).ok());
  }
  EXPECT_EQ(file.writes(), 0u);  // nobody but the held writer thread wrote
  std::vector<uint8_t> back(kCluster);
  ASSERT_TRUE(cache->Read(3 * kCluster, back).ok());  // queued clusters are readable
  EXPECT_TRUE(std::equal(back.begin(), back.end(), data.begin() + 3 * kCluster));
  gate.Open();
  ASSERT_TRUE(cache->Flush().ok());
  EXPECT_EQ(file.contents(), data);
  const auto stats = cache->stats();
  EXPECT_EQ(stats.clusters_written_whole, uint64_t{kClusters});
  EXPECT_EQ(stats.write_batches, 2u);
  // The clusters queued meanwhile are back to back: one write.
  const std::vector<MemoryFile::WriteRecord> log = file.write_log();
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[0].offset, 0u);
  EXPECT_EQ(log[0].length, kCluster);
  EXPECT_EQ(log[1].offset, kCluster);
  EXPECT_EQ(log[1].length, (kClusters - 1) * kCluster);
}

// A writer that finds the cache full while the writer thread is busy writes the finished
// clusters that wait itself, instead of waiting.
TEST(ClusterStoreTest, WriterFindingTheCacheFullWritesFinishedClustersItself) {
  Watchdog watchdog("full cache helps");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  WriteGate gate(file, 0);
  Options options;
  options.max_clusters = 2;
  auto cache = ClusterStore::Create(&file, kCluster, options);
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, 3 * kCluster, 11);
  const std::span<const uint8_t> all(data);
  ASSERT_TRUE(cache->Write(0, all.first(kCluster)).ok());
  gate.WaitEntered();
  ASSERT_TRUE(cache->Write(kCluster, all.subspan(kCluster, kCluster)).ok());  // finished, queued
  // Full (cluster 0 in flight, cluster 1 queued) and cluster 2 lies above both.
  ASSERT_TRUE(cache->Write(2 * kCluster, all.subspan(2 * kCluster, 100)).ok());
  EXPECT_EQ(file.writes(), 1u);  // cluster 1, written by this thread
  EXPECT_EQ(cache->stats().waits, 0u);
  gate.Open();
  ASSERT_TRUE(
      cache->Write(2 * kCluster + 100, all.subspan(2 * kCluster + 100, kCluster - 100)).ok());
  ASSERT_TRUE(cache->Flush().ok());
  EXPECT_EQ(file.contents(), data);
}

// A failed write of the writer thread reaches the next call, Flush at the latest, and stays.
TEST(ClusterStoreTest, WriterThreadErrorIsReportedByTheNextCallAndIsSticky) {
  MemoryFile file(512, /*direct=*/true);
  auto cache = ClusterStore::Create(&file, 4096, Options{});
  const std::vector<uint8_t> data(4096 * 2, 1);
  file.FailWrite(1);
  ASSERT_TRUE(cache->Write(0, std::span(data).first(4096)).ok());  // queued, not yet written
  const Status status = cache->Flush();
  EXPECT_EQ(status.error_number(), EIO) << status.ToString();
  EXPECT_NE(status.message().find(file.path()), std::string::npos) << status.message();
  EXPECT_EQ(cache->Write(4096, std::span(data).first(10)).message(), status.message());
  EXPECT_EQ(cache->Flush().message(), status.message());
  EXPECT_EQ(cache->error().message(), status.message());
}

// Discard of a cluster that waits for the writer thread: its bytes never reach the file.
TEST(ClusterStoreTest, DiscardOfQueuedClusterDropsIt) {
  Watchdog watchdog("discard queued");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  WriteGate gate(file, 0);
  auto cache = ClusterStore::Create(&file, kCluster, Options{});
  const std::vector<uint8_t> data(2 * kCluster, 0x5A);
  ASSERT_TRUE(cache->Write(0, std::span(data).first(kCluster)).ok());
  gate.WaitEntered();
  ASSERT_TRUE(cache->Write(kCluster, std::span(data).first(kCluster)).ok());  // queued
  cache->Discard(kCluster);
  gate.Open();
  ASSERT_TRUE(cache->Flush().ok());
  const std::vector<uint8_t> contents = file.contents();
  ASSERT_EQ(contents.size(), kCluster);  // cluster 1 was never written
  EXPECT_EQ(file.writes(), 1u);
}

}  // namespace
}  // namespace zqcow::qcow2::store_test
