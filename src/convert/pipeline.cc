// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/pipeline.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <iterator>
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
constexpr size_t kReadBatchChunks = 4;  // docs/BENCHMARKS.md, "Design measurements"
// Bounds of the buffer pool: at least this much for read-ahead, at most this much however
// many workers there are. Keeps a default conversion far below 64 MiB of resident memory.
constexpr size_t kMinPoolBytes = size_t{8} << 20;
constexpr size_t kMaxPoolBytes = size_t{16} << 20;
constexpr size_t kMinPoolChunks = 2;
// The source is asked for its data ranges this many guest bytes at a time, so a huge
// sparse source costs a handful of queries, not one per chunk.
constexpr uint64_t kScanWindowBytes = uint64_t{1} << 30;
constexpr auto kProgressInterval = std::chrono::milliseconds(100);
// A worker task is a run of consecutive guest clusters of one chunk: it is compressed into
// one buffer and written with one Image::WriteCompressedBatch, so the image's locks are
// taken per run, not per cluster. At most this many guest bytes per run (a run never
// crosses a chunk either) ...
constexpr uint64_t kRunBytes = uint64_t{1} << 20;
// ... and this many clusters (bounds the per-worker bookkeeping for tiny clusters) ...
constexpr uint64_t kMaxRunClusters = 64;
// ... and short enough that the buffer pool holds this many runs per worker, so every
// worker has work while the reader reads ahead.
constexpr uint64_t kPoolRunsPerWorker = 2;

uint64_t DivUp(uint64_t value, uint64_t divisor) { return (value + divisor - 1) / divisor; }

// A run of consecutive guest clusters for a worker: where their bytes are and the run's
// place in guest order.
struct RunTask {
  Chunk* chunk = nullptr;
  uint32_t first_cluster = 0;  // inside the chunk
  uint32_t cluster_count = 0;  // clusters [first_cluster, first_cluster + cluster_count)
  uint64_t sequence = 0;       // 0, 1, 2, ... over the queued runs in guest order
  // The worker reads the run from the source (and checks its clusters for zeros) itself.
  bool needs_read = false;
};

// What became of one cluster of a run. kZeroFlag: written as a zero cluster (incremental:
// it hides the backing chain's data); kUnchanged: the chain reads the same, left alone.
enum class ClusterOutcome : uint8_t { kZero, kZeroFlag, kUnchanged, kCompressed, kStored };

// The parts of sorted, disjoint `a` and `b` that both cover, sorted and disjoint.
std::vector<ByteRange> Intersect(const std::vector<ByteRange>& a, const std::vector<ByteRange>& b) {
  std::vector<ByteRange> both;
  size_t i = 0;
  size_t j = 0;
  while (i < a.size() && j < b.size()) {
    const uint64_t start = std::max(a[i].offset, b[j].offset);
    const uint64_t end = std::min(a[i].end(), b[j].end());
    if (start < end) both.push_back({start, end - start});
    if (a[i].end() < b[j].end()) {
      ++i;
    } else {
      ++j;
    }
  }
  return both;
}

// A worker's scratch, reused run after run.
struct WorkerState {
  codec::Compressor* compressor = nullptr;  // its own, or a leased shared one; or null
  std::vector<uint8_t> compressed;          // the run's compressed clusters, back to back
  std::vector<ClusterOutcome> outcome;      // per cluster of the run
  std::vector<std::span<const uint8_t>> compressed_cluster;  // kCompressed: its bytes
  std::vector<CompressedCluster> batch;                      // the next WriteCompressedBatch
  std::vector<uint8_t> chain;  // incremental without a bitmap: what the chain reads for a run
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
        compress_(compressors_.front() != nullptr),
        workers_(Workers(options.workers, compressors_.size(), compress_, source.parallel_reads())),
        shared_compressors_(compress_ && workers_ > compressors_.size()),
        pool_(PoolChunks(chunk_bytes_, workers_), chunk_bytes_,
              std::max<size_t>(io::kBufferAlignment, source.read_alignment())),
        batch_limit_(std::max<size_t>(1, std::min(kReadBatchChunks, pool_.count() / 2))),
        run_clusters_(RunClusters(cluster_size_, pool_.count() * chunk_bytes_, workers_)),
        workers_read_(source.parallel_reads()),
        raw_(options.raw_output),
        previous_(options.previous),
        previous_size_(previous_ != nullptr ? previous_->virtual_size() : 0) {
    if (shared_compressors_) {
      for (const auto& compressor : compressors_) free_compressors_.push_back(compressor.get());
    }
  }

  Status Run(PipelineTotals* totals);

 private:
  // Workers beyond the compressors only pay off when they read (and decompress) the
  // source themselves: otherwise they would just take turns with the compressors (each
  // hand-over a wake-up and a switch; docs/BENCHMARKS.md, "Design measurements").
  static size_t Workers(size_t requested, size_t compressors, bool compress, bool workers_read) {
    if (requested == 0) return compressors;
    if (compress && !workers_read) return std::min(requested, compressors);
    return requested;
  }
  static size_t PoolChunks(size_t chunk_bytes, size_t workers) {
    const size_t wanted = workers + kReadBatchChunks;
    const size_t low = std::max(kMinPoolChunks, kMinPoolBytes / chunk_bytes);
    const size_t high = std::max(low, kMaxPoolBytes / chunk_bytes);
    return std::clamp(wanted, low, high);
  }
  static uint32_t RunClusters(uint64_t cluster_size, uint64_t pool_bytes, size_t workers) {
    const uint64_t by_bytes = kRunBytes / cluster_size;
    const uint64_t by_pool = pool_bytes / cluster_size / (kPoolRunsPerWorker * workers);
    return static_cast<uint32_t>(
        std::clamp<uint64_t>(std::min(by_bytes, by_pool), 1, kMaxRunClusters));
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
  // [start, end) is left unallocated because it did not change (incremental). Same
  // REQUIRES.
  void AccountUnchanged(uint64_t start, uint64_t end);
  // Incremental: the ranges of the current scan window to consider (options.previous),
  // aligned to read_unit_ (or the virtual size), sorted and disjoint.
  Result<std::vector<ByteRange>> ConsideredRanges(uint64_t window_start, uint64_t window_end);
  // [start, end) is not read (the source has no data there, or it is not considered):
  // accounted as zero, or in incremental mode as unchanged outside considered_, and as
  // zero inside it, where clusters the backing chain holds data in become zero clusters.
  // Same REQUIRES.
  Status SkipUnread(uint64_t start, uint64_t end);
  Status ZeroOverChain(uint64_t start, uint64_t end);
  // Bytes of the guest cluster at `guest_offset` (cluster-aligned) inside the virtual size.
  uint64_t ValidBytes(uint64_t guest_offset) const {
    return std::min(cluster_size_, options_.virtual_size - guest_offset);
  }
  // For a cluster just read into `data`: pads the last (partial) cluster with zeros to a
  // whole cluster; true, and accounted as left unallocated, when it is all zeros.
  bool PadAndCheckZero(uint64_t guest_offset, uint8_t* data);

  // ---- workers ----
  void WorkerMain(size_t worker);
  // Compresses the run's clusters, then writes them in one turn: the compressed ones with
  // WriteCompressedBatch, the others with Write (in guest order when writing in order).
  Status ProcessRun(const RunTask& task, WorkerState& state);
  // Shared compressors (more workers than compressors): takes a free one into
  // state.compressor unless it holds one (waits; leaves it null when stopped), and gives
  // it back. No-ops when every worker owns its compressor.
  void LeaseCompressor(WorkerState& state);
  void ReturnCompressor(WorkerState& state);
  // For needs_read tasks: reads the run with one request and (not incremental) marks its
  // all-zero clusters kZero (accounted and done).
  Status ReadRun(const RunTask& task, WorkerState& state);
  // Incremental: pads the run's clusters and decides each one's outcome (zero, zero flag,
  // unchanged, or to be stored), comparing with the backing chain without a bitmap.
  Status ClassifyRun(const RunTask& task, uint64_t run_offset, WorkerState& state);
  // Writes the run's clusters (the first at guest offset `run_offset`) as `state.outcome`
  // says. Counts what was written. Touches the chunk only for kStored clusters: once all
  // clusters are compressed the chunk is released (and may be refilled) before the write.
  Status WriteRun(const RunTask& task, uint64_t run_offset, WorkerState& state);
  Status FlushCompressedBatch(WorkerState& state);
  // Raw output: writes the run's data and zero stretches (PipelineOptions::raw_output).
  Status WriteRawRun(const RunTask& task, uint64_t run_offset, WorkerState& state);
  // Hashes the run's clusters inside options_.digest_ranges into ranges_digest_.
  void DigestRanges(const RunTask& task, uint64_t run_offset, const WorkerState& state);
  // A task is done with its chunk; the last one releases it.
  void ReleaseTask(Chunk* chunk);
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
  const bool compress_;  // false: every cluster is stored as is
  const size_t workers_;
  const bool shared_compressors_;  // workers take a compressor per run (more workers)
  ChunkPool pool_;
  const size_t batch_limit_;
  const uint32_t run_clusters_;  // clusters per RunTask at most
  // Workers read clusters themselves (Source::parallel_reads); the reader only plans.
  const bool workers_read_;
  const bool raw_;  // PipelineOptions::raw_output
  // Incremental mode (PipelineOptions::previous): the backing image, or null.
  Image* const previous_;
  const uint64_t previous_size_;
  WorkQueue<RunTask> queue_;
  OrderGate gate_;
  // Compressors no worker holds (shared_compressors_ only). LIFO: the one used last has
  // the warmest caches.
  std::mutex compressors_mutex_;
  std::condition_variable compressor_returned_;
  std::vector<codec::Compressor*> free_compressors_;  // guarded by compressors_mutex_

  // Reader-thread state.
  std::vector<PendingChunk> batch_;
  std::vector<io::IoRequest> batch_requests_;
  uint64_t next_sequence_ = 0;
  std::vector<ByteRange> considered_;  // incremental: of the current scan window

  // Counters (any thread).
  std::atomic<uint64_t> bytes_done_{0};
  std::atomic<uint64_t> bytes_read_{0};
  std::atomic<uint64_t> zero_bytes_skipped_{0};
  std::atomic<uint64_t> compressed_bytes_{0};
  std::atomic<uint64_t> clusters_compressed_{0};
  std::atomic<uint64_t> clusters_uncompressed_{0};
  std::atomic<uint64_t> clusters_zero_{0};
  std::atomic<uint64_t> clusters_unchanged_{0};
  // ConvertStats::content_digest: every cluster written with data (compressed or stored),
  // once, from the bytes read; not zero clusters or unallocated ones.
  digest::ConcurrentDigest digest_;
  digest::ConcurrentDigest ranges_digest_;  // PipelineOptions::digest_ranges

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
  {
    std::lock_guard lock(compressors_mutex_);  // a waiter checks stopped() under it
  }
  compressor_returned_.notify_all();
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

void Pipeline::AccountUnchanged(uint64_t start, uint64_t end) {
  if (end <= start) return;
  clusters_unchanged_.fetch_add(DivUp(end, cluster_size_) - start / cluster_size_,
                                std::memory_order_relaxed);
  bytes_done_.fetch_add(end - start, std::memory_order_relaxed);
}

Result<std::vector<ByteRange>> Pipeline::ConsideredRanges(uint64_t window_start,
                                                          uint64_t window_end) {
  if (!options_.dirty_bitmap)
    return std::vector<ByteRange>{{window_start, window_end - window_start}};
  std::vector<ByteRange> considered;
  auto add = [&](uint64_t start, uint64_t end) {
    start = std::max(AlignDown(start, read_unit_), window_start);
    end = std::min(AlignUp(end, read_unit_), window_end);
    if (start >= end) return;
    if (!considered.empty() && considered.back().end() >= start) {
      considered.back().length = std::max(considered.back().end(), end) - considered.back().offset;
    } else {
      considered.push_back({start, end - start});
    }
  };
  // Beyond the backing image's end (the disk grew) everything is new.
  const uint64_t grown = std::max(window_start, AlignDown(previous_size_, read_unit_));
  const uint64_t asked_end = std::min(window_end, std::min(grown, source_.size()));
  if (window_start < asked_end) {
    ZQ_ASSIGN_OR_RETURN(std::vector<ByteRange> dirty,
                        source_.DirtyRanges(window_start, asked_end - window_start));
    for (const ByteRange& range : dirty) add(range.offset, range.end());
  }
  add(grown, window_end);
  return considered;
}

Status Pipeline::SkipUnread(uint64_t start, uint64_t end) {
  if (end <= start) return Status::OK();
  if (previous_ == nullptr) {
    AccountZero(start, end);
    // Raw output: the target makes the range read as zeros (free on a fresh file).
    if (raw_) return image_.WriteZeroes(start, end - start);
    return Status::OK();
  }
  uint64_t pos = start;
  for (const ByteRange& range : considered_) {
    if (range.end() <= pos) continue;
    if (range.offset >= end) break;
    if (range.offset > pos) AccountUnchanged(pos, range.offset);
    pos = std::max(pos, range.offset);
    const uint64_t stop = std::min(end, range.end());
    ZQ_RETURN_IF_ERROR(ZeroOverChain(pos, stop));
    pos = stop;
  }
  AccountUnchanged(pos, end);
  return Status::OK();
}

Status Pipeline::ZeroOverChain(uint64_t start, uint64_t end) {
  if (end <= start) return Status::OK();
  AccountZero(start, end);
  const uint64_t backed_end = std::min(end, previous_size_);
  if (start >= backed_end) return Status::OK();  // the chain reads zeros there too
  ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> extents, previous_->Map(start, backed_end - start));
  for (const MapExtent& extent : extents) {
    if (extent.kind != MapExtent::Kind::kData && extent.kind != MapExtent::Kind::kCompressed) {
      continue;  // unallocated or zero all the way down: reads as zeros already
    }
    // Whole clusters: [start, end) is cluster-aligned (or ends at the virtual size).
    const uint64_t zero_start = AlignDown(extent.guest_offset, cluster_size_);
    const uint64_t zero_end =
        std::min(AlignUp(extent.guest_offset + extent.length, cluster_size_), end);
    ZQ_RETURN_IF_ERROR(image_.WriteZeroes(zero_start, zero_end - zero_start));
  }
  return Status::OK();
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
    if (previous_ != nullptr) {
      // Only the considered ranges are read; the rest is skipped as unchanged.
      ZQ_ASSIGN_OR_RETURN(considered_, ConsideredRanges(window_start, window_end));
      ranges = Intersect(ranges, considered_);
    }
    size_t next_range = 0;
    uint64_t pos = window_start;  // always chunk-aligned (or window_end)
    while (pos < window_end) {
      if (stopped()) return Status::OK();  // another thread failed; its error is returned
      if (CancelRequested()) return InterruptedStatus();
      while (next_range < ranges.size() && ranges[next_range].end() <= pos) ++next_range;
      if (next_range == ranges.size()) {
        ZQ_RETURN_IF_ERROR(SkipUnread(pos, window_end));
        break;
      }
      const uint64_t data_chunk = AlignDown(std::max(ranges[next_range].offset, pos), chunk_bytes_);
      if (data_chunk > pos) {  // whole chunks without data: skip unread
        ZQ_RETURN_IF_ERROR(SkipUnread(pos, data_chunk));
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
        ZQ_RETURN_IF_ERROR(SkipUnread(cursor, run.offset));
        cursor = run.end();
      }
      ZQ_RETURN_IF_ERROR(SkipUnread(cursor, chunk_end));
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
  std::vector<RunTask> tasks;
  // Appends cluster `cluster_index` to the last run when it continues it, else starts a run.
  auto add = [&](uint32_t cluster_index) {
    if (!tasks.empty()) {
      RunTask& last = tasks.back();
      if (last.first_cluster + last.cluster_count == cluster_index &&
          last.cluster_count < run_clusters_) {
        ++last.cluster_count;
        return;
      }
    }
    tasks.push_back({chunk, cluster_index, 1, 0, workers_read_});
  };
  for (const ByteRange& run : pending.runs) {
    for (uint64_t offset = run.offset; offset < run.end() && offset < virtual_size;
         offset += cluster_size_) {
      const uint64_t in_chunk = offset - chunk->guest_offset;
      const auto cluster_index = static_cast<uint32_t>(in_chunk / cluster_size_);
      if (workers_read_ || previous_ != nullptr || raw_) {  // the worker classifies it
        add(cluster_index);
        continue;
      }
      // An all-zero cluster is left unallocated; it ends the run.
      if (!PadAndCheckZero(offset, chunk->buffer.data() + in_chunk)) add(cluster_index);
    }
  }
  if (tasks.empty()) {
    pool_.Release(chunk);
    return;
  }
  // The chunk's pending count is its number of tasks (runs), each releasing it once.
  chunk->pending_clusters.store(static_cast<uint32_t>(tasks.size()), std::memory_order_relaxed);
  for (RunTask& task : tasks) {
    task.sequence = next_sequence_++;
    queue_.Push(task);
  }
}

void Pipeline::WorkerMain(size_t worker) {
  WorkerState state;
  if (!shared_compressors_ && worker < compressors_.size()) {
    state.compressor = compressors_[worker].get();
  }
  if (compress_) state.compressed.resize(run_clusters_ * (cluster_size_ - 1));
  state.outcome.resize(run_clusters_);
  state.compressed_cluster.resize(run_clusters_);
  state.batch.reserve(run_clusters_);
  for (;;) {
    // A worker that does not read gets its compressor before its next run, so runs that
    // wait for a compressor do not hold read buffers the reader needs.
    if (!workers_read_) LeaseCompressor(state);
    std::optional<RunTask> task = queue_.Pop();
    if (!task) break;
    // Checked per run too (and per cluster inside it), not only by the reader and the
    // coordinator, so a cancel stops the conversion within a cluster or so even when
    // everything is already read.
    if (CancelRequested()) {
      ReleaseTask(task->chunk);
      Fail(InterruptedStatus());
      break;
    }
    Status status = ProcessRun(*task, state);
    if (!status.ok()) {
      Fail(std::move(status));
      break;
    }
  }
  ReturnCompressor(state);
  ThreadExited();
}

void Pipeline::LeaseCompressor(WorkerState& state) {
  if (!shared_compressors_ || state.compressor != nullptr) return;
  std::unique_lock lock(compressors_mutex_);
  compressor_returned_.wait(lock, [this] { return !free_compressors_.empty() || stopped(); });
  if (free_compressors_.empty()) return;  // stopped
  state.compressor = free_compressors_.back();
  free_compressors_.pop_back();
}

void Pipeline::ReturnCompressor(WorkerState& state) {
  if (!shared_compressors_ || state.compressor == nullptr) return;
  {
    std::lock_guard lock(compressors_mutex_);
    free_compressors_.push_back(std::exchange(state.compressor, nullptr));
  }
  compressor_returned_.notify_one();
}

Status Pipeline::ProcessRun(const RunTask& task, WorkerState& state) {
  Chunk* chunk = task.chunk;
  // Read before the chunk may be released (and reused for other guest data).
  const uint64_t run_offset = chunk->guest_offset + uint64_t{task.first_cluster} * cluster_size_;
  std::fill_n(state.outcome.begin(), task.cluster_count, ClusterOutcome::kStored);
  if (task.needs_read) {
    Status read = ReadRun(task, state);
    if (!read.ok()) {
      ReleaseTask(chunk);
      return read;
    }
  }
  if (raw_ && !task.needs_read) {  // the reader left zero detection to the worker
    for (uint32_t i = 0; i < task.cluster_count; ++i) {
      const uint64_t cluster = uint64_t{i} * cluster_size_;
      if (PadAndCheckZero(run_offset + cluster, chunk->buffer.data() +
                                                    uint64_t{task.first_cluster} * cluster_size_ +
                                                    cluster)) {
        state.outcome[i] = ClusterOutcome::kZero;
      }
    }
  }
  if (!options_.digest_ranges.empty()) DigestRanges(task, run_offset, state);
  if (previous_ != nullptr) {
    Status classified = ClassifyRun(task, run_offset, state);
    if (!classified.ok()) {
      ReleaseTask(chunk);
      return classified;
    }
  }

  // A cluster is stored as is (raw output: any, zeros too): its bytes must stay until written.
  bool source_needed = raw_;
  size_t used = 0;             // bytes of state.compressed filled
  // A shared compressor is held while the run is compressed (and, without reads of the
  // worker's own, while it waits for the run), never while it waits for its write.
  LeaseCompressor(state);
  if (compress_ && state.compressor == nullptr) {  // stopped while waiting for one
    ReleaseTask(chunk);
    return Status::OK();
  }
  for (uint32_t i = 0; i < task.cluster_count; ++i) {
    if (state.outcome[i] != ClusterOutcome::kStored) continue;
    const uint64_t in_chunk = uint64_t{task.first_cluster + i} * cluster_size_;
    std::span<const uint8_t> cluster(chunk->buffer.data() + in_chunk, cluster_size_);
    // A cluster written with data, as read (the last one padded): ConvertStats::content_digest.
    digest_.Add(digest::ClusterHash((chunk->guest_offset + in_chunk) / cluster_size_, cluster));
    if (!compress_) {
      source_needed = true;
      continue;
    }
    if (i > 0 && CancelRequested()) {
      ReleaseTask(chunk);
      return InterruptedStatus();
    }
    std::span<uint8_t> out(state.compressed.data() + used, cluster_size_ - 1);
    Result<size_t> size = state.compressor->Compress(cluster, out);
    if (!size.ok()) {
      ReleaseTask(chunk);
      return size.status().WithPrefix(options_.target_path + ": compressing guest offset " +
                                      std::to_string(chunk->guest_offset + in_chunk));
    }
    if (*size == 0) {  // did not fit below one cluster: stored as is
      source_needed = true;
      continue;
    }
    state.outcome[i] = ClusterOutcome::kCompressed;
    state.compressed_cluster[i] = out.first(*size);
    used += *size;
  }
  ReturnCompressor(state);
  if (!source_needed) ReleaseTask(chunk);  // the source bytes are no longer needed

  if (!BeginWrite(task.sequence)) {  // stopped
    if (source_needed) ReleaseTask(chunk);
    return Status::OK();
  }
  // Once more before writing: a run is many clusters, and a cancel that came while it was
  // compressed (or waited for its turn) should not write them all.
  Status status = CancelRequested() ? InterruptedStatus()
                  : raw_              ? WriteRawRun(task, run_offset, state)
                                      : WriteRun(task, run_offset, state);
  EndWrite();
  if (source_needed) ReleaseTask(chunk);
  return status;
}

Status Pipeline::ReadRun(const RunTask& task, WorkerState& state) {
  const uint64_t in_chunk = uint64_t{task.first_cluster} * cluster_size_;
  const uint64_t guest_offset = task.chunk->guest_offset + in_chunk;
  const uint64_t length = uint64_t{task.cluster_count} * cluster_size_;
  uint8_t* data = task.chunk->buffer.data() + in_chunk;
  const io::IoRequest request{guest_offset, data, length};
  ZQ_RETURN_IF_ERROR(source_.Read({&request, 1}));
  if (guest_offset < source_.size()) {
    bytes_read_.fetch_add(std::min(length, source_.size() - guest_offset),
                          std::memory_order_relaxed);
  }
  for (uint32_t i = 0; previous_ == nullptr && i < task.cluster_count; ++i) {
    const uint64_t cluster = uint64_t{i} * cluster_size_;
    if (PadAndCheckZero(guest_offset + cluster, data + cluster)) {
      state.outcome[i] = ClusterOutcome::kZero;
    }
  }
  return Status::OK();
}

Status Pipeline::ClassifyRun(const RunTask& task, uint64_t run_offset, WorkerState& state) {
  uint8_t* data = task.chunk->buffer.data() + uint64_t{task.first_cluster} * cluster_size_;
  const bool compare = !options_.dirty_bitmap;
  if (compare) {
    // What the backing chain reads for the whole run, with one read (zeros beyond its end).
    const uint64_t length = uint64_t{task.cluster_count} * cluster_size_;
    state.chain.resize(length);
    const uint64_t backed =
        run_offset >= previous_size_ ? 0 : std::min(length, previous_size_ - run_offset);
    if (backed > 0) {
      ZQ_RETURN_IF_ERROR(previous_->Read(run_offset, {state.chain.data(), backed}));
    }
    std::memset(state.chain.data() + backed, 0, length - backed);
  }
  for (uint32_t i = 0; i < task.cluster_count; ++i) {
    const uint64_t guest_offset = run_offset + uint64_t{i} * cluster_size_;
    uint8_t* cluster = data + uint64_t{i} * cluster_size_;
    const uint64_t valid = ValidBytes(guest_offset);
    if (valid < cluster_size_) std::memset(cluster + valid, 0, cluster_size_ - valid);
    const bool zero = IsAllZero({cluster, valid});
    if (!compare) {
      // Dirty: written whatever the chain holds; zeros as a zero cluster (cheap, and it
      // hides whatever the chain has there).
      state.outcome[i] = zero ? ClusterOutcome::kZeroFlag : ClusterOutcome::kStored;
      continue;
    }
    const uint8_t* chain = state.chain.data() + uint64_t{i} * cluster_size_;
    if (zero) {
      if (IsAllZero({chain, valid})) {
        AccountZero(guest_offset, guest_offset + valid);
        state.outcome[i] = ClusterOutcome::kZero;
      } else {
        state.outcome[i] = ClusterOutcome::kZeroFlag;
      }
    } else if (std::memcmp(cluster, chain, valid) == 0) {
      AccountUnchanged(guest_offset, guest_offset + valid);
      state.outcome[i] = ClusterOutcome::kUnchanged;
    } else {
      state.outcome[i] = ClusterOutcome::kStored;
    }
  }
  return Status::OK();
}

bool Pipeline::PadAndCheckZero(uint64_t guest_offset, uint8_t* data) {
  const uint64_t valid = ValidBytes(guest_offset);
  if (valid < cluster_size_) std::memset(data + valid, 0, cluster_size_ - valid);
  if (!IsAllZero({data, valid})) return false;
  AccountZero(guest_offset, guest_offset + valid);
  return true;
}

Status Pipeline::WriteRun(const RunTask& task, uint64_t run_offset, WorkerState& state) {
  const Chunk* chunk = task.chunk;
  state.batch.clear();
  for (uint32_t i = 0; i < task.cluster_count; ++i) {
    const uint64_t guest_offset = run_offset + uint64_t{i} * cluster_size_;
    switch (state.outcome[i]) {
      case ClusterOutcome::kZero:
      case ClusterOutcome::kUnchanged:
        break;
      case ClusterOutcome::kZeroFlag: {
        const uint64_t valid = ValidBytes(guest_offset);
        ZQ_RETURN_IF_ERROR(image_.WriteZeroes(guest_offset, valid));
        zero_bytes_skipped_.fetch_add(valid, std::memory_order_relaxed);
        clusters_zero_.fetch_add(1, std::memory_order_relaxed);
        bytes_done_.fetch_add(valid, std::memory_order_relaxed);
        break;
      }
      case ClusterOutcome::kCompressed:
        state.batch.push_back({guest_offset, state.compressed_cluster[i]});
        break;
      case ClusterOutcome::kStored: {
        // In order: the compressed clusters before this one go first.
        if (!options_.out_of_order) ZQ_RETURN_IF_ERROR(FlushCompressedBatch(state));
        const uint64_t valid = ValidBytes(guest_offset);
        const uint64_t in_chunk = uint64_t{task.first_cluster + i} * cluster_size_;
        ZQ_RETURN_IF_ERROR(image_.Write(guest_offset, {chunk->buffer.data() + in_chunk, valid}));
        clusters_uncompressed_.fetch_add(1, std::memory_order_relaxed);
        bytes_done_.fetch_add(valid, std::memory_order_relaxed);
        break;
      }
    }
  }
  return FlushCompressedBatch(state);
}

Status Pipeline::FlushCompressedBatch(WorkerState& state) {
  if (state.batch.empty()) return Status::OK();
  ZQ_RETURN_IF_ERROR(image_.WriteCompressedBatch(state.batch));
  uint64_t bytes = 0;
  uint64_t guest_bytes = 0;
  for (const CompressedCluster& cluster : state.batch) {
    bytes += cluster.data.size();
    guest_bytes += ValidBytes(cluster.guest_offset);
  }
  clusters_compressed_.fetch_add(state.batch.size(), std::memory_order_relaxed);
  compressed_bytes_.fetch_add(bytes, std::memory_order_relaxed);
  bytes_done_.fetch_add(guest_bytes, std::memory_order_relaxed);
  state.batch.clear();
  return Status::OK();
}

Status Pipeline::WriteRawRun(const RunTask& task, uint64_t run_offset, WorkerState& state) {
  const uint8_t* base = task.chunk->buffer.data() + uint64_t{task.first_cluster} * cluster_size_;
  const uint64_t run_end =
      std::min(run_offset + uint64_t{task.cluster_count} * cluster_size_, options_.virtual_size);
  const uint64_t sparse = options_.sparse_size;
  const uint64_t step = std::max<uint64_t>(1, options_.sparse_step);
  // Pending stretch [start, pos): data (written) or zeros (zeroed when long enough).
  uint64_t start = run_offset;
  bool zero = false;
  auto emit = [&](uint64_t end) -> Status {
    if (end <= start) return Status::OK();
    if (zero && sparse > 0 && end - start >= sparse) {
      return image_.WriteZeroes(start, end - start);
    }
    return image_.Write(start, {base + (start - run_offset), end - start});
  };
  for (uint32_t i = 0; i < task.cluster_count; ++i) {
    const uint64_t offset = run_offset + uint64_t{i} * cluster_size_;
    const uint64_t end = std::min(offset + cluster_size_, run_end);
    if (offset >= end) break;
    const bool stored = state.outcome[i] == ClusterOutcome::kStored;
    if (stored) {
      clusters_uncompressed_.fetch_add(1, std::memory_order_relaxed);
      bytes_done_.fetch_add(end - offset, std::memory_order_relaxed);
    }
    for (uint64_t pos = offset; pos < end; pos += step) {
      const uint64_t block_end = std::min(pos + step, end);
      // Zero clusters are zeros whole; -S 0 looks for nothing inside data.
      const bool block_zero =
          !stored || (sparse > 0 && IsAllZero({base + (pos - run_offset), block_end - pos}));
      if (block_zero != zero) {
        ZQ_RETURN_IF_ERROR(emit(pos));
        start = pos;
        zero = block_zero;
      }
    }
  }
  return emit(run_end);
}

void Pipeline::DigestRanges(const RunTask& task, uint64_t run_offset, const WorkerState& state) {
  const std::vector<ByteRange>& ranges = options_.digest_ranges;
  const uint8_t* base = task.chunk->buffer.data() + uint64_t{task.first_cluster} * cluster_size_;
  for (uint32_t i = 0; i < task.cluster_count; ++i) {
    const uint64_t offset = run_offset + uint64_t{i} * cluster_size_;
    auto after = std::upper_bound(ranges.begin(), ranges.end(), offset,
                                  [](uint64_t value, const ByteRange& range) {
                                    return value < range.offset;
                                  });
    if (after == ranges.begin() || std::prev(after)->end() <= offset) continue;
    const uint64_t index = offset / cluster_size_;
    ranges_digest_.Add(state.outcome[i] == ClusterOutcome::kZero
                           ? digest::ZeroClusterHash(index, static_cast<uint32_t>(cluster_size_))
                           : digest::ClusterHash(index, {base + uint64_t{i} * cluster_size_,
                                                         cluster_size_}));
  }
}

void Pipeline::ReleaseTask(Chunk* chunk) {
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
  threads.reserve(1 + workers_);
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
  for (size_t worker = 0; worker < workers_ && !stopped(); ++worker) {
    start([this, worker] { WorkerMain(worker); });
  }

  {
    using Clock = std::chrono::steady_clock;
    const auto checkpoint_every = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(options_.checkpoint_seconds));
    const bool checkpoints = options_.checkpoint_seconds > 0;
    const auto tick = checkpoints ? std::min<Clock::duration>(kProgressInterval, checkpoint_every)
                                  : kProgressInterval;
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
  totals->clusters_unchanged = clusters_unchanged_.load();
  totals->content_digest = digest_.value();
  totals->ranges_digest = ranges_digest_.value();

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
