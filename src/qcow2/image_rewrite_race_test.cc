// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Regression: a partial write to a normal cluster that the write cache still held replaced
// the cached cluster in two steps, Discard then Write, with nothing cached in between. A
// Read on another thread in that window read the file (zeros: the cluster had never been
// written out), and a Flush in it wrote nothing for the cluster although its L2 entry was
// already durable, so a crash after the flush lost a write the flush had covered. The
// cache now replaces a cached cluster under its lock in one step (Rewrite).
//
// Run under TSan too (the tsan preset): several threads rewrite, read and flush at once.

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "io/file.h"
#include "qcow2/qcow2_image.h"
#include "testing/test_util.h"

namespace zqcow::qcow2 {
namespace {

constexpr uint32_t kCluster = 65536;

// Holds the first whole-cluster write after Arm() until Release(): the cache's writer
// thread is then busy and every other finished cluster stays cached, not written.
class GatedFile : public io::File {
 public:
  explicit GatedFile(std::unique_ptr<io::File> base) : base_(std::move(base)) {}
  void Arm() {
    std::lock_guard lock(mutex_);
    armed_ = true;
  }
  void WaitUntilHolding() {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return holding_; });
  }
  void Release() {
    std::lock_guard lock(mutex_);
    armed_ = false;
    released_ = true;
    changed_.notify_all();
  }

  Result<size_t> ReadAt(uint64_t o, void* p, size_t n) override { return base_->ReadAt(o, p, n); }
  Status WriteAt(uint64_t o, const void* p, size_t n) override {
    {
      std::unique_lock lock(mutex_);
      if (armed_ && n >= kCluster && !holding_) {
        holding_ = true;
        changed_.notify_all();
        changed_.wait(lock, [&] { return released_; });
      }
    }
    return base_->WriteAt(o, p, n);
  }
  Status Sync() override { return base_->Sync(); }
  Result<uint64_t> Size() override { return base_->Size(); }
  Status Truncate(uint64_t s) override { return base_->Truncate(s); }
  Status DropCache(uint64_t o, uint64_t l) override { return base_->DropCache(o, l); }
  Result<uint64_t> NextData(uint64_t o) override { return base_->NextData(o); }
  Result<uint64_t> NextHole(uint64_t o) override { return base_->NextHole(o); }
  bool direct_io() const override { return base_->direct_io(); }
  size_t alignment() const override { return base_->alignment(); }
  const std::string& path() const override { return base_->path(); }

 private:
  std::unique_ptr<io::File> base_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool armed_ = false;
  bool holding_ = false;
  bool released_ = false;
};

std::unique_ptr<io::File> NewFile(const std::string& path) {
  io::FileOptions options;
  options.writable = options.create = options.truncate = true;
  auto file = io::OpenFile(path, options);
  EXPECT_TRUE(file.ok()) << file.status().ToString();
  return file.ok() ? std::move(file).value() : nullptr;
}

IoOptions CachedIo() {
  IoOptions io;
  io.write_cache = IoOptions::WriteCache::kOn;  // normal clusters go through the cache
  return io;
}

bool HasZeroByte(const std::vector<uint8_t>& data) {
  return std::memchr(data.data(), 0, data.size()) != nullptr;
}

// A version as bytes with the top bit set (never zero), 7 bits each, most significant first.
constexpr size_t kStampBytes = 8;
std::vector<uint8_t> Stamp(uint64_t version) {
  std::vector<uint8_t> stamp(kStampBytes);
  for (size_t b = 0; b < kStampBytes; ++b) {
    stamp[b] = static_cast<uint8_t>(0x80 | ((version >> (7 * (kStampBytes - 1 - b))) & 0x7f));
  }
  return stamp;
}
// 0 for bytes that are no stamp (the first content, below 0x80).
uint64_t StampVersion(const std::vector<uint8_t>& stamp) {
  uint64_t version = 0;
  for (uint8_t byte : stamp) {
    if (byte < 0x80) return 0;
    version = version << 7 | (byte & 0x7f);
  }
  return version;
}

// The in-place rewrite of a cluster the cache holds, while another thread reads it: the
// reader sees the old or the new bytes, never the file's (zeros).
TEST(ImageRewriteRaceTest, ReaderNeverSeesACachedClusterVanish) {
  testing::TempDir dir;
  auto base = NewFile(dir.File("gated.qcow2"));
  ASSERT_NE(base, nullptr);
  auto gated = std::make_unique<GatedFile>(std::move(base));
  GatedFile* gate = gated.get();
  CreateOptions create;
  create.virtual_size = 4 * kCluster;
  create.cluster_size = kCluster;
  auto created = CreateImageOnFile(std::move(gated), create, CachedIo());
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  Image* image = created->get();

  // Cluster 0 occupies the cache's writer thread; cluster 1 then stays cached.
  gate->Arm();
  ASSERT_TRUE(image->Write(0, std::vector<uint8_t>(kCluster, 0xa0)).ok());
  gate->WaitUntilHolding();
  std::vector<uint8_t> expected(kCluster, 0x11);
  ASSERT_TRUE(image->Write(kCluster, expected).ok());

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0}, bad_reads{0};
  std::string first_bad;
  std::thread reader([&] {
    std::vector<uint8_t> data(kCluster);
    while (!stop.load()) {
      Status s = image->Read(kCluster, data);
      reads.fetch_add(1);
      if (!s.ok() || HasZeroByte(data)) {
        if (bad_reads.fetch_add(1) == 0) first_bad = s.ok() ? "zeros read" : s.ToString();
      }
    }
  });
  // Partial rewrites: each the cache's old cluster merged with a few new bytes.
  constexpr int kRewrites = 3000;
  for (int i = 0; i < kRewrites; ++i) {
    const uint64_t at = (static_cast<uint64_t>(i) * 4099) % (kCluster - 64);
    std::vector<uint8_t> piece(64, static_cast<uint8_t>(1 + i % 250));
    ASSERT_TRUE(image->Write(kCluster + at, piece).ok());
    std::memcpy(expected.data() + at, piece.data(), piece.size());
  }
  // Reads continue until the reader has had its chances.
  while (reads.load() < 1000) std::this_thread::yield();
  stop = true;
  reader.join();
  gate->Release();
  EXPECT_EQ(bad_reads.load(), 0u) << "of " << reads.load() << " reads; first: " << first_bad;

  ASSERT_TRUE(image->Close().ok());
  auto reopened = Image::Open(dir.File("gated.qcow2"), OpenOptions());
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  std::vector<uint8_t> back(kCluster);
  ASSERT_TRUE((*reopened)->Read(kCluster, back).ok());
  EXPECT_TRUE(back == expected) << "the last rewrite did not survive";
}

// Rewrites of partial clusters on several threads while others read and flush. Each rewrite
// stamps a version into its cluster's first 8 bytes. After every Flush the file holds, for
// each cluster, a version at least as new as the last rewrite finished before the Flush
// began (what a crash right after the flush would keep); reads never see zeros; the final
// image reads back exactly.
TEST(ImageRewriteRaceTest, RewritesReadsAndFlushesInterleaved) {
  testing::TempDir dir;
  const std::string path = dir.File("race.qcow2");
  auto file = NewFile(path);
  ASSERT_NE(file, nullptr);
  constexpr uint64_t kClusters = 8;
  constexpr int kWriters = 2;
  CreateOptions create;
  create.virtual_size = kClusters * kCluster;
  create.cluster_size = kCluster;
  auto created = CreateImageOnFile(std::move(file), create, CachedIo());
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  Image* image = created->get();

  std::vector<std::vector<uint8_t>> model(kClusters);
  std::vector<std::atomic<uint64_t>> finished(kClusters);  // last version written
  for (uint64_t c = 0; c < kClusters; ++c) {
    model[c].assign(kCluster, static_cast<uint8_t>(0x40 + c));  // reads as version 0
    ASSERT_TRUE(image->Write(c * kCluster, model[c]).ok());
    finished[c] = 0;
  }
  // Where each cluster lives in the file (normal clusters are rewritten in place).
  std::vector<uint64_t> host(kClusters);
  for (uint64_t c = 0; c < kClusters; ++c) {
    auto extents = image->Map(c * kCluster, kCluster);
    ASSERT_TRUE(extents.ok() && extents->size() == 1 &&
                extents->front().kind == MapExtent::Kind::kData);
    host[c] = extents->front().host_offset;
  }

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> failures{0};
  std::mutex message_mutex;
  std::string first_failure;
  auto fail = [&](const std::string& what) {
    if (failures.fetch_add(1) == 0) {
      std::lock_guard lock(message_mutex);
      first_failure = what;
    }
  };

  std::vector<std::thread> threads;
  constexpr int kRewritesPerWriter = 1500;
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(w + 1);
      for (int i = 1; i <= kRewritesPerWriter && failures.load() == 0; ++i) {
        // Writer w owns clusters w, w + kWriters, ...
        const uint64_t c = w + kWriters * (rng() % (kClusters / kWriters));
        const uint64_t version = finished[c].load() + 1;
        const std::vector<uint8_t> stamp = Stamp(version);
        const uint64_t tail_at = kStampBytes + rng() % (kCluster - kStampBytes - 32);
        std::vector<uint8_t> tail(32, static_cast<uint8_t>(1 + rng() % 255));
        Status s = image->Write(c * kCluster, stamp);
        if (s.ok()) s = image->Write(c * kCluster + tail_at, tail);
        if (!s.ok()) return fail("rewrite: " + s.ToString());
        std::memcpy(model[c].data(), stamp.data(), stamp.size());
        std::memcpy(model[c].data() + tail_at, tail.data(), tail.size());
        finished[c].store(version);
      }
    });
  }
  threads.emplace_back([&] {
    std::mt19937_64 rng(99);
    std::vector<uint8_t> data(kCluster);
    while (!stop.load()) {
      const uint64_t c = rng() % kClusters;
      Status s = image->Read(c * kCluster, data);
      if (!s.ok()) return fail("read: " + s.ToString());
      if (HasZeroByte(data)) return fail("read zeros in cluster " + std::to_string(c));
    }
  });
  threads.emplace_back([&] {
    io::FileOptions read_only;
    read_only.lock = io::ImageLock::kShared;  // beside the image's writer, as -U reads
    auto reader = io::OpenFile(path, read_only);
    if (!reader.ok()) return fail("open for checking: " + reader.status().ToString());
    std::vector<uint8_t> stamp(kStampBytes);
    while (!stop.load()) {
      std::vector<uint64_t> before(kClusters);
      for (uint64_t c = 0; c < kClusters; ++c) before[c] = finished[c].load();
      Status s = image->Flush();
      if (!s.ok()) return fail("flush: " + s.ToString());
      for (uint64_t c = 0; c < kClusters; ++c) {
        s = io::ReadAnyRange(**reader, host[c], stamp);
        if (!s.ok()) return fail("check read: " + s.ToString());
        const uint64_t version = StampVersion(stamp);
        if (version < before[c]) {
          return fail("after a flush cluster " + std::to_string(c) + " holds version " +
                      std::to_string(version) + " on file, older than " +
                      std::to_string(before[c]));
        }
      }
    }
  });
  for (int w = 0; w < kWriters; ++w) threads[w].join();
  stop = true;
  for (size_t t = kWriters; t < threads.size(); ++t) threads[t].join();
  EXPECT_EQ(failures.load(), 0u) << first_failure;

  ASSERT_TRUE(image->Close().ok());
  auto reopened = Image::Open(path, OpenOptions());
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  std::vector<uint8_t> back(kCluster);
  for (uint64_t c = 0; c < kClusters; ++c) {
    ASSERT_TRUE((*reopened)->Read(c * kCluster, back).ok());
    EXPECT_TRUE(back == model[c]) << "cluster " << c;
  }
}

}  // namespace
}  // namespace zqcow::qcow2
