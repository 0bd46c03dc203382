// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Tests of the compressed write cache: an in-memory O_DIRECT-like file that aborts on any
// unaligned transfer, property tests that replay random allocations (pieces of random size,
// random cluster ends, random delivery order, 1..64 threads, concurrent Flush and Read) and
// compare the file with the bytes the pieces describe, progress tests that deadlock without
// the admission rule (guarded by a watchdog), fault injection, Discard, and a run against a
// real O_DIRECT file.

#include "qcow2/compressed_write_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "io/aligned_buffer.h"
#include "io/file.h"
#include "testing/test_util.h"

namespace zqcow::qcow2 {
namespace {

using Options = CompressedWriteCache::Options;

constexpr uint32_t kKiB = 1024;
constexpr uint32_t kMiB = 1024 * 1024;
constexpr auto kWatchdogTimeout = std::chrono::seconds(120);
constexpr uint8_t kMetadataPattern = 0xA5;

// Without the writer thread: the caller that finishes a cluster writes it before returning,
// so a test can look at the file right after the call.
Options Inline() {
  Options options;
  options.background_writer = false;
  return options;
}

// Aborts the process (with a message) if the test body does not finish in time: a deadlock
// must fail, not hang.
class Watchdog {
 public:
  explicit Watchdog(std::string what) : what_(std::move(what)) {
    thread_ = std::thread([this] {
      std::unique_lock lock(mutex_);
      if (!done_cv_.wait_for(lock, kWatchdogTimeout, [this] { return done_; })) {
        std::fprintf(stderr, "watchdog: %s did not finish (deadlock?)\n", what_.c_str());
        std::abort();
      }
    });
  }
  ~Watchdog() {
    {
      std::lock_guard lock(mutex_);
      done_ = true;
    }
    done_cv_.notify_all();
    thread_.join();
  }

 private:
  std::string what_;
  std::mutex mutex_;
  std::condition_variable done_cv_;
  bool done_ = false;
  std::thread thread_;
};

// An in-memory File. When direct, every transfer must be aligned (offset, length, memory)
// or the process aborts. Counts writes, can fail the Nth write with EIO, and can run a hook
// before each write (outside its lock) so a test can hold a write in flight.
class MemoryFile final : public io::File {
 public:
  MemoryFile(size_t alignment, bool direct) : alignment_(direct ? alignment : 1), direct_(direct) {}

  Result<size_t> ReadAt(uint64_t offset, void* buffer, size_t length) override {
    CheckAligned("read", offset, buffer, length);
    std::lock_guard lock(mutex_);
    std::memset(buffer, 0, length);
    if (offset >= data_.size()) return size_t{0};
    const size_t available = std::min<size_t>(length, data_.size() - offset);
    std::memcpy(buffer, data_.data() + offset, available);
    return available;
  }

  Status WriteAt(uint64_t offset, const void* buffer, size_t length) override {
    CheckAligned("write", offset, buffer, length);
    if (before_write) before_write(offset);
    std::lock_guard lock(mutex_);
    ++writes_;
    if (fail_write_ != 0 && writes_ == fail_write_) {
      return Status::FromErrno(EIO, path_ + ": write of " + std::to_string(length) +
                                        " bytes at offset " + std::to_string(offset) + " failed");
    }
    if (data_.size() < offset + length) data_.resize(offset + length);
    std::memcpy(data_.data() + offset, buffer, length);
    write_log_.push_back({offset, length});
    return Status::OK();
  }

  Status Sync() override { return Status::OK(); }
  Result<uint64_t> Size() override {
    std::lock_guard lock(mutex_);
    return uint64_t{data_.size()};
  }
  Status Truncate(uint64_t size) override {
    std::lock_guard lock(mutex_);
    data_.resize(size);
    return Status::OK();
  }
  Status DropCache(uint64_t, uint64_t) override {
    drops_.fetch_add(1);
    return Status::OK();
  }
  Result<uint64_t> NextData(uint64_t offset) override { return offset; }
  Result<uint64_t> NextHole(uint64_t) override { return Size(); }
  bool direct_io() const override { return direct_; }
  size_t alignment() const override { return alignment_; }
  const std::string& path() const override { return path_; }

  // Test controls and observations.
  void FailWrite(uint64_t nth) {
    std::lock_guard lock(mutex_);
    fail_write_ = writes_ + nth;
  }
  void SetContents(std::vector<uint8_t> data) {
    std::lock_guard lock(mutex_);
    data_ = std::move(data);
  }
  std::vector<uint8_t> contents() const {
    std::lock_guard lock(mutex_);
    return data_;
  }
  uint64_t writes() const {
    std::lock_guard lock(mutex_);
    return writes_;
  }
  struct WriteRecord {
    uint64_t offset;
    size_t length;
  };
  std::vector<WriteRecord> write_log() const {
    std::lock_guard lock(mutex_);
    return write_log_;
  }
  uint64_t drops() const { return drops_.load(); }

  std::function<void(uint64_t offset)> before_write;  // set before use, never changed later

 private:
  void CheckAligned(const char* op, uint64_t offset, const void* buffer, size_t length) const {
    if (!direct_) return;
    if (offset % alignment_ != 0 || length % alignment_ != 0 ||
        reinterpret_cast<uintptr_t>(buffer) % alignment_ != 0) {
      std::fprintf(stderr, "unaligned direct %s: offset %llu length %zu buffer %p alignment %zu\n",
                   op, static_cast<unsigned long long>(offset), length, buffer, alignment_);
      std::abort();
    }
  }

  const size_t alignment_;
  const bool direct_;
  const std::string path_ = "/memory/test.img";
  mutable std::mutex mutex_;
  std::vector<uint8_t> data_;
  uint64_t writes_ = 0;
  uint64_t fail_write_ = 0;
  std::vector<WriteRecord> write_log_;
  std::atomic<uint64_t> drops_{0};
};

// One step of the allocator's output: a compressed piece, or a cluster end.
struct Op {
  enum class Kind { kPiece, kClusterEnd } kind;
  uint64_t offset;  // piece start, or the host cluster
  uint32_t length;  // piece length, or the data end
};

// A random allocation: pieces laid out by a bump pointer that sometimes ends its cluster and
// jumps over one or two clusters (which hold "metadata" the cache must never touch).
struct Scenario {
  uint32_t cluster_size = 0;
  std::vector<Op> ops;              // in allocation order
  std::vector<uint8_t> initial;     // file before the run (metadata clusters)
  std::vector<uint8_t> expected;    // file after every piece landed
  std::set<uint64_t> finished;      // clusters whose every byte up to the data end came
  uint64_t pieces_per_cluster = 0;  // Write() pieces after splitting per host cluster
};

uint32_t RandomPieceLength(std::mt19937_64& rng, uint32_t cluster_size) {
  // Mostly compressed-cluster sized pieces, sometimes tiny, sometimes up to a whole cluster.
  switch (rng() % 4) {
    case 0:
      return 1 + rng() % 64;
    case 1:
      return 1 + rng() % cluster_size;
    default:
      return 1 + rng() % std::max<uint32_t>(cluster_size / 8, 1);
  }
}

// Random bytes, eight per generator call (the tests also run under TSan, where byte loops
// are slow).
void FillRandom(std::mt19937_64& rng, uint8_t* out, size_t length) {
  while (length > 0) {
    const uint64_t word = rng();
    const size_t n = std::min(length, sizeof(word));
    std::memcpy(out, &word, n);
    out += n;
    length -= n;
  }
}

Scenario MakeScenario(uint32_t cluster_size, uint32_t data_clusters, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Scenario s;
  s.cluster_size = cluster_size;
  const uint64_t capacity =
      static_cast<uint64_t>(data_clusters) * 3 * cluster_size + 2 * cluster_size;
  s.initial.assign(capacity, 0);
  std::fill_n(s.initial.begin(), cluster_size, kMetadataPattern);
  s.expected = s.initial;
  auto cluster_of = [&](uint64_t offset) { return offset / cluster_size * cluster_size; };
  uint64_t bump = cluster_size;
  uint32_t used = 1;  // data clusters the allocator has started
  bool fresh = true;  // bump sits at the start of a cluster that got nothing yet
  for (;;) {
    if (bump % cluster_size != 0) {
      if (used == data_clusters && rng() % 10 == 0) break;  // last cluster stays unfinished
      if (rng() % 6 == 0) {
        // The allocator ends this cluster and moves to a non-contiguous one.
        const uint64_t cluster = cluster_of(bump);
        s.ops.push_back({Op::Kind::kClusterEnd, cluster, static_cast<uint32_t>(bump - cluster)});
        s.finished.insert(cluster);
        if (used == data_clusters) break;
        const uint32_t skip = 1 + rng() % 2;
        for (uint32_t i = 1; i <= skip; ++i) {
          const uint64_t metadata = cluster + static_cast<uint64_t>(i) * cluster_size;
          const uint8_t pattern = static_cast<uint8_t>(kMetadataPattern + i);
          std::fill_n(s.initial.begin() + metadata, cluster_size, pattern);
          std::fill_n(s.expected.begin() + metadata, cluster_size, pattern);
        }
        bump = cluster + (skip + 1) * static_cast<uint64_t>(cluster_size);
        ++used;
        fresh = true;
        continue;
      }
    } else if (!fresh) {
      // The previous cluster is exactly full; sometimes the allocator says so (a no-op).
      if (rng() % 4 == 0) {
        s.ops.push_back({Op::Kind::kClusterEnd, bump - cluster_size, cluster_size});
      }
      if (used == data_clusters) break;
      ++used;
      fresh = true;
    }
    // Never run past the last data cluster.
    const uint64_t limit =
        cluster_of(bump) + static_cast<uint64_t>(cluster_size) * (1 + data_clusters - used);
    const uint32_t length = static_cast<uint32_t>(
        std::min<uint64_t>(RandomPieceLength(rng, cluster_size), limit - bump));
    FillRandom(rng, s.expected.data() + bump, length);
    s.ops.push_back({Op::Kind::kPiece, bump, length});
    const uint64_t end = bump + length;
    for (uint64_t c = cluster_of(bump); c < end; c += cluster_size) {
      ++s.pieces_per_cluster;
      if (c + cluster_size <= end) s.finished.insert(c);
    }
    used += static_cast<uint32_t>((cluster_of(end - 1) - cluster_of(bump)) / cluster_size);
    bump = end;
    fresh = false;
  }
  return s;
}

enum class Delivery {
  kAnyOrder,         // globally shuffled; the cache is big enough to hold everything
  kPerThreadInOrder  // each thread keeps allocation order (as workers do); small cache
};

struct RunConfig {
  uint32_t threads = 1;
  Delivery delivery = Delivery::kAnyOrder;
  size_t max_clusters = 64;
  bool flushes = true;  // random concurrent Flush calls
  bool reads = true;    // read pieces back right after writing them
  bool enabled = true;
};

// Replays `s` into `cache` from `config.threads` threads; then Flush. Returns failures
// seen by the workers (as text) so the caller asserts in the main thread.
std::vector<std::string> Replay(const Scenario& s, CompressedWriteCache* cache,
                                const RunConfig& config, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<Op>> per_thread(config.threads);
  if (config.delivery == Delivery::kAnyOrder) {
    std::vector<Op> shuffled = s.ops;
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    for (size_t i = 0; i < shuffled.size(); ++i)
      per_thread[i % config.threads].push_back(shuffled[i]);
  } else {
    for (const Op& op : s.ops) per_thread[rng() % config.threads].push_back(op);
  }
  std::mutex failures_mutex;
  std::vector<std::string> failures;
  auto fail = [&](std::string text) {
    std::lock_guard lock(failures_mutex);
    failures.push_back(std::move(text));
  };
  std::vector<std::thread> threads;
  for (uint32_t t = 0; t < config.threads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 thread_rng(seed * 1000 + t);
      std::vector<uint8_t> back;
      for (const Op& op : per_thread[t]) {
        if (op.kind == Op::Kind::kClusterEnd) {
          Status status = cache->SetClusterEnd(op.offset, op.length);
          if (!status.ok()) fail("SetClusterEnd: " + status.ToString());
          continue;
        }
        Status status = cache->Write(op.offset, {s.expected.data() + op.offset, op.length});
        if (!status.ok()) fail("Write: " + status.ToString());
        if (config.reads && thread_rng() % 8 == 0) {
          back.assign(op.length, 0);
          status = cache->Read(op.offset, back);
          if (!status.ok() ||
              !std::equal(back.begin(), back.end(), s.expected.begin() + op.offset)) {
            fail("Read back of piece at " + std::to_string(op.offset) + ": " + status.ToString());
          }
          // Metadata stays as it was.
          const uint32_t probe = 1 + thread_rng() % std::min<uint32_t>(600, s.cluster_size);
          back.assign(probe, 0);
          status = cache->Read(s.cluster_size - probe, back);
          if (!status.ok() || std::any_of(back.begin(), back.end(),
                                          [](uint8_t b) { return b != kMetadataPattern; })) {
            fail("Read of metadata: " + status.ToString());
          }
        }
        if (config.flushes && thread_rng() % 16 == 0) {
          status = cache->Flush();
          if (!status.ok()) fail("Flush: " + status.ToString());
        }
        if (thread_rng() % 4 == 0) std::this_thread::yield();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  Status status = cache->Flush();
  if (!status.ok()) fail("final Flush: " + status.ToString());
  return failures;
}

// The file equals `expected`; beyond it (zero padding up to the alignment) only zeros.
void ExpectFileMatches(const std::vector<uint8_t>& file, const std::vector<uint8_t>& expected,
                       const std::string& label) {
  const size_t common = std::min(file.size(), expected.size());
  size_t first_difference = common;
  const bool same = common == 0 || std::memcmp(file.data(), expected.data(), common) == 0;
  for (size_t i = 0; !same && i < common; ++i) {
    if (file[i] != expected[i]) {
      first_difference = i;
      break;
    }
  }
  EXPECT_EQ(first_difference, common) << label << ": first difference at byte " << first_difference;
  for (size_t i = common; i < expected.size(); ++i) {
    if (expected[i] != 0) {
      ADD_FAILURE() << label << ": file too short, byte " << i << " missing";
      break;
    }
  }
  if (file.size() == common) return;
  const std::vector<uint8_t> zeros(file.size() - common, 0);
  if (std::memcmp(file.data() + common, zeros.data(), zeros.size()) == 0) return;
  for (size_t i = common; i < file.size(); ++i) {
    if (file[i] != 0) {
      ADD_FAILURE() << label << ": non-zero byte " << i << " beyond the expected contents";
      break;
    }
  }
}

uint32_t DataClustersFor(uint32_t cluster_size) {
  if (cluster_size >= 2 * kMiB) return 3;
  if (cluster_size >= 64 * kKiB) return 10;
  return 24;
}

struct Geometry {
  uint32_t cluster_size;
  size_t alignment;
};

void PrintTo(const Geometry& geometry, std::ostream* out) {
  *out << "cluster " << geometry.cluster_size << " alignment " << geometry.alignment;
}

class CachePropertyTest : public ::testing::TestWithParam<Geometry> {};

TEST_P(CachePropertyTest, RandomDeliveriesGiveTheBytesOfDirectWrites) {
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
      {8, Delivery::kAnyOrder, 0, true, true, false},  // disabled: straight to the file
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
      options.enabled = config.enabled;
      options.max_clusters = config.max_clusters;
      auto cache = CompressedWriteCache::Create(&file, geometry.cluster_size, options);
      const std::vector<std::string> failures = Replay(s, cache.get(), config, seed);
      for (const std::string& failure : failures) ADD_FAILURE() << label << ": " << failure;
      ExpectFileMatches(file.contents(), s.expected, label);
      const CompressedWriteCache::Stats stats = cache->stats();
      EXPECT_EQ(stats.pieces, s.pieces_per_cluster) << label;
      if (!config.enabled) continue;
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

INSTANTIATE_TEST_SUITE_P(Geometries, CachePropertyTest,
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
TEST(CompressedWriteCacheTest, RandomReplayWithFailedWriteEndsWithStickyError) {
  Watchdog watchdog("fault injection replay");
  for (uint64_t nth : {1, 3, 10}) {
    const Scenario s = MakeScenario(4096, 40, 500 + nth);
    MemoryFile file(512, /*direct=*/true);
    file.SetContents(s.initial);
    file.FailWrite(nth);
    Options options;
    options.max_clusters = 2;
    auto cache = CompressedWriteCache::Create(&file, 4096, options);
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

TEST(CompressedWriteCacheTest, BufferedFileGetsExactLengths) {
  // Alignment 1: a finished cluster is written up to its data end, no padding.
  MemoryFile file(1, /*direct=*/false);
  auto cache = CompressedWriteCache::Create(&file, 4096, Inline());
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

TEST(CompressedWriteCacheTest, ClusterEndBeforePiecesFinishesOnLastPiece) {
  MemoryFile file(512, /*direct=*/true);
  auto cache = CompressedWriteCache::Create(&file, 65536, Inline());
  const std::vector<uint8_t> data = testing::MakeData(testing::DataKind::kRandom, 3000, 2);
  ASSERT_TRUE(cache->SetClusterEnd(0, 3000).ok());
  ASSERT_TRUE(cache->Write(1000, std::span(data).subspan(1000)).ok());
  EXPECT_EQ(file.writes(), 0u);
  ASSERT_TRUE(cache->Write(0, std::span(data).first(1000)).ok());
  ASSERT_EQ(file.writes(), 1u);
  EXPECT_EQ(file.write_log()[0].length, io::AlignUp(3000, 512));
  EXPECT_EQ(cache->stats().clusters_written_whole, 1u);
}

TEST(CompressedWriteCacheTest, FlushWritesUnfinishedClusterAndKeepsIt) {
  MemoryFile file(4096, /*direct=*/true);
  auto cache = CompressedWriteCache::Create(&file, 65536, Inline());
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

TEST(CompressedWriteCacheTest, PieceBeyondClusterEndIsRejected) {
  MemoryFile file(512, /*direct=*/true);
  auto cache = CompressedWriteCache::Create(&file, 4096, Options{});
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

TEST(CompressedWriteCacheTest, DropPageCacheAfterEachClusterWrite) {
  MemoryFile file(512, /*direct=*/false);
  Options options = Inline();
  options.drop_page_cache = true;
  auto cache = CompressedWriteCache::Create(&file, 4096, options);
  const std::vector<uint8_t> data(8192, 9);
  ASSERT_TRUE(cache->Write(0, data).ok());
  EXPECT_EQ(file.drops(), 2u);
}

// Progress: one worker, max_clusters 1, pieces delivered youngest-first. Without the rule
// "a cluster below every cached cluster is admitted", the second Write waits forever.
TEST(CompressedWriteCacheTest, OneWorkerYoungestFirstMakesProgress) {
  Watchdog watchdog("youngest-first, one worker");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  Options options = Inline();
  options.max_clusters = 1;
  auto cache = CompressedWriteCache::Create(&file, kCluster, options);
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
TEST(CompressedWriteCacheTest, ThreeThreadsYoungestFirstMakeProgress) {
  Watchdog watchdog("youngest-first, three threads");
  constexpr uint32_t kCluster = 65536;
  MemoryFile file(4096, /*direct=*/true);
  Options options;
  options.max_clusters = 1;
  auto cache = CompressedWriteCache::Create(&file, kCluster, options);
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
TEST(CompressedWriteCacheTest, FullCacheMakesHigherClusterWait) {
  Watchdog watchdog("backpressure");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  Options options;
  options.max_clusters = 1;
  auto cache = CompressedWriteCache::Create(&file, kCluster, options);
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
// clusters to be written, never for the allocator's open cluster, which may finish only
// after it (a cache of one cluster deadlocked two convert workers that way).
TEST(CompressedWriteCacheTest, WholeClusterGetsPastAnOpenCluster) {
  Watchdog watchdog("whole cluster past an open one");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  Options options;
  options.max_clusters = 1;
  auto cache = CompressedWriteCache::Create(&file, kCluster, options);
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

TEST(CompressedWriteCacheTest, WriteErrorSurfacesAtTheWriterAndIsSticky) {
  MemoryFile file(512, /*direct=*/true);
  auto cache = CompressedWriteCache::Create(&file, 4096, Inline());
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

TEST(CompressedWriteCacheTest, WriteErrorDuringFlushIsSticky) {
  MemoryFile file(4096, /*direct=*/true);
  auto cache = CompressedWriteCache::Create(&file, 65536, Options{});
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

TEST(CompressedWriteCacheTest, WaitingWriterIsWokenWithTheError) {
  Watchdog watchdog("error wakes waiters");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  Options options = Inline();
  options.max_clusters = 1;
  auto cache = CompressedWriteCache::Create(&file, kCluster, options);
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

TEST(CompressedWriteCacheTest, DiscardDropsWithoutWriting) {
  MemoryFile file(512, /*direct=*/true);
  auto cache = CompressedWriteCache::Create(&file, 4096, Inline());
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
TEST(CompressedWriteCacheTest, InFlightClusterIsReadableAndDiscardWaits) {
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
  auto cache = CompressedWriteCache::Create(&file, kCluster, Options{});
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
TEST(CompressedWriteCacheTest, WriterThreadBatchesClustersThatFinishMeanwhile) {
  Watchdog watchdog("writer thread batches");
  constexpr uint32_t kCluster = 4096;
  constexpr int kClusters = 6;
  MemoryFile file(512, /*direct=*/true);
  WriteGate gate(file, 0);
  auto cache = CompressedWriteCache::Create(&file, kCluster, Options{});
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
TEST(CompressedWriteCacheTest, WriterFindingTheCacheFullWritesFinishedClustersItself) {
  Watchdog watchdog("full cache helps");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  WriteGate gate(file, 0);
  Options options;
  options.max_clusters = 2;
  auto cache = CompressedWriteCache::Create(&file, kCluster, options);
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
TEST(CompressedWriteCacheTest, WriterThreadErrorIsReportedByTheNextCallAndIsSticky) {
  MemoryFile file(512, /*direct=*/true);
  auto cache = CompressedWriteCache::Create(&file, 4096, Options{});
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
TEST(CompressedWriteCacheTest, DiscardOfQueuedClusterDropsIt) {
  Watchdog watchdog("discard queued");
  constexpr uint32_t kCluster = 4096;
  MemoryFile file(512, /*direct=*/true);
  WriteGate gate(file, 0);
  auto cache = CompressedWriteCache::Create(&file, kCluster, Options{});
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

// Cluster smaller than the alignment: the block's other clusters (metadata) are kept.
TEST(CompressedWriteCacheTest, SmallClustersKeepNeighbouringBytesOfTheBlock) {
  MemoryFile file(4096, /*direct=*/true);
  std::vector<uint8_t> initial(8192, 0);
  std::fill_n(initial.begin(), 1024, 0xEE);  // clusters 0 and 1: metadata
  file.SetContents(initial);
  auto cache = CompressedWriteCache::Create(&file, 512, Inline());
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

TEST(CompressedWriteCacheTest, DisabledDirectModeReadModifyWritesEachPiece) {
  MemoryFile file(4096, /*direct=*/true);
  std::vector<uint8_t> initial(8192, 0x77);
  file.SetContents(initial);
  Options options;
  options.enabled = false;
  auto cache = CompressedWriteCache::Create(&file, 65536, options);
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

// The same random replays against a real file opened with O_DIRECT (and buffered).
TEST(CompressedWriteCacheTest, RealFileMatchesDirectWrites) {
  Watchdog watchdog("real file");
  testing::TempDir dir;
  for (bool direct : {true, false}) {
    for (bool enabled : {true, false}) {
      const std::string path = dir.File(std::string("image-") + (direct ? "direct" : "buffered") +
                                        (enabled ? "-cache" : "-nocache"));
      const Scenario s = MakeScenario(65536, 8, direct * 2 + enabled + 100);
      testing::WriteWholeFile(path, s.initial);
      io::FileOptions file_options;
      file_options.writable = true;
      file_options.direct_io = direct;
      Result<std::unique_ptr<io::File>> file = io::OpenFile(path, file_options);
      ASSERT_TRUE(file.ok()) << file.status().ToString();
      Options options;
      options.enabled = enabled;
      options.max_clusters = 2;
      auto cache = CompressedWriteCache::Create(file->get(), 65536, options);
      RunConfig config;
      config.threads = 8;
      config.delivery = Delivery::kPerThreadInOrder;
      config.enabled = enabled;
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
}  // namespace zqcow::qcow2
