// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/pipeline.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <system_error>
#include <thread>
#include <utility>

#include "convert/chunk_pool.h"
#include "convert/order_gate.h"
#include "convert/work_queue.h"
#include "convert/zero_detect.h"
#include "io/aligned_buffer.h"

namespace zqcow::convert {

namespace {

using io::AlignDown;
using io::AlignUp;

// Guest bytes per read buffer (more when a cluster or the source's alignment is larger).
constexpr size_t kChunkBytes = size_t{1} << 20;
// Chunks read with one ReadBatch (io_uring queue depth for the source).
constexpr size_t kReadBatchChunks = 4;
// Bounds of the buffer pool: at least this much for read-ahead, at most this much however
// many workers there are. Keeps a default conversion far below 64 MiB of resident memory.
constexpr size_t kMinPoolBytes = size_t{8} << 20;
constexpr size_t kMaxPoolBytes = size_t{16} << 20;
constexpr size_t kMinPoolChunks = 2;
// The source is asked for its data ranges this many guest bytes at a time, so a huge
// sparse source costs a handful of queries, not one per chunk.
constexpr uint64_t kScanWindowBytes = uint64_t{1} << 30;
constexpr auto kProgressInterval = std::chrono::milliseconds(100);

uint64_t DivUp(uint64_t value, uint64_t divisor) { return (value + divisor - 1) / divisor; }

// One guest cluster for a worker: where its bytes are and its place in guest order.
struct ClusterTask {
  Chunk* chunk = nullptr;
  uint32_t cluster_index = 0;  // inside the chunk
  uint64_t sequence = 0;       // 0, 1, 2, ... over the queued clusters in guest order
  // The worker reads the cluster from the source (and checks it for zeros) itself.
  bool needs_read = false;
};

// A chunk whose reads are queued in the current batch.
struct PendingChunk {
  Chunk* chunk = nullptr;
  std::vector<ByteRange> runs;  // guest ranges read into it, aligned, sorted
};

class Pipeline {
 public:
  Pipeline(Source& source, Image& image, const PipelineOptions& options,
           std::vector<std::unique_ptr<codec::Compressor>> compressors)
      : source_(source),
        image_(image),
        options_(options),
        cluster_size_(options.cluster_size),
        read_unit_(std::max<uint64_t>(options.cluster_size, source.read_alignment())),
        chunk_bytes_(std::max<uint64_t>(kChunkBytes, read_unit_)),
        window_bytes_(AlignUp(kScanWindowBytes, chunk_bytes_)),
        compressors_(std::move(compressors)),
        pool_(PoolChunks(chunk_bytes_, compressors_.size()), chunk_bytes_,
              std::max<size_t>(io::kBufferAlignment, source.read_alignment())),
        batch_limit_(std::max<size_t>(1, std::min(kReadBatchChunks, pool_.count() / 2))),
        workers_read_(source.parallel_reads()) {}

  Status Run(PipelineTotals* totals);

 private:
  static size_t PoolChunks(size_t chunk_bytes, size_t workers) {
    const size_t wanted = workers + kReadBatchChunks;
    const size_t low = std::max(kMinPoolChunks, kMinPoolBytes / chunk_bytes);
    const size_t high = std::max(low, kMaxPoolBytes / chunk_bytes);
    return std::clamp(wanted, low, high);
  }

  // ---- stop / error state ----
  void Fail(Status status);
  bool stopped() const { return stopped_.load(std::memory_order_acquire); }
  bool CancelRequested() const {
    return options_.cancel != nullptr && options_.cancel->load(std::memory_order_relaxed);
  }
  Status InterruptedStatus() const {
    return Status::Interrupted(options_.target_path + ": conversion interrupted");
  }

  // ---- reader ----
  void ReaderMain();
  Status ReadSource();
  Status QueueChunk(uint64_t chunk_offset, std::vector<ByteRange> runs);
  Status FlushBatch();
  void DispatchChunk(const PendingChunk& pending);
  // [start, end) is left unallocated. REQUIRES: start cluster-aligned, end cluster-aligned
  // or the virtual size.
  void AccountZero(uint64_t start, uint64_t end);

  // ---- workers ----
  void WorkerMain(size_t worker);
  Status ProcessCluster(const ClusterTask& task, codec::Compressor* compressor,
                        std::vector<uint8_t>& compressed);
  // For needs_read tasks: reads the cluster. Sets *zero when it is all zeros (then
  // accounted and done: the caller only has to give up its write turn).
  Status ReadCluster(const ClusterTask& task, bool* zero);
  void ReleaseCluster(Chunk* chunk);
  bool BeginWrite(uint64_t sequence) { return options_.out_of_order || gate_.WaitTurn(sequence); }
  void EndWrite() {
    if (!options_.out_of_order) gate_.Advance();
  }

  // ---- coordination ----
  void ThreadExited();
  void ReportProgress();

  Source& source_;
  Image& image_;
  const PipelineOptions& options_;
  const uint64_t cluster_size_;
  const uint64_t read_unit_;    // read ranges are aligned to this (cluster and source)
  const uint64_t chunk_bytes_;  // a multiple of read_unit_
  const uint64_t window_bytes_;
  std::vector<std::unique_ptr<codec::Compressor>> compressors_;
  ChunkPool pool_;
  const size_t batch_limit_;
  // Workers read clusters themselves (Source::parallel_reads); the reader only plans.
  const bool workers_read_;
  WorkQueue<ClusterTask> queue_;
  OrderGate gate_;

  // Reader-thread state.
  std::vector<PendingChunk> batch_;
  std::vector<io::IoRequest> batch_requests_;
  uint64_t next_sequence_ = 0;

  // Counters (any thread).
  std::atomic<uint64_t> bytes_done_{0};
  std::atomic<uint64_t> bytes_read_{0};
  std::atomic<uint64_t> zero_bytes_skipped_{0};
  std::atomic<uint64_t> compressed_bytes_{0};
  std::atomic<uint64_t> clusters_compressed_{0};
  std::atomic<uint64_t> clusters_uncompressed_{0};
  std::atomic<uint64_t> clusters_zero_{0};

  std::atomic<bool> stopped_{false};
  std::mutex error_mutex_;
  Status first_error_;  // guarded by error_mutex_

  std::mutex live_mutex_;
  std::condition_variable live_changed_;
  size_t live_threads_ = 0;  // guarded by live_mutex_
};

void Pipeline::Fail(Status status) {
  {
    std::lock_guard lock(error_mutex_);
    if (first_error_.ok()) first_error_ = std::move(status);
  }
  stopped_.store(true, std::memory_order_release);
  pool_.Stop();
  queue_.Stop();
  gate_.Stop();
}

void Pipeline::AccountZero(uint64_t start, uint64_t end) {
  if (end <= start) return;
  zero_bytes_skipped_.fetch_add(end - start, std::memory_order_relaxed);
  clusters_zero_.fetch_add(DivUp(end, cluster_size_) - start / cluster_size_,
                           std::memory_order_relaxed);
  bytes_done_.fetch_add(end - start, std::memory_order_relaxed);
}

void Pipeline::ReaderMain() {
  Status status = ReadSource();
  if (!status.ok()) Fail(std::move(status));
  queue_.Close();
  ThreadExited();
}

Status Pipeline::ReadSource() {
  const uint64_t virtual_size = options_.virtual_size;
  for (uint64_t window_start = 0; window_start < virtual_size; window_start += window_bytes_) {
    const uint64_t window_end = std::min(virtual_size, window_start + window_bytes_);
    // Past the source's end everything reads as zeros: no need to ask.
    std::vector<ByteRange> ranges;
    if (window_start < source_.size()) {
      ZQ_ASSIGN_OR_RETURN(ranges, source_.DataRanges(window_start, window_end - window_start));
    }
    size_t next_range = 0;
    uint64_t pos = window_start;  // always chunk-aligned (or window_end)
    while (pos < window_end) {
      if (stopped()) return Status::OK();  // another thread failed; its error is returned
      if (CancelRequested()) return InterruptedStatus();
      while (next_range < ranges.size() && ranges[next_range].end() <= pos) ++next_range;
      if (next_range == ranges.size()) {
        AccountZero(pos, window_end);
        break;
      }
      const uint64_t data_chunk = AlignDown(std::max(ranges[next_range].offset, pos), chunk_bytes_);
      if (data_chunk > pos) {  // whole chunks without data: skip unread
        AccountZero(pos, data_chunk);
        pos = data_chunk;
        continue;
      }
      const uint64_t buffer_end = pos + chunk_bytes_;
      const uint64_t chunk_end = std::min(buffer_end, window_end);
      std::vector<ByteRange> runs;
      for (size_t i = next_range; i < ranges.size() && ranges[i].offset < chunk_end; ++i) {
        const uint64_t start = AlignDown(std::max(ranges[i].offset, pos), read_unit_);
        const uint64_t stop =
            std::min(AlignUp(std::min(ranges[i].end(), chunk_end), read_unit_), buffer_end);
        if (!runs.empty() && runs.back().end() >= start) {
          runs.back().length = std::max(runs.back().end(), stop) - runs.back().offset;
        } else {
          runs.push_back({start, stop - start});
        }
      }
      // The gaps between runs are holes: left unallocated without reading.
      uint64_t cursor = pos;
      for (const ByteRange& run : runs) {
        AccountZero(cursor, run.offset);
        cursor = run.end();
      }
      AccountZero(cursor, chunk_end);
      ZQ_RETURN_IF_ERROR(QueueChunk(pos, std::move(runs)));
      pos = chunk_end;
    }
  }
  return FlushBatch();
}

Status Pipeline::QueueChunk(uint64_t chunk_offset, std::vector<ByteRange> runs) {
  Chunk* chunk = batch_.empty() ? nullptr : pool_.TryAcquire();
  if (chunk == nullptr) {
    // Submit what is gathered before waiting, so workers are never starved by read-ahead.
    ZQ_RETURN_IF_ERROR(FlushBatch());
    chunk = pool_.Acquire();
    if (chunk == nullptr) return Status::OK();  // stopped
  }
  chunk->guest_offset = chunk_offset;
  for (const ByteRange& run : runs) {
    batch_requests_.push_back(
        {run.offset, chunk->buffer.data() + (run.offset - chunk_offset), run.length});
  }
  batch_.push_back({chunk, std::move(runs)});
  if (batch_.size() >= batch_limit_) return FlushBatch();
  return Status::OK();
}

Status Pipeline::FlushBatch() {
  if (batch_.empty()) return Status::OK();
  Status status = workers_read_ ? Status::OK() : source_.Read(batch_requests_);
  if (status.ok() && !workers_read_) {
    uint64_t read = 0;
    for (const io::IoRequest& request : batch_requests_) {
      if (request.offset < source_.size()) {
        read += std::min<uint64_t>(request.length, source_.size() - request.offset);
      }
    }
    bytes_read_.fetch_add(read, std::memory_order_relaxed);
  }
  if (status.ok()) {
    for (const PendingChunk& pending : batch_) DispatchChunk(pending);
  } else {
    for (const PendingChunk& pending : batch_) pool_.Release(pending.chunk);
  }
  batch_.clear();
  batch_requests_.clear();
  return status;
}

void Pipeline::DispatchChunk(const PendingChunk& pending) {
  Chunk* chunk = pending.chunk;
  const uint64_t virtual_size = options_.virtual_size;
  std::vector<ClusterTask> tasks;
  for (const ByteRange& run : pending.runs) {
    for (uint64_t offset = run.offset; offset < run.end() && offset < virtual_size;
         offset += cluster_size_) {
      const uint64_t in_chunk = offset - chunk->guest_offset;
      const auto cluster_index = static_cast<uint32_t>(in_chunk / cluster_size_);
      if (workers_read_) {
        tasks.push_back({chunk, cluster_index, next_sequence_++, /*needs_read=*/true});
        continue;
      }
      uint8_t* data = chunk->buffer.data() + in_chunk;
      const uint64_t valid = std::min(cluster_size_, virtual_size - offset);
      // The last cluster is padded with zeros to a whole cluster.
      if (valid < cluster_size_) std::memset(data + valid, 0, cluster_size_ - valid);
      if (IsAllZero({data, valid})) {
        AccountZero(offset, offset + valid);
        continue;
      }
      tasks.push_back({chunk, cluster_index, next_sequence_++, /*needs_read=*/false});
    }
  }
  if (tasks.empty()) {
    pool_.Release(chunk);
    return;
  }
  chunk->pending_clusters.store(static_cast<uint32_t>(tasks.size()), std::memory_order_relaxed);
  for (const ClusterTask& task : tasks) queue_.Push(task);
}

void Pipeline::WorkerMain(size_t worker) {
  codec::Compressor* compressor = compressors_[worker].get();
  std::vector<uint8_t> compressed(compressor != nullptr ? cluster_size_ - 1 : 0);
  while (std::optional<ClusterTask> task = queue_.Pop()) {
    // Checked per cluster too (not only by the reader and the coordinator), so a cancel
    // stops the conversion within a cluster or so even when everything is already read.
    if (CancelRequested()) {
      Fail(InterruptedStatus());
      break;
    }
    Status status = ProcessCluster(*task, compressor, compressed);
    if (!status.ok()) {
      Fail(std::move(status));
      break;
    }
  }
  ThreadExited();
}

Status Pipeline::ProcessCluster(const ClusterTask& task, codec::Compressor* compressor,
                                std::vector<uint8_t>& compressed) {
  Chunk* chunk = task.chunk;
  const uint64_t in_chunk = uint64_t{task.cluster_index} * cluster_size_;
  const uint64_t guest_offset = chunk->guest_offset + in_chunk;
  const uint64_t valid = std::min(cluster_size_, options_.virtual_size - guest_offset);
  std::span<const uint8_t> cluster(chunk->buffer.data() + in_chunk, cluster_size_);

  if (task.needs_read) {
    bool zero = false;
    Status read = ReadCluster(task, &zero);
    if (!read.ok() || zero) {
      ReleaseCluster(chunk);
      // Nothing to write, but the turn must pass so later clusters can go.
      if (read.ok() && BeginWrite(task.sequence)) EndWrite();
      return read;
    }
  }

  if (compressor != nullptr) {
    Result<size_t> size = compressor->Compress(cluster, compressed);
    if (!size.ok()) {
      ReleaseCluster(chunk);
      return size.status().WithPrefix(options_.target_path + ": compressing guest offset " +
                                      std::to_string(guest_offset));
    }
    if (*size > 0) {
      ReleaseCluster(chunk);                                // the source bytes are no longer needed
      if (!BeginWrite(task.sequence)) return Status::OK();  // stopped
      Status status = image_.WriteCompressed(guest_offset, {compressed.data(), *size});
      EndWrite();
      ZQ_RETURN_IF_ERROR(status);
      clusters_compressed_.fetch_add(1, std::memory_order_relaxed);
      compressed_bytes_.fetch_add(*size, std::memory_order_relaxed);
      bytes_done_.fetch_add(valid, std::memory_order_relaxed);
      return Status::OK();
    }
  }
  // Stored as is: no compression asked, or it did not fit below one cluster.
  if (!BeginWrite(task.sequence)) {
    ReleaseCluster(chunk);
    return Status::OK();
  }
  Status status = image_.Write(guest_offset, cluster.first(valid));
  EndWrite();
  ReleaseCluster(chunk);
  ZQ_RETURN_IF_ERROR(status);
  clusters_uncompressed_.fetch_add(1, std::memory_order_relaxed);
  bytes_done_.fetch_add(valid, std::memory_order_relaxed);
  return Status::OK();
}

Status Pipeline::ReadCluster(const ClusterTask& task, bool* zero) {
  const uint64_t in_chunk = uint64_t{task.cluster_index} * cluster_size_;
  const uint64_t guest_offset = task.chunk->guest_offset + in_chunk;
  const uint64_t valid = std::min(cluster_size_, options_.virtual_size - guest_offset);
  uint8_t* data = task.chunk->buffer.data() + in_chunk;
  const io::IoRequest request{guest_offset, data, cluster_size_};
  ZQ_RETURN_IF_ERROR(source_.Read({&request, 1}));
  if (guest_offset < source_.size()) {
    bytes_read_.fetch_add(std::min(cluster_size_, source_.size() - guest_offset),
                          std::memory_order_relaxed);
  }
  if (valid < cluster_size_) std::memset(data + valid, 0, cluster_size_ - valid);
  *zero = IsAllZero({data, valid});
  if (*zero) AccountZero(guest_offset, guest_offset + valid);
  return Status::OK();
}

void Pipeline::ReleaseCluster(Chunk* chunk) {
  if (chunk->pending_clusters.fetch_sub(1, std::memory_order_acq_rel) == 1) pool_.Release(chunk);
}

void Pipeline::ThreadExited() {
  {
    std::lock_guard lock(live_mutex_);
    --live_threads_;
  }
  live_changed_.notify_all();
}

void Pipeline::ReportProgress() {
  if (!options_.progress) return;
  ConvertProgress progress;
  progress.bytes_done = bytes_done_.load(std::memory_order_relaxed);
  progress.bytes_total = options_.virtual_size;
  progress.elapsed_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - options_.start_time).count();
  options_.progress(progress);
}

Status Pipeline::Run(PipelineTotals* totals) {
  std::vector<std::thread> threads;
  threads.reserve(1 + compressors_.size());
  auto start = [&](auto&& body) {
    {
      std::lock_guard lock(live_mutex_);
      ++live_threads_;
    }
    try {
      threads.emplace_back(std::forward<decltype(body)>(body));
    } catch (const std::system_error& error) {
      ThreadExited();
      Fail(Status::IOError(options_.target_path +
                           ": cannot start a pipeline thread: " + error.what()));
    }
  };
  start([this] { ReaderMain(); });
  for (size_t worker = 0; worker < compressors_.size() && !stopped(); ++worker) {
    start([this, worker] { WorkerMain(worker); });
  }

  {
    using Clock = std::chrono::steady_clock;
    const auto checkpoint_every = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(options_.checkpoint_seconds));
    const bool checkpoints = options_.checkpoint_seconds > 0;
    const auto tick =
        checkpoints ? std::min<Clock::duration>(kProgressInterval, checkpoint_every) : kProgressInterval;
    auto last_checkpoint = Clock::now();
    std::unique_lock lock(live_mutex_);
    while (!live_changed_.wait_for(lock, tick, [this] { return live_threads_ == 0; })) {
      lock.unlock();
      if (CancelRequested() && !stopped()) Fail(InterruptedStatus());
      if (checkpoints && !stopped() && Clock::now() - last_checkpoint >= checkpoint_every) {
        // Safe while workers write: the image orders data before the metadata naming it.
        Status status = image_.Flush();
        if (!status.ok()) Fail(status);
        last_checkpoint = Clock::now();
      }
      ReportProgress();
      lock.lock();
    }
  }
  for (std::thread& thread : threads) thread.join();
  ReportProgress();

  totals->bytes_read = bytes_read_.load();
  totals->zero_bytes_skipped = zero_bytes_skipped_.load();
  totals->compressed_bytes = compressed_bytes_.load();
  totals->clusters_compressed = clusters_compressed_.load();
  totals->clusters_uncompressed = clusters_uncompressed_.load();
  totals->clusters_zero = clusters_zero_.load();

  std::lock_guard lock(error_mutex_);
  if (!first_error_.ok()) return first_error_;
  // A cancel that came after the last cluster was written changes nothing: the image is
  // complete.
  return Status::OK();
}

}  // namespace

Status RunPipeline(Source& source, Image& image, const PipelineOptions& options,
                   std::vector<std::unique_ptr<codec::Compressor>> compressors,
                   PipelineTotals* totals) {
  if (compressors.empty()) {
    return Status::InvalidArgument(options.target_path + ": the pipeline needs a worker");
  }
  Pipeline pipeline(source, image, options, std::move(compressors));
  return pipeline.Run(totals);
}

}  // namespace zqcow::convert
