// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Property tests of the cluster store: random placements (pieces of random size, random
// cluster ends, random delivery order, 1..64 threads, concurrent Flush and Read) replayed
// into both strategies, comparing the file with the bytes the pieces describe; the same
// with a failing write (fault injection), and against a real file, O_DIRECT and buffered.

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

class ClusterStorePropertyTest : public ::testing::TestWithParam<Geometry> {};

TEST_P(ClusterStorePropertyTest, RandomDeliveriesGiveTheBytesOfDirectWrites) {
  const Geometry geometry = GetParam();
  Watchdog watchdog("property test");
  const RunConfig configs[] = {
      {1, Delivery::kAnyOrder, 1000, false, true, true},
      {4, Delivery::kAnyOrder, 1000, true, true, true},
      {64, Delivery::kAnyOrder, 1000, true, true, true},
      {1, Delivery::kPerThreadInOrder, 1, true, true, true},
      {3, Delivery::kPerThreadInOrder, 1, false, true, true},
      {16, Delivery::kPerThreadInOrder, 2, true, true, true},
      {64, Delivery::kPerThreadInOrder, 4, true, true, true},
      {8, Delivery::kAnyOrder, 0, true, true, false},  // kWriteThrough: straight to the file
  };
  uint64_t seed = geometry.cluster_size * 7 + geometry.alignment;
  for (bool background : {true, false})
    for (const RunConfig& config : configs) {
      ++seed;
      const Scenario s =
          MakeScenario(geometry.cluster_size, DataClustersFor(geometry.cluster_size), seed);
      const std::string label =
          "cluster " + std::to_string(geometry.cluster_size) + " alignment " +
          std::to_string(geometry.alignment) + " threads " + std::to_string(config.threads) +
          " max " + std::to_string(config.max_clusters) + " seed " + std::to_string(seed) +
          (background ? " writer thread" : " inline writes");
      MemoryFile file(geometry.alignment, /*direct=*/true);
      file.SetContents(s.initial);
      Options options;
      options.background_writer = background;
      options.strategy = config.assemble ? Strategy::kAssemble : Strategy::kWriteThrough;
      options.max_clusters = config.max_clusters;
      auto cache = ClusterStore::Create(&file, geometry.cluster_size, options);
      // A cluster smaller than the alignment cannot be assembled: the store writes through.
      EXPECT_EQ(cache->strategy(), config.assemble && geometry.cluster_size >= geometry.alignment
                                       ? Strategy::kAssemble
                                       : Strategy::kWriteThrough)
          << label;
      const std::vector<std::string> failures = Replay(s, cache.get(), config, seed);
      for (const std::string& failure : failures) ADD_FAILURE() << label << ": " << failure;
      ExpectFileMatches(file.contents(), s.expected, label);
      const ClusterStore::Stats stats = cache->stats();
      EXPECT_EQ(stats.pieces, s.pieces_per_cluster) << label;
      if (!config.assemble) continue;
      if (geometry.cluster_size >= geometry.alignment) {
        // One whole write per finished cluster.
        EXPECT_EQ(stats.clusters_written_whole, s.finished.size()) << label;
        if (!config.flushes) {
          // Without intermediate flushes no byte is written twice, and each write holds
          // one cluster or several back to back (joined by a batch), starting at a cluster.
          std::vector<MemoryFile::WriteRecord> log = file.write_log();
          std::sort(log.begin(), log.end(),
                    [](const auto& a, const auto& b) { return a.offset < b.offset; });
          for (size_t i = 0; i < log.size(); ++i) {
            EXPECT_EQ(log[i].offset % geometry.cluster_size, 0u) << label;
            if (i > 0) {
              EXPECT_LE(log[i - 1].offset + log[i - 1].length, log[i].offset)
                  << label << ": clusters at " << log[i - 1].offset << " written twice";
            }
          }
          EXPECT_LE(file.writes(), stats.clusters_written_whole + stats.clusters_written_partial)
              << label;
          if (!background) {
            EXPECT_EQ(file.writes(), stats.clusters_written_whole + stats.clusters_written_partial)
                << label;
          }
        }
      }
      if (config.delivery == Delivery::kPerThreadInOrder) {
        // The bound: max_clusters plus one per writer (admitted below every cached cluster),
        // plus cluster ends that created entries.
        EXPECT_LE(stats.peak_clusters, config.max_clusters + config.threads + s.finished.size())
            << label;
      }
    }
}

INSTANTIATE_TEST_SUITE_P(Geometries, ClusterStorePropertyTest,
                         ::testing::Values(Geometry{512, 512}, Geometry{512, 4096},
                                           Geometry{4096, 512}, Geometry{4096, 4096},
                                           Geometry{64 * kKiB, 512}, Geometry{64 * kKiB, 4096},
                                           Geometry{2 * kMiB, 512}, Geometry{2 * kMiB, 4096}),
                         [](const ::testing::TestParamInfo<Geometry>& info) {
                           return "Cluster" + std::to_string(info.param.cluster_size) + "Align" +
                                  std::to_string(info.param.alignment);
                         });

// EIO on the Nth write of a random concurrent replay: nobody hangs (waiting writers are
// woken), the error reaches the callers and stays.
TEST(ClusterStoreTest, RandomReplayWithFailedWriteEndsWithStickyError) {
  Watchdog watchdog("fault injection replay");
  for (uint64_t nth : {1, 3, 10}) {
    const Scenario s = MakeScenario(4096, 40, 500 + nth);
    MemoryFile file(512, /*direct=*/true);
    file.SetContents(s.initial);
    file.FailWrite(nth);
    Options options;
    options.max_clusters = 2;
    auto cache = ClusterStore::Create(&file, 4096, options);
    RunConfig config;
    config.threads = 16;
    config.delivery = Delivery::kPerThreadInOrder;
    config.reads = false;
    const std::vector<std::string> failures = Replay(s, cache.get(), config, nth);
    ASSERT_FALSE(failures.empty()) << "write " << nth;
    const Status error = cache->error();
    EXPECT_EQ(error.error_number(), EIO) << error.ToString();
    for (const std::string& failure : failures) {
      EXPECT_NE(failure.find(error.message()), std::string::npos) << failure;
    }
    EXPECT_EQ(cache->Flush().message(), error.message());
    EXPECT_EQ(cache->Write(0, s.initial).message(), error.message());
  }
}

// The same random replays against a real file opened with O_DIRECT (and buffered).
TEST(ClusterStoreTest, RealFileMatchesDirectWrites) {
  Watchdog watchdog("real file");
  testing::TempDir dir;
  for (bool direct : {true, false}) {
    for (bool assemble : {true, false}) {
      const std::string path = dir.File(std::string("image-") + (direct ? "direct" : "buffered") +
                                        (assemble ? "-assemble" : "-write-through"));
      const Scenario s = MakeScenario(65536, 8, direct * 2 + assemble + 100);
      testing::WriteWholeFile(path, s.initial);
      io::FileOptions file_options;
      file_options.writable = true;
      file_options.direct_io = direct;
      Result<std::unique_ptr<io::File>> file = io::OpenFile(path, file_options);
      ASSERT_TRUE(file.ok()) << file.status().ToString();
      Options options;
      options.strategy = assemble ? Strategy::kAssemble : Strategy::kWriteThrough;
      options.max_clusters = 2;
      auto cache = ClusterStore::Create(file->get(), 65536, options);
      RunConfig config;
      config.threads = 8;
      config.delivery = Delivery::kPerThreadInOrder;
      config.assemble = assemble;
      for (const std::string& failure : Replay(s, cache.get(), config, 77)) {
        ADD_FAILURE() << path << ": " << failure;
      }
      cache.reset();
      ASSERT_TRUE((*file)->Sync().ok());
      file->reset();
      ExpectFileMatches(testing::ReadWholeFile(path), s.expected, path);
    }
  }
}

}  // namespace
}  // namespace zqcow::qcow2::store_test
