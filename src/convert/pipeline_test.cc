// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The pipeline against an in-memory source and a recording fake image: what reaches the
// image (content, order, nothing for zero clusters), the counters, and how errors and
// cancellation stop every thread; in incremental mode (against an in-memory backing
// image), that only dirty or changed clusters are read and written. The real image is exercised in
// convert_test.cc.

#include "convert/pipeline.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "codec/codec.h"

namespace zqcow::convert {
namespace {

constexpr uint32_t kClusterSize = 4096;

// Guest bytes in memory; holes are the ranges not listed as data.
class FakeSource final : public Source {
 public:
  FakeSource(std::vector<uint8_t> bytes, std::vector<ByteRange> data_ranges, size_t alignment = 1,
             uint64_t size = 0)
      : bytes_(std::move(bytes)),
        data_ranges_(std::move(data_ranges)),
        alignment_(alignment),
        size_(size != 0 ? size : bytes_.size()) {}

  const std::string& path() const override { return path_; }
  const char* format() const override { return "raw"; }
  uint64_t size() const override { return size_; }
  size_t read_alignment() const override { return alignment_; }
  bool parallel_reads() const override { return parallel_; }

  Result<std::vector<ByteRange>> DataRanges(uint64_t offset, uint64_t length) override {
    std::vector<ByteRange> out;
    for (const ByteRange& range : data_ranges_) {
      uint64_t start = std::max(range.offset, offset);
      uint64_t stop = std::min(range.end(), offset + length);
      if (start < stop) out.push_back({start, stop - start});
    }
    return out;
  }

  Status Read(std::span<const io::IoRequest> requests) override {
    for (const io::IoRequest& request : requests) {
      EXPECT_EQ(request.offset % alignment_, 0u);
      EXPECT_EQ(request.length % alignment_, 0u);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(request.buffer) % alignment_, 0u);
      if (++reads_ == fail_read_) return Status::IOError(path_ + ": injected read error");
      const uint64_t in_flight = ++reads_in_flight_;
      uint64_t seen = max_reads_in_flight_.load();
      while (in_flight > seen && !max_reads_in_flight_.compare_exchange_weak(seen, in_flight)) {
      }
      if (read_delay_.count() > 0) std::this_thread::sleep_for(read_delay_);
      --reads_in_flight_;
      auto* out = static_cast<uint8_t*>(request.buffer);
      for (uint64_t i = 0; i < request.length; ++i) {
        uint64_t at = request.offset + i;
        out[i] = at < bytes_.size() ? bytes_[at] : 0;
      }
      bytes_requested_ += request.length;
    }
    return Status::OK();
  }
  Result<std::vector<ByteRange>> DirtyRanges(uint64_t offset, uint64_t length) override {
    if (!dirty_ranges_) return Source::DirtyRanges(offset, length);
    std::vector<ByteRange> out;
    for (const ByteRange& range : *dirty_ranges_) {
      uint64_t start = std::max(range.offset, offset);
      uint64_t stop = std::min(range.end(), offset + length);
      if (start < stop) out.push_back({start, stop - start});
    }
    return out;
  }
  Status Close() override { return Status::OK(); }

  std::optional<std::vector<ByteRange>> dirty_ranges_;  // the dirty bitmap; none when unset
  uint64_t fail_read_ = 0;  // 1-based request number that fails; 0 = none
  bool parallel_ = false;
  std::chrono::microseconds read_delay_{0};  // a slow source: each request takes this long
  std::atomic<uint64_t> reads_in_flight_{0};
  std::atomic<uint64_t> max_reads_in_flight_{0};  // most requests served at once
  std::atomic<uint64_t> bytes_requested_{0};

 private:
  const std::string path_ = "/fake/source.raw";
  std::vector<uint8_t> bytes_;
  std::vector<ByteRange> data_ranges_;
  size_t alignment_;
  uint64_t size_;
  std::atomic<uint64_t> reads_{0};
};

// Records every write; decompresses compressed clusters to check them.
class FakeImage final : public Image {
 public:
  explicit FakeImage(uint64_t virtual_size) : virtual_size_(virtual_size) {}

  ImageInfo Info() const override { return {}; }
  uint64_t virtual_size() const override { return virtual_size_; }
  uint32_t cluster_size() const override { return kClusterSize; }
  Compression compression() const override { return Compression::kZlib; }
  Status Read(uint64_t, std::span<uint8_t>) override { return Unsupported(); }

  Status Write(uint64_t guest_offset, std::span<const uint8_t> data) override {
    return Record(guest_offset, {data.begin(), data.end()}, false);
  }
  Status WriteCompressed(uint64_t guest_offset, std::span<const uint8_t> compressed) override {
    if (guest_offset % kClusterSize != 0) return Status::InvalidArgument("unaligned");
    std::vector<uint8_t> cluster(kClusterSize);
    auto decompressor = codec::MakeDecompressor(codec::CompressionType::kDeflate);
    ZQ_RETURN_IF_ERROR(decompressor->Decompress(compressed, cluster));
    EXPECT_LT(compressed.size(), kClusterSize);
    return Record(guest_offset, std::move(cluster), true);
  }
  // Records which clusters came together, then stores them one by one.
  Status WriteCompressedBatch(std::span<const CompressedCluster> clusters) override {
    {
      std::lock_guard lock(mutex_);
      std::vector<uint64_t> offsets;
      for (const CompressedCluster& cluster : clusters) offsets.push_back(cluster.guest_offset);
      batches_.push_back(std::move(offsets));
    }
    if (batch_delay_.count() > 0) std::this_thread::sleep_for(batch_delay_);
    return Image::WriteCompressedBatch(clusters);
  }
  // Whole clusters only (the last may end at the virtual size), as the pipeline asks.
  Status WriteZeroes(uint64_t guest_offset, uint64_t length) override {
    EXPECT_EQ(guest_offset % kClusterSize, 0u);
    EXPECT_TRUE(length % kClusterSize == 0 || guest_offset + length == virtual_size_) << length;
    std::lock_guard lock(mutex_);
    for (uint64_t offset = guest_offset; offset < guest_offset + length; offset += kClusterSize) {
      EXPECT_EQ(clusters_.count(offset), 0u) << "cluster written and zeroed: " << offset;
      EXPECT_TRUE(zeroed_.insert(offset).second) << "cluster zeroed twice: " << offset;
    }
    return Status::OK();
  }
  Status Discard(uint64_t, uint64_t) override { return Unsupported(); }
  Result<std::vector<MapExtent>> Map(uint64_t, uint64_t) override { return Unsupported(); }
  Status Flush() override { return Status::OK(); }
  Status Close() override { return Status::OK(); }
  Status CloseIncomplete() override { return Status::OK(); }

  // What an overlay with these writes reads over `backing` (zeros beyond its end).
  std::vector<uint8_t> OverlayContent(const std::vector<uint8_t>& backing) {
    std::vector<uint8_t> content = backing;
    content.resize(virtual_size_ + kClusterSize, 0);
    std::lock_guard lock(mutex_);
    for (uint64_t offset : zeroed_) std::fill_n(content.begin() + offset, kClusterSize, 0);
    for (const auto& [offset, data] : clusters_) {
      std::memcpy(content.data() + offset, data.data(), data.size());
    }
    content.resize(virtual_size_);
    return content;
  }

  // Guest content as written (unwritten bytes zero), trimmed to the virtual size.
  std::vector<uint8_t> Content() {
    std::lock_guard lock(mutex_);
    std::vector<uint8_t> content(virtual_size_ + kClusterSize, 0);
    for (const auto& [offset, data] : clusters_) {
      std::memcpy(content.data() + offset, data.data(), data.size());
    }
    content.resize(virtual_size_);
    return content;
  }

  std::mutex mutex_;
  std::map<uint64_t, std::vector<uint8_t>> clusters_;  // guarded by mutex_
  std::vector<uint64_t> write_order_;                  // guarded by mutex_
  uint64_t compressed_writes_ = 0;                     // guarded by mutex_
  std::vector<std::vector<uint64_t>> batches_;         // guest offsets per batch; guarded by mutex_
  std::set<uint64_t> zeroed_;                          // zero clusters; guarded by mutex_
  std::chrono::microseconds batch_delay_{0};           // a slow image: each batch takes this long
  uint64_t fail_write_ = 0;  // 1-based write that fails (and every later one); 0 = none
  std::atomic<bool>* cancel_after_writes_flag_ = nullptr;
  uint64_t cancel_after_writes_ = 0;

 private:
  static Status Unsupported() { return Status::NotSupported("fake image"); }

  Status Record(uint64_t guest_offset, std::vector<uint8_t> data, bool compressed) {
    std::lock_guard lock(mutex_);
    const uint64_t number = write_order_.size() + 1;
    if (fail_write_ != 0 && number >= fail_write_) {
      return Status::NoSpace("/fake/target.qcow2: injected: No space left on device");
    }
    EXPECT_EQ(clusters_.count(guest_offset), 0u) << "cluster written twice: " << guest_offset;
    EXPECT_EQ(zeroed_.count(guest_offset), 0u) << "cluster zeroed and written: " << guest_offset;
    write_order_.push_back(guest_offset);
    clusters_[guest_offset] = std::move(data);
    if (compressed) ++compressed_writes_;
    if (cancel_after_writes_flag_ != nullptr && number == cancel_after_writes_) {
      cancel_after_writes_flag_->store(true);
    }
    return Status::OK();
  }

  uint64_t virtual_size_;
};

std::vector<std::unique_ptr<codec::Compressor>> Compressors(unsigned workers, bool compress) {
  std::vector<std::unique_ptr<codec::Compressor>> compressors(workers);
  if (compress) {
    for (auto& compressor : compressors) {
      auto made = codec::MakeCompressor(codec::CompressionType::kDeflate,
                                        codec::DefaultLevel(codec::CompressionType::kDeflate));
      EXPECT_TRUE(made.ok());
      compressor = std::move(made).value();
    }
  }
  return compressors;
}

// Wraps a real compressor: how many Compress calls run at once, and on which threads.
struct CompressWatch {
  std::atomic<int> in_flight{0};
  std::atomic<int> max_in_flight{0};
  std::mutex mutex;
  std::set<std::thread::id> threads;  // guarded by mutex
};
class WatchedCompressor final : public codec::Compressor {
 public:
  WatchedCompressor(std::unique_ptr<codec::Compressor> inner, CompressWatch* watch)
      : inner_(std::move(inner)), watch_(watch) {}
  Result<size_t> Compress(std::span<const uint8_t> input, std::span<uint8_t> output) override {
    const int now = ++watch_->in_flight;
    int seen = watch_->max_in_flight.load();
    while (now > seen && !watch_->max_in_flight.compare_exchange_weak(seen, now)) {
    }
    {
      std::lock_guard lock(watch_->mutex);
      watch_->threads.insert(std::this_thread::get_id());
    }
    Result<size_t> size = inner_->Compress(input, output);
    --watch_->in_flight;
    return size;
  }

 private:
  std::unique_ptr<codec::Compressor> inner_;
  CompressWatch* watch_;
};
std::vector<std::unique_ptr<codec::Compressor>> WatchedCompressors(unsigned count,
                                                                   CompressWatch* watch) {
  std::vector<std::unique_ptr<codec::Compressor>> compressors = Compressors(count, true);
  for (auto& compressor : compressors) {
    compressor = std::make_unique<WatchedCompressor>(std::move(compressor), watch);
  }
  return compressors;
}

// Clusters of kinds: 0 hole, 1 written zeros, 2 random, 3 text-like.
struct Generated {
  std::vector<uint8_t> bytes;
  std::vector<ByteRange> data_ranges;
};
Generated Generate(uint64_t size, uint64_t seed) {
  Generated g;
  g.bytes.assign(size, 0);
  std::mt19937_64 rng(seed);
  for (uint64_t offset = 0; offset < size; offset += kClusterSize) {
    const uint64_t length = std::min<uint64_t>(kClusterSize, size - offset);
    const unsigned kind = rng() % 4;
    if (kind == 0) continue;
    g.data_ranges.push_back({offset, length});
    for (uint64_t i = 0; i < length; ++i) {
      if (kind == 2) g.bytes[offset + i] = static_cast<uint8_t>(rng());
      if (kind == 3) g.bytes[offset + i] = static_cast<uint8_t>('a' + (i * 7 + offset) % 13);
    }
  }
  // Merge adjacent ranges, as a file system would report them.
  std::vector<ByteRange> merged;
  for (const ByteRange& r : g.data_ranges) {
    if (!merged.empty() && merged.back().end() == r.offset) {
      merged.back().length += r.length;
    } else {
      merged.push_back(r);
    }
  }
  g.data_ranges = merged;
  return g;
}

PipelineOptions Options(uint64_t virtual_size, bool out_of_order) {
  PipelineOptions options;
  options.cluster_size = kClusterSize;
  options.virtual_size = virtual_size;
  options.out_of_order = out_of_order;
  options.target_path = "/fake/target.qcow2";
  return options;
}

uint64_t Clusters(uint64_t size) { return (size + kClusterSize - 1) / kClusterSize; }

class PipelineModes : public ::testing::TestWithParam<std::tuple<unsigned, bool, bool>> {};

TEST_P(PipelineModes, WritesEveryNonZeroClusterOnceAndCountsConsistently) {
  const auto [workers, out_of_order, compress] = GetParam();
  // Not a multiple of the cluster size: the last cluster is padded.
  const uint64_t size = 3 * (1 << 20) + 5 * 512;
  Generated g = Generate(size, 42);
  FakeSource source(g.bytes, g.data_ranges);
  FakeImage image(size);
  PipelineTotals totals;
  ASSERT_TRUE(RunPipeline(source, image, Options(size, out_of_order),
                          Compressors(workers, compress), &totals)
                  .ok());
  EXPECT_EQ(image.Content(), g.bytes);
  EXPECT_EQ(totals.clusters_zero + totals.clusters_compressed + totals.clusters_uncompressed,
            Clusters(size));
  EXPECT_EQ(totals.clusters_compressed + totals.clusters_uncompressed, image.write_order_.size());
  EXPECT_EQ(totals.clusters_compressed, image.compressed_writes_);
  if (compress) {
    EXPECT_GT(totals.clusters_compressed, 0u);
    EXPECT_GT(totals.clusters_uncompressed, 0u);  // the random clusters
    EXPECT_GT(totals.compressed_bytes, 0u);
  } else {
    EXPECT_EQ(totals.clusters_compressed, 0u);
    EXPECT_EQ(totals.compressed_bytes, 0u);
  }
  // Every byte is either skipped as zero or belongs to a written cluster.
  uint64_t written_bytes = 0;
  for (const auto& [offset, data] : image.clusters_) {
    written_bytes += std::min<uint64_t>(kClusterSize, size - offset);
  }
  EXPECT_EQ(totals.zero_bytes_skipped + written_bytes, size);
  // Holes are not read.
  uint64_t data_bytes = 0;
  for (const ByteRange& r : g.data_ranges) data_bytes += r.length;
  EXPECT_EQ(totals.bytes_read, data_bytes);
  if (!out_of_order) {
    EXPECT_TRUE(std::is_sorted(image.write_order_.begin(), image.write_order_.end()));
  }
}

INSTANTIATE_TEST_SUITE_P(All, PipelineModes,
                         ::testing::Combine(::testing::Values(1u, 4u), ::testing::Bool(),
                                            ::testing::Bool()));

TEST(PipelineTest, AlignedReadsForSmallClustersOnADirectSource) {
  // 512-byte clusters, 4096-byte source alignment: reads widen to whole aligned blocks.
  const uint64_t size = 1 << 20;
  std::vector<uint8_t> bytes(size, 0);
  for (uint64_t i = 10000; i < 10100; ++i) bytes[i] = 7;
  for (uint64_t i = 700000; i < 700001; ++i) bytes[i] = 9;
  FakeSource source(bytes, {{10000, 100}, {700000, 1}}, 4096);
  FakeImage image(size);
  PipelineOptions options = Options(size, true);
  options.cluster_size = 512;
  PipelineTotals totals;
  ASSERT_TRUE(RunPipeline(source, image, options, Compressors(2, false), &totals).ok());
  EXPECT_EQ(image.Content(), bytes);
  EXPECT_EQ(totals.clusters_uncompressed, 2u);
  EXPECT_EQ(totals.clusters_zero, size / 512 - 2);
  EXPECT_EQ(totals.bytes_read, 2u * 4096);
}

TEST(PipelineTest, HugeSparseSourceReadsOnlyItsData) {
  const uint64_t size = uint64_t{1} << 40;  // 1 TiB, data only in the first few MiB
  Generated g = Generate(2 << 20, 7);
  FakeSource source(g.bytes, g.data_ranges, 1, size);
  FakeImage image(2 << 20);  // only the written part is compared
  PipelineTotals totals;
  ASSERT_TRUE(RunPipeline(source, image, Options(size, true), Compressors(2, true), &totals).ok());
  uint64_t data_bytes = 0;
  for (const ByteRange& r : g.data_ranges) data_bytes += r.length;
  EXPECT_EQ(totals.bytes_read, data_bytes);
  EXPECT_EQ(totals.clusters_zero + totals.clusters_compressed + totals.clusters_uncompressed,
            Clusters(size));
  EXPECT_EQ(image.Content(), g.bytes);
}

TEST(PipelineTest, ProgressReachesTheTotal) {
  const uint64_t size = 1 << 20;
  Generated g = Generate(size, 3);
  FakeSource source(g.bytes, g.data_ranges);
  FakeImage image(size);
  PipelineOptions options = Options(size, true);
  ConvertProgress last;
  int calls = 0;
  options.progress = [&](const ConvertProgress& p) {
    EXPECT_LE(p.bytes_done, p.bytes_total);
    EXPECT_GE(p.bytes_done, last.bytes_done);
    last = p;
    ++calls;
  };
  PipelineTotals totals;
  ASSERT_TRUE(RunPipeline(source, image, options, Compressors(2, true), &totals).ok());
  EXPECT_GE(calls, 1);
  EXPECT_EQ(last.bytes_done, size);
  EXPECT_EQ(last.bytes_total, size);
}

TEST(PipelineTest, WorkersReadWhenTheSourceAllowsIt) {
  for (bool out_of_order : {true, false}) {
    const uint64_t size = 2 * (1 << 20) + 512;
    Generated g = Generate(size, 5);
    FakeSource source(g.bytes, g.data_ranges);
    source.parallel_ = true;
    FakeImage image(size);
    PipelineTotals totals;
    ASSERT_TRUE(
        RunPipeline(source, image, Options(size, out_of_order), Compressors(3, true), &totals)
            .ok());
    EXPECT_EQ(image.Content(), g.bytes);
    EXPECT_EQ(totals.clusters_zero + totals.clusters_compressed + totals.clusters_uncompressed,
              Clusters(size));
    uint64_t data_bytes = 0;
    for (const ByteRange& r : g.data_ranges) data_bytes += r.length;
    EXPECT_EQ(totals.bytes_read, data_bytes);
    if (!out_of_order) {
      EXPECT_TRUE(std::is_sorted(image.write_order_.begin(), image.write_order_.end()));
    }
  }
}

// Runs `workers` threads over two watched compressors.
Status RunWithTwoCompressors(FakeSource& source, FakeImage& image, uint64_t size, bool out_of_order,
                             size_t workers, CompressWatch* watch, PipelineTotals* totals) {
  PipelineOptions options = Options(size, out_of_order);
  options.workers = workers;
  return RunPipeline(source, image, options, WatchedCompressors(2, watch), totals);
}

// More workers than compressors, on a source the workers read themselves: the extra
// workers overlap their (slow) reads, and never more runs are compressed at once than
// there are compressors; a write error still stops every worker.
TEST(PipelineTest, WorkersShareTheCompressorsWhenTheyRead) {
  for (bool out_of_order : {true, false}) {
    const uint64_t size = 2 * (1 << 20) + 512;
    Generated g = Generate(size, 9);
    FakeSource source(g.bytes, g.data_ranges);
    source.parallel_ = true;
    source.read_delay_ = std::chrono::milliseconds(2);
    FakeImage image(size);
    CompressWatch watch;
    PipelineTotals totals;
    Status status = RunWithTwoCompressors(source, image, size, out_of_order, 6, &watch, &totals);
    ASSERT_TRUE(status.ok()) << status.ToString();
    EXPECT_EQ(image.Content(), g.bytes);
    EXPECT_EQ(totals.clusters_zero + totals.clusters_compressed + totals.clusters_uncompressed,
              Clusters(size));
    EXPECT_LE(watch.max_in_flight.load(), 2);
    EXPECT_GT(source.max_reads_in_flight_.load(), 2u);  // the extra workers did read
    if (!out_of_order) {
      EXPECT_TRUE(std::is_sorted(image.write_order_.begin(), image.write_order_.end()));
    }
  }
  const uint64_t size = 8 << 20;
  std::vector<uint8_t> bytes(size, 'x');
  FakeSource source(bytes, {{0, size}});
  source.parallel_ = true;
  FakeImage image(size);
  image.fail_write_ = 5;
  CompressWatch watch;
  PipelineTotals totals;
  Status status = RunWithTwoCompressors(source, image, size, true, 6, &watch, &totals);
  EXPECT_EQ(status.code(), Status::Code::kNoSpace) << status.ToString();
}

// When the reader thread reads, workers beyond the compressors would only take turns with
// them: the pipeline runs one worker per compressor.
TEST(PipelineTest, NoMoreWorkersThanCompressorsWhenTheReaderReads) {
  const uint64_t size = 4 << 20;
  Generated g = Generate(size, 13);
  FakeSource source(g.bytes, g.data_ranges);
  FakeImage image(size);
  CompressWatch watch;
  PipelineTotals totals;
  Status status = RunWithTwoCompressors(source, image, size, true, 8, &watch, &totals);
  ASSERT_TRUE(status.ok()) << status.ToString();
  EXPECT_EQ(image.Content(), g.bytes);
  EXPECT_LE(watch.threads.size(), 2u);
}

TEST(PipelineTest, CompressedClustersReachTheImageInBatchesOfConsecutiveClusters) {
  for (bool workers_read : {false, true}) {
    SCOPED_TRACE(workers_read ? "workers read" : "reader reads");
    const uint64_t size = 4 << 20;
    std::vector<uint8_t> bytes(size);  // compressible, no zero cluster
    for (uint64_t i = 0; i < size; ++i) bytes[i] = static_cast<uint8_t>('a' + (i * 7) % 13);
    FakeSource source(bytes, {{0, size}});
    source.parallel_ = workers_read;
    FakeImage image(size);
    PipelineTotals totals;
    ASSERT_TRUE(
        RunPipeline(source, image, Options(size, true), Compressors(2, true), &totals).ok());
    EXPECT_EQ(image.Content(), bytes);
    EXPECT_EQ(totals.clusters_compressed, size / kClusterSize);
    uint64_t batched = 0;
    size_t largest = 0;
    for (const std::vector<uint64_t>& batch : image.batches_) {
      batched += batch.size();
      largest = std::max(largest, batch.size());
      for (size_t i = 1; i < batch.size(); ++i) {
        EXPECT_EQ(batch[i], batch[i - 1] + kClusterSize) << "a batch is a run of clusters";
      }
    }
    EXPECT_EQ(batched, totals.clusters_compressed);
    EXPECT_GT(largest, 1u);
    EXPECT_LT(image.batches_.size(), totals.clusters_compressed);
  }
}

// Regression: a worker released its chunk once the run was compressed, then (after waiting
// for its turn) took the guest offsets from the chunk, which the reader had meanwhile
// refilled with other data.
TEST(PipelineTest, RunsWaitingForTheirTurnKeepTheirOffsetsWhileTheirChunkIsReused) {
  const uint64_t size = 24 << 20;
  std::vector<uint8_t> bytes(size);  // compressible, every cluster different
  for (uint64_t i = 0; i < size; ++i) {
    bytes[i] =
        static_cast<uint8_t>(i % kClusterSize < 8 ? (i / kClusterSize) >> (i % 8) : 'a' + i % 3);
  }
  FakeSource source(bytes, {{0, size}});
  FakeImage image(size);
  image.batch_delay_ = std::chrono::microseconds(300);
  PipelineTotals totals;
  ASSERT_TRUE(RunPipeline(source, image, Options(size, false), Compressors(4, true), &totals).ok());
  EXPECT_EQ(image.Content(), bytes);
  EXPECT_TRUE(std::is_sorted(image.write_order_.begin(), image.write_order_.end()));
}

TEST(PipelineTest, InOrderRunsSplitTheirBatchAroundStoredClusters) {
  // Clusters alternate: compressible, compressible, incompressible, zero, ...
  const uint64_t size = 2 << 20;
  std::vector<uint8_t> bytes(size, 0);
  std::mt19937_64 rng(9);
  for (uint64_t c = 0; c < size / kClusterSize; ++c) {
    for (uint64_t i = 0; i < kClusterSize; ++i) {
      uint8_t& b = bytes[c * kClusterSize + i];
      if (c % 4 < 2) b = static_cast<uint8_t>('k' + i % 5);
      if (c % 4 == 2) b = static_cast<uint8_t>(rng());
    }
  }
  FakeSource source(bytes, {{0, size}});
  FakeImage image(size);
  PipelineTotals totals;
  ASSERT_TRUE(RunPipeline(source, image, Options(size, false), Compressors(3, true), &totals).ok());
  EXPECT_EQ(image.Content(), bytes);
  EXPECT_TRUE(std::is_sorted(image.write_order_.begin(), image.write_order_.end()));
  EXPECT_EQ(totals.clusters_compressed, size / kClusterSize / 2);
  EXPECT_EQ(totals.clusters_uncompressed, size / kClusterSize / 4);
  EXPECT_EQ(totals.clusters_zero, size / kClusterSize / 4);
  for (const std::vector<uint64_t>& batch : image.batches_) EXPECT_LE(batch.size(), 2u);
}

class PipelineFailure : public ::testing::TestWithParam<std::tuple<unsigned, bool>> {};

TEST_P(PipelineFailure, ImageWriteErrorStopsEverything) {
  const auto [workers, out_of_order] = GetParam();
  const uint64_t size = 8 << 20;
  std::vector<uint8_t> bytes(size, 'x');
  FakeSource source(bytes, {{0, size}});
  FakeImage image(size);
  image.fail_write_ = 5;
  PipelineTotals totals;
  Status status =
      RunPipeline(source, image, Options(size, out_of_order), Compressors(workers, true), &totals);
  EXPECT_EQ(status.code(), Status::Code::kNoSpace) << status.ToString();
  EXPECT_NE(status.message().find("/fake/target.qcow2"), std::string::npos);
  EXPECT_EQ(image.write_order_.size(), 4u);
}

TEST_P(PipelineFailure, SourceReadErrorStopsEverything) {
  const auto [workers, out_of_order] = GetParam();
  const uint64_t size = 16 << 20;
  std::vector<uint8_t> bytes(size, 'y');
  FakeSource source(bytes, {{0, size}});
  source.fail_read_ = 3;
  FakeImage image(size);
  PipelineTotals totals;
  Status status =
      RunPipeline(source, image, Options(size, out_of_order), Compressors(workers, true), &totals);
  EXPECT_EQ(status.code(), Status::Code::kIOError) << status.ToString();
  EXPECT_NE(status.message().find("/fake/source.raw"), std::string::npos);
  EXPECT_LT(image.write_order_.size(), size / kClusterSize);
}

TEST_P(PipelineFailure, CancelMidWayReturnsInterrupted) {
  const auto [workers, out_of_order] = GetParam();
  const uint64_t size = 16 << 20;
  Generated g = Generate(size, 11);
  FakeSource source(g.bytes, g.data_ranges);
  FakeImage image(size);
  std::atomic<bool> cancel{false};
  image.cancel_after_writes_flag_ = &cancel;
  image.cancel_after_writes_ = 3;
  PipelineOptions options = Options(size, out_of_order);
  options.cancel = &cancel;
  PipelineTotals totals;
  Status status = RunPipeline(source, image, options, Compressors(workers, true), &totals);
  EXPECT_EQ(status.code(), Status::Code::kInterrupted) << status.ToString();
  EXPECT_LT(image.write_order_.size(), size / kClusterSize);
}

INSTANTIATE_TEST_SUITE_P(All, PipelineFailure,
                         ::testing::Combine(::testing::Values(1u, 4u), ::testing::Bool()));

TEST(PipelineTest, CancelledBeforeStartWritesNothing) {
  const uint64_t size = 1 << 20;
  std::vector<uint8_t> bytes(size, 'z');
  FakeSource source(bytes, {{0, size}});
  FakeImage image(size);
  std::atomic<bool> cancel{true};
  PipelineOptions options = Options(size, true);
  options.cancel = &cancel;
  PipelineTotals totals;
  Status status = RunPipeline(source, image, options, Compressors(2, true), &totals);
  EXPECT_EQ(status.code(), Status::Code::kInterrupted);
  EXPECT_TRUE(image.write_order_.empty());
}

// ---------------------------------------------------------------------------- incremental

// The backing image of an incremental conversion, in memory: reads its bytes, maps
// all-zero clusters as unallocated and the others as data.
class MemoryImage final : public Image {
 public:
  explicit MemoryImage(std::vector<uint8_t> bytes) : bytes_(std::move(bytes)) {}
  ImageInfo Info() const override { return {}; }
  uint64_t virtual_size() const override { return bytes_.size(); }
  uint32_t cluster_size() const override { return kClusterSize; }
  Compression compression() const override { return Compression::kZlib; }
  Status Read(uint64_t guest_offset, std::span<uint8_t> out) override {
    if (guest_offset + out.size() > bytes_.size()) return Status::InvalidArgument("beyond");
    std::memcpy(out.data(), bytes_.data() + guest_offset, out.size());
    bytes_read_ += out.size();
    return Status::OK();
  }
  Result<std::vector<MapExtent>> Map(uint64_t guest_offset, uint64_t length) override {
    if (guest_offset + length > bytes_.size()) return Status::InvalidArgument("beyond");
    std::vector<MapExtent> extents;
    for (uint64_t offset = guest_offset; offset < guest_offset + length;) {
      const uint64_t stop =
          std::min(guest_offset + length, (offset / kClusterSize + 1) * kClusterSize);
      const bool zero = std::all_of(bytes_.begin() + offset, bytes_.begin() + stop,
                                    [](uint8_t b) { return b == 0; });
      extents.push_back({offset, stop - offset,
                         zero ? MapExtent::Kind::kUnallocated : MapExtent::Kind::kData, offset});
      offset = stop;
    }
    return extents;
  }
  Status Write(uint64_t, std::span<const uint8_t>) override { return Unsupported(); }
  Status WriteCompressed(uint64_t, std::span<const uint8_t>) override { return Unsupported(); }
  Status WriteZeroes(uint64_t, uint64_t) override { return Unsupported(); }
  Status Discard(uint64_t, uint64_t) override { return Unsupported(); }
  Status Flush() override { return Status::OK(); }
  Status Close() override { return Status::OK(); }
  Status CloseIncomplete() override { return Status::OK(); }

  std::atomic<uint64_t> bytes_read_{0};

 private:
  static Status Unsupported() { return Status::NotSupported("memory image"); }
  std::vector<uint8_t> bytes_;
};

// A disk at the previous backup (`backing`, `kBackingClusters` clusters of mixed data with
// holes) and now (`disk`: a few changes, grown by a partial cluster and a bit more).
struct Changes {
  std::vector<uint8_t> backing;
  std::vector<uint8_t> disk;
  std::vector<ByteRange> data_ranges;  // of the disk
  std::vector<ByteRange> dirty;        // what changed, as a dirty bitmap would say it
};
constexpr uint64_t kBackingClusters = 64;

Changes MakeChanges() {
  Changes c;
  const uint64_t backing_size = kBackingClusters * kClusterSize;
  c.backing = Generate(backing_size, 11).bytes;
  c.disk = c.backing;
  const uint64_t disk_size = backing_size + 2 * kClusterSize + 1536;  // grew, not aligned
  c.disk.resize(disk_size, 0);
  auto mark = [&](uint64_t offset, uint64_t length) { c.dirty.push_back({offset, length}); };
  auto find_data = [&](uint64_t from) {  // the first cluster at or after `from` with data
    uint64_t cluster = from;
    while (std::all_of(c.backing.begin() + cluster * kClusterSize,
                       c.backing.begin() + (cluster + 1) * kClusterSize,
                       [](uint8_t b) { return b == 0; })) {
      ++cluster;
    }
    return cluster * kClusterSize;
  };
  // A run of two whole clusters.
  for (uint64_t i = 0; i < 2 * kClusterSize; ++i) c.disk[3 * kClusterSize + i] = uint8_t(i * 31);
  mark(3 * kClusterSize, 2 * kClusterSize);
  // A single byte.
  c.disk[10 * kClusterSize + 100] ^= 0x5a;
  mark(10 * kClusterSize + 100, 1);
  // A run across a cluster boundary, partial at both ends.
  for (uint64_t i = 0; i < kClusterSize; ++i) c.disk[20 * kClusterSize + 3000 + i] = 0xc3;
  mark(20 * kClusterSize + 3000, kClusterSize);
  // Zeros over a whole cluster of data (read by the pipeline: it stays in the data ranges).
  const uint64_t zeroed = find_data(30);
  std::fill_n(c.disk.begin() + zeroed, kClusterSize, 0);
  mark(zeroed, kClusterSize);
  // Data discarded (a hole now, where the backing image has data).
  const uint64_t discarded = find_data(zeroed / kClusterSize + 1);
  std::fill_n(c.disk.begin() + discarded, kClusterSize, 0);
  mark(discarded, kClusterSize);
  // Written past the old end.
  for (uint64_t i = 0; i < 700; ++i) c.disk[backing_size + kClusterSize + 500 + i] = uint8_t(i);
  // Data ranges: the backing image's, minus the discarded cluster, plus every changed range.
  std::vector<ByteRange> data;
  for (uint64_t offset = 0; offset < disk_size; offset += kClusterSize) {
    const uint64_t stop = std::min(disk_size, offset + kClusterSize);
    const bool backing_data =
        offset < backing_size && !std::all_of(c.backing.begin() + offset, c.backing.begin() + stop,
                                              [](uint8_t b) { return b == 0; });
    const bool disk_data = !std::all_of(c.disk.begin() + offset, c.disk.begin() + stop,
                                        [](uint8_t b) { return b == 0; });
    if ((backing_data && offset != discarded) || disk_data) {
      if (!data.empty() && data.back().end() == offset) {
        data.back().length += stop - offset;
      } else {
        data.push_back({offset, stop - offset});
      }
    }
  }
  c.data_ranges = data;
  return c;
}

uint64_t AlignedOut(const std::vector<ByteRange>& ranges) {
  std::set<uint64_t> clusters;
  for (const ByteRange& r : ranges) {
    for (uint64_t c = r.offset / kClusterSize; c * kClusterSize < r.end(); ++c) clusters.insert(c);
  }
  return clusters.size() * kClusterSize;
}

class IncrementalPipeline : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

// With a dirty bitmap: only the dirty clusters (and the grown part) are read from the source
// and written; dirty zeros become zero clusters; the overlay reads as the disk does now.
TEST_P(IncrementalPipeline, BitmapReadsAndWritesOnlyDirtyClusters) {
  const auto [workers_read, out_of_order] = GetParam();
  Changes c = MakeChanges();
  FakeSource source(c.disk, c.data_ranges);
  source.parallel_ = workers_read;
  source.dirty_ranges_ = c.dirty;
  MemoryImage previous(c.backing);
  FakeImage image(c.disk.size());
  PipelineOptions options = Options(c.disk.size(), out_of_order);
  options.previous = &previous;
  options.dirty_bitmap = true;
  PipelineTotals totals;
  ASSERT_TRUE(RunPipeline(source, image, options, Compressors(2, true), &totals).ok());
  EXPECT_EQ(image.OverlayContent(c.backing), c.disk);

  // Read: the dirty clusters (the discarded one is a hole: not read), and the grown part's
  // data (the cluster written past the old end).
  const uint64_t backing_size = c.backing.size();
  uint64_t dirty_bytes = 0;
  for (const ByteRange& r : c.dirty) dirty_bytes += r.length;
  std::vector<ByteRange> dirty_data(c.dirty.begin(), c.dirty.end() - 1);  // minus the hole
  const uint64_t grown_read = kClusterSize;
  EXPECT_EQ(totals.bytes_read, AlignedOut(dirty_data) + grown_read);
  // The bound: the dirty bytes plus one cluster per dirty extent (plus the grown
  // part, which has no bitmap).
  EXPECT_LE(totals.bytes_read, dirty_bytes + c.dirty.size() * kClusterSize + grown_read);
  EXPECT_EQ(previous.bytes_read_.load(), 0u);  // a bitmap needs no comparison

  // Written: only dirty clusters and the grown cluster with data.
  std::set<uint64_t> dirty_clusters;
  for (const ByteRange& r : c.dirty) {
    for (uint64_t o = r.offset / kClusterSize * kClusterSize; o < r.end(); o += kClusterSize) {
      dirty_clusters.insert(o);
    }
  }
  for (const auto& [offset, data] : image.clusters_) {
    EXPECT_TRUE(dirty_clusters.contains(offset) || offset >= backing_size) << offset;
  }
  for (uint64_t offset : image.zeroed_) EXPECT_TRUE(dirty_clusters.contains(offset)) << offset;
  EXPECT_EQ(image.zeroed_.size(), 2u);  // zeros over data, and the discarded cluster
  EXPECT_EQ(totals.clusters_compressed + totals.clusters_uncompressed, image.clusters_.size());
  EXPECT_EQ(totals.clusters_zero + totals.clusters_compressed + totals.clusters_uncompressed +
                totals.clusters_unchanged,
            Clusters(c.disk.size()));
  EXPECT_EQ(totals.clusters_unchanged, kBackingClusters - dirty_clusters.size());
}

// Without a bitmap: every data cluster is read and compared with the backing image; only
// the ones that differ are written, zeros over data (read or hole) become zero clusters.
TEST_P(IncrementalPipeline, CompareWritesOnlyChangedClusters) {
  const auto [workers_read, out_of_order] = GetParam();
  Changes c = MakeChanges();
  FakeSource source(c.disk, c.data_ranges);
  source.parallel_ = workers_read;
  MemoryImage previous(c.backing);
  FakeImage image(c.disk.size());
  PipelineOptions options = Options(c.disk.size(), out_of_order);
  options.previous = &previous;
  PipelineTotals totals;
  ASSERT_TRUE(RunPipeline(source, image, options, Compressors(2, true), &totals).ok());
  EXPECT_EQ(image.OverlayContent(c.backing), c.disk);

  std::set<uint64_t> changed;
  for (uint64_t offset = 0; offset < c.backing.size(); offset += kClusterSize) {
    if (!std::equal(c.disk.begin() + offset, c.disk.begin() + offset + kClusterSize,
                    c.backing.begin() + offset)) {
      changed.insert(offset);
    }
  }
  ASSERT_EQ(changed.size(), 7u);  // 2 + 1 + 2 + zeros over data + discarded
  std::set<uint64_t> touched;
  for (const auto& [offset, data] : image.clusters_) touched.insert(offset);
  touched.insert(image.zeroed_.begin(), image.zeroed_.end());
  std::set<uint64_t> expected = changed;
  expected.insert(c.backing.size() + kClusterSize);  // written past the old end
  EXPECT_EQ(touched, expected);
  EXPECT_EQ(image.zeroed_.size(), 2u);
  uint64_t data_bytes = 0;
  for (const ByteRange& r : c.data_ranges) data_bytes += r.length;
  EXPECT_EQ(totals.bytes_read, data_bytes);
  EXPECT_EQ(totals.clusters_zero + totals.clusters_compressed + totals.clusters_uncompressed +
                totals.clusters_unchanged,
            Clusters(c.disk.size()));
  EXPECT_GT(totals.clusters_unchanged, 0u);
}

INSTANTIATE_TEST_SUITE_P(Modes, IncrementalPipeline,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()));

}  // namespace
}  // namespace zqcow::convert
