// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The compressed write cache (see compressed_write_cache.h for the contract).
//
// Internals. The cache works in *units*: a unit is one host cluster, or, when the file's
// alignment is larger than the cluster, one aligned block holding several clusters (a
// direct write can never be smaller than a block). Each unit has one entry in `units_`
// (ordered by offset, for the admission rule) with a buffer of unit size and one fill record
// per cluster. All bookkeeping and every copy into or out of a buffer happen under `mutex_`;
// file I/O never does. While a unit is being written (`writing`), its buffer is only read:
// writers and SetClusterEnd for that unit wait, Read still copies from it, Discard waits.
// Nobody but the thread that set `writing` may erase or change the entry.
//
// A finished unit is `ready`: queued in `ready_` (by offset) until a batch takes it. The
// writer thread takes the lowest ready units, up to kMaxBatchBytes, marks them writing and
// writes each run of back-to-back units with one write (copied into a join buffer); while
// it writes, more units finish, so batches grow with the load by themselves. A ready unit that
// changes (a block of several clusters whose next cluster receives a piece, or a Discard) stops
// being ready until it finishes again.

#include "qcow2/compressed_write_cache.h"

#include <algorithm>
#include <cassert>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "io/aligned_buffer.h"
#include "qcow2/cluster_io.h"

namespace zqcow::qcow2 {

namespace {

constexpr uint32_t kMinClusterSize = 512;
constexpr uint32_t kMaxClusterSize = 2U << 20;
// Most bytes of finished units one batch writes (at least one unit).
constexpr size_t kMaxBatchBytes = size_t{2} << 20;
// Join buffers (kMaxBatchBytes each) that may exist at once.
constexpr size_t kMaxJoinBuffers = 2;

// Receipt of one host cluster's compressed bytes.
struct ClusterFill {
  uint32_t received = 0;  // bytes received (pieces never overlap)
  uint32_t data_end = 0;  // cluster size unless SetClusterEnd said less
  uint32_t high_end = 0;  // end of the highest piece received, relative to the cluster
  bool end_set = false;   // SetClusterEnd was called

  // The cache owns this cluster: it received bytes or was told where its data ends.
  bool touched() const { return received > 0 || end_set; }
  bool finished() const { return received == data_end; }
};

struct Unit {
  io::AlignedBuffer buffer;  // unit size, zero filled; allocated with the first piece
  std::vector<ClusterFill> fills;
  bool writing = false;  // a write of this unit is in flight (see the file comment)
  bool ready = false;    // finished and queued in ready_ for a batch write
  bool dirty = false;    // holds bytes that no write of this unit has covered yet
};

// What one write of a unit does, decided under the lock.
struct WritePlan {
  uint64_t offset = 0;
  size_t length = 0;
  // Set when the unit is one block of several clusters and some were never touched: their
  // bytes must be kept, so the block is read first and only touched clusters are replaced.
  bool read_first = false;
  std::vector<bool> touched;
};

class CompressedWriteCacheImpl final : public CompressedWriteCache {
 public:
  CompressedWriteCacheImpl(io::File* file, uint32_t cluster_size, const Options& options)
      : file_(file),
        cluster_size_(cluster_size),
        options_(options),
        alignment_(std::max<size_t>(file->alignment(), 1)),
        unit_size_(static_cast<uint32_t>(std::max<size_t>(cluster_size, alignment_))),
        clusters_per_unit_(unit_size_ / cluster_size) {
    if (options_.max_clusters == 0) options_.max_clusters = 1;
  }

  ~CompressedWriteCacheImpl() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    work_.notify_all();
    if (writer_.joinable()) writer_.join();
    std::lock_guard lock(mutex_);
    for ([[maybe_unused]] const auto& [offset, unit] : units_) assert(!unit->writing);
  }

  Status Write(uint64_t host_offset, std::span<const uint8_t> data) override {
    if (!options_.enabled) return WriteUncached(host_offset, data);
    if (data.empty()) return error();
    size_t done = 0;
    while (done < data.size()) {
      const uint64_t offset = host_offset + done;
      const uint64_t cluster_end = io::AlignDown(offset, cluster_size_) + cluster_size_;
      const size_t length =
          static_cast<size_t>(std::min<uint64_t>(data.size() - done, cluster_end - offset));
      ZQ_RETURN_IF_ERROR(WritePiece(offset, data.subspan(done, length)));
      done += length;
    }
    return Status::OK();
  }

  Status Rewrite(uint64_t host_cluster_offset, std::span<const uint8_t> cluster) override {
    if (host_cluster_offset % cluster_size_ != 0 || cluster.size() != cluster_size_) {
      assert(!"Rewrite: not one whole host cluster");
      return Status::InvalidArgument(file_->path() + ": rewrite of " +
                                     std::to_string(cluster.size()) + " bytes at host offset " +
                                     Hex(host_cluster_offset) + " is not one whole cluster");
    }
    if (!options_.enabled) return WriteUncached(host_cluster_offset, cluster);
    return WritePiece(host_cluster_offset, cluster, /*replace=*/true);
  }

  Status SetClusterEnd(uint64_t host_cluster_offset, uint32_t data_end) override {
    if (host_cluster_offset % cluster_size_ != 0 || data_end == 0 || data_end > cluster_size_) {
      assert(!"SetClusterEnd: unaligned cluster or data end out of range");
      return Status::InvalidArgument(file_->path() + ": cluster end " + std::to_string(data_end) +
                                     " for host cluster " + Hex(host_cluster_offset) +
                                     " is out of range");
    }
    std::unique_lock lock(mutex_);
    if (!options_.enabled) return error_;
    const uint64_t unit_offset = io::AlignDown(host_cluster_offset, unit_size_);
    Unit* unit = nullptr;
    for (;;) {
      if (!error_.ok()) return error_;
      auto it = units_.find(unit_offset);
      if (it == units_.end()) break;
      if (it->second->writing) {
        changed_.wait(lock);
        continue;
      }
      unit = it->second.get();
      break;
    }
    if (unit == nullptr) {
      // Nothing cached: a full data end is the default, nothing to remember.
      if (data_end == cluster_size_) return Status::OK();
      // Never waits for room (the allocator may call this under its own lock).
      unit = InsertUnit(unit_offset, io::AlignedBuffer());
    }
    ClusterFill& fill = unit->fills[ClusterIndex(host_cluster_offset)];
    if (fill.high_end > data_end) {
      assert(!"SetClusterEnd below bytes already received");
      return Status::InvalidArgument(file_->path() + ": cluster end " + std::to_string(data_end) +
                                     " for host cluster " + Hex(host_cluster_offset) +
                                     " lies below compressed data already written (" +
                                     std::to_string(fill.high_end) + ")");
    }
    fill.data_end = data_end;
    fill.end_set = true;
    return UnitChanged(lock, unit_offset, unit);
  }

  Status Flush() override {
    std::unique_lock lock(mutex_);
    if (!options_.enabled || !error_.ok()) return error_;
    // Every unit cached now: unfinished ones are written up to their received end; finished
    // ones are in flight (their writer started them) and are waited for.
    std::vector<uint64_t> offsets;
    offsets.reserve(units_.size());
    for (const auto& [offset, unit] : units_) offsets.push_back(offset);
    for (uint64_t unit_offset : offsets) {
      for (;;) {
        if (!error_.ok()) return error_;
        auto it = units_.find(unit_offset);
        if (it == units_.end()) break;
        Unit* unit = it->second.get();
        if (unit->ready) {
          WriteReadyBatch(lock);  // rather than wait for the writer thread
          continue;
        }
        if (unit->writing) {
          changed_.wait(lock);
          continue;
        }
        if (unit->dirty && unit->buffer.size() != 0) {
          const WritePlan plan = PlanWrite(unit_offset, *unit);
          unit->writing = true;
          lock.unlock();
          const Status status = WriteUnit(plan, *unit);
          lock.lock();
          unit->writing = false;
          if (status.ok()) {
            unit->dirty = false;
            ++stats_.clusters_written_partial;
          } else if (error_.ok()) {
            error_ = status;
          }
          changed_.notify_all();
        }
        break;
      }
    }
    return error_;
  }

  Status Read(uint64_t host_offset, std::span<uint8_t> out) override {
    if (!options_.enabled) {
      ZQ_RETURN_IF_ERROR(error());
      return ReadFile(host_offset, out);
    }
    // Clusters the cache does not hold are read from the file, in contiguous runs.
    size_t file_run_start = 0;
    size_t file_run_length = 0;
    size_t done = 0;
    while (done < out.size()) {
      const uint64_t offset = host_offset + done;
      const uint64_t cluster_end = io::AlignDown(offset, cluster_size_) + cluster_size_;
      const size_t length =
          static_cast<size_t>(std::min<uint64_t>(out.size() - done, cluster_end - offset));
      bool from_cache = false;
      {
        std::lock_guard lock(mutex_);
        if (!error_.ok()) return error_;
        const uint64_t unit_offset = io::AlignDown(offset, unit_size_);
        auto it = units_.find(unit_offset);
        if (it != units_.end() && it->second->fills[ClusterIndex(offset)].touched()) {
          from_cache = true;
          const io::AlignedBuffer& buffer = it->second->buffer;
          if (buffer.size() == 0) {
            std::memset(out.data() + done, 0, length);
          } else {
            std::memcpy(out.data() + done, buffer.data() + (offset - unit_offset), length);
          }
        }
      }
      if (from_cache) {
        if (file_run_length != 0) {
          ZQ_RETURN_IF_ERROR(
              ReadFile(host_offset + file_run_start, out.subspan(file_run_start, file_run_length)));
          file_run_length = 0;
        }
      } else {
        if (file_run_length == 0) file_run_start = done;
        file_run_length += length;
      }
      done += length;
    }
    if (file_run_length != 0) {
      ZQ_RETURN_IF_ERROR(
          ReadFile(host_offset + file_run_start, out.subspan(file_run_start, file_run_length)));
    }
    return Status::OK();
  }

  void Discard(uint64_t host_cluster_offset) override {
    if (!options_.enabled) return;
    const uint64_t unit_offset = io::AlignDown(host_cluster_offset, unit_size_);
    std::unique_lock lock(mutex_);
    for (;;) {
      auto it = units_.find(unit_offset);
      if (it == units_.end()) return;
      Unit& unit = *it->second;
      if (unit.writing) {
        changed_.wait(lock);
        continue;
      }
      if (unit.ready) {
        ready_.erase(unit_offset);
        unit.ready = false;
      }
      unit.fills[ClusterIndex(host_cluster_offset)] = EmptyFill();
      if (unit.buffer.size() != 0) {
        std::memset(
            unit.buffer.data() + (io::AlignDown(host_cluster_offset, cluster_size_) - unit_offset),
            0, cluster_size_);
      }
      if (std::none_of(unit.fills.begin(), unit.fills.end(),
                       [](const ClusterFill& fill) { return fill.touched(); })) {
        std::unique_ptr<Unit> doomed = std::move(it->second);
        units_.erase(it);
        changed_.notify_all();
        lock.unlock();
        ReturnUnitBuffer(std::move(doomed->buffer));
        return;  // `doomed` freed outside the lock
      }
      // A block of several clusters whose other clusters are all complete: write it.
      (void)UnitChanged(lock, unit_offset, &unit);
      return;
    }
  }

  bool enabled() const override { return options_.enabled; }

  Status error() const override {
    std::lock_guard lock(mutex_);
    return error_;
  }

  Stats stats() const override {
    std::lock_guard lock(mutex_);
    return stats_;
  }

 private:
  uint32_t ClusterIndex(uint64_t offset) const {
    return static_cast<uint32_t>((offset % unit_size_) / cluster_size_);
  }

  ClusterFill EmptyFill() const {
    ClusterFill fill;
    fill.data_end = cluster_size_;
    return fill;
  }

  static bool UnitFinished(const Unit& unit) {
    bool any_touched = false;
    for (const ClusterFill& fill : unit.fills) {
      if (!fill.touched()) continue;
      if (!fill.finished()) return false;
      any_touched = true;
    }
    return any_touched;
  }

  // REQUIRES: mutex_ held. The oldest allocation can always finish: a unit below every
  // cached unit is admitted even when the cache is full.
  bool Admissible(uint64_t unit_offset, bool whole_unit) const {
    if (units_.size() < options_.max_clusters || units_.empty() ||
        unit_offset < units_.begin()->first) {
      return true;
    }
    // A piece that finishes its unit on arrival (a whole normal cluster) only has to wait
    // for finished units to drain, which the writer thread (or a waiting writer) does
    // whatever else happens. Waiting for the unfinished ones could take forever: the
    // allocator's open compressed cluster finishes only with a later compressed piece, and
    // that may come after this write (with a cache of one cluster, two workers storing
    // incompressible clusters deadlocked that way).
    if (!whole_unit) return false;
    size_t finished = 0;
    for (const auto& [offset, unit] : units_) finished += unit->ready || unit->writing;
    return finished < options_.max_clusters;
  }

  // REQUIRES: mutex_ held, no entry at unit_offset.
  Unit* InsertUnit(uint64_t unit_offset, io::AlignedBuffer buffer) {
    auto unit = std::make_unique<Unit>();
    unit->buffer = std::move(buffer);
    unit->fills.assign(clusters_per_unit_, EmptyFill());
    Unit* raw = unit.get();
    units_.emplace(unit_offset, std::move(unit));
    stats_.peak_clusters = std::max<uint64_t>(stats_.peak_clusters, units_.size());
    return raw;
  }

  // One piece: REQUIRES it lies within one host cluster. `replace` (a whole cluster):
  // whatever the cluster held is overwritten; the old bytes stay cached until then.
  Status WritePiece(uint64_t offset, std::span<const uint8_t> piece, bool replace = false) {
    const uint64_t unit_offset = io::AlignDown(offset, unit_size_);
    const uint32_t in_unit = static_cast<uint32_t>(offset - unit_offset);
    const uint32_t in_cluster = static_cast<uint32_t>(offset % cluster_size_);
    const uint32_t length = static_cast<uint32_t>(piece.size());
    io::AlignedBuffer spare;  // taken outside the lock when the unit needs a buffer
    // Declared before `lock`, so it runs after the lock is released: an unused spare goes
    // back to the recycled buffers.
    struct SpareReturn {
      CompressedWriteCacheImpl* cache;
      io::AlignedBuffer* spare;
      ~SpareReturn() {
        if (spare->size() != 0) cache->ReturnUnitBuffer(std::move(*spare));
      }
    } spare_return{this, &spare};
    std::unique_lock lock(mutex_);
    ++stats_.pieces;
    bool counted_wait = false;
    Unit* unit = nullptr;
    for (;;) {
      if (!error_.ok()) return error_;
      auto it = units_.find(unit_offset);
      const bool cached = it != units_.end();
      if (cached && it->second->writing) {
        changed_.wait(lock);
        continue;
      }
      if (!cached &&
          !Admissible(unit_offset, /*whole_unit=*/in_unit == 0 && length == unit_size_)) {
        if (!ready_.empty()) {
          WriteReadyBatch(lock);  // make room by writing finished clusters ourselves
          continue;
        }
        if (!counted_wait) {
          ++stats_.waits;
          counted_wait = true;
        }
        changed_.wait(lock);
        continue;
      }
      if ((!cached || it->second->buffer.size() == 0) && spare.size() == 0) {
        lock.unlock();
        spare = TakeUnitBuffer();
        lock.lock();
        continue;  // the world may have changed meanwhile
      }
      if (!cached) {
        unit = InsertUnit(unit_offset, std::move(spare));
      } else {
        unit = it->second.get();
        if (unit->buffer.size() == 0) unit->buffer = std::move(spare);
      }
      break;
    }
    ClusterFill& fill = unit->fills[ClusterIndex(offset)];
    // Under the same lock as the copy below: no reader or flush sees the cluster without
    // its old or its new bytes.
    if (replace) fill = EmptyFill();
    if (in_cluster + length > fill.data_end || fill.received + length > fill.data_end) {
      assert(!"compressed piece beyond the cluster's data end, or overlapping");
      return Status::InvalidArgument(
          file_->path() + ": compressed data of " + std::to_string(length) +
          " bytes at host offset " + Hex(offset) + " lies beyond the cluster's data end " +
          std::to_string(fill.data_end) + " or overlaps data already written");
    }
    std::memcpy(unit->buffer.data() + in_unit, piece.data(), length);
    fill.received += length;
    fill.high_end = std::max(fill.high_end, in_cluster + length);
    unit->dirty = true;
    return UnitChanged(lock, unit_offset, unit);
  }

  // REQUIRES: mutex_ held through `lock` (held again on return); *unit changed and is not
  // being written. Queues it when it became finished (and, without a writer thread, writes
  // it at once: nothing else is ever queued then); takes it out of the queue when it is no
  // longer finished. Returns the sticky error.
  Status UnitChanged(std::unique_lock<std::mutex>& lock, uint64_t unit_offset, Unit* unit) {
    const bool finished = UnitFinished(*unit);
    if (unit->ready && !finished) {
      ready_.erase(unit_offset);
      unit->ready = false;
    } else if (!unit->ready && finished) {
      unit->ready = true;
      ready_.insert(unit_offset);
      if (HaveWriterThread()) {
        work_.notify_one();
      } else {
        WriteReadyBatch(lock);
      }
    }
    return error_;
  }

  // REQUIRES: mutex_ held. Starts the writer thread with the first finished cluster (an
  // image that is only read never has one). False when there is none: the option is off,
  // or no thread could be started (then finishing callers write their clusters).
  bool HaveWriterThread() {
    if (!writer_.joinable() && options_.background_writer && !writer_failed_) {
      try {
        writer_ = std::thread([this] { WriterMain(); });
      } catch (const std::system_error&) {
        writer_failed_ = true;
      }
    }
    return writer_.joinable();
  }

  void WriterMain() {
    std::unique_lock lock(mutex_);
    for (;;) {
      work_.wait(lock, [this] { return stopping_ || !ready_.empty(); });
      if (stopping_) return;
      WriteReadyBatch(lock);
    }
  }

  // REQUIRES: mutex_ held through `lock` (held again on return), ready_ not empty.
  // Takes the lowest ready units (up to kMaxBatchBytes), writes them with one batch outside
  // the lock, drops them and wakes waiters. After a sticky error they are dropped unwritten:
  // the image is failed anyway.
  void WriteReadyBatch(std::unique_lock<std::mutex>& lock) {
    struct Item {
      uint64_t offset;
      Unit* unit;
      WritePlan plan;
    };
    std::vector<Item> items;
    size_t bytes = 0;
    while (!ready_.empty() && (items.empty() || bytes + unit_size_ <= kMaxBatchBytes)) {
      const uint64_t unit_offset = *ready_.begin();
      ready_.erase(ready_.begin());
      Unit* unit = units_.at(unit_offset).get();
      assert(unit->ready && !unit->writing);
      unit->ready = false;
      unit->writing = true;
      items.push_back({unit_offset, unit, PlanWrite(unit_offset, *unit)});
      bytes += unit_size_;
    }
    const bool write = error_.ok();
    lock.unlock();
    Status status;
    if (write) {
      // Units back to back go out as one write (copied together), so the file system sees
      // one large request instead of several racing for the same inode lock.
      size_t i = 0;
      while (status.ok() && i < items.size()) {
        const Item& first = items[i];
        size_t end = i + 1;
        while (!first.plan.read_first && end < items.size() && !items[end].plan.read_first &&
               items[end - 1].plan.length == unit_size_ &&
               items[end].offset == items[end - 1].offset + unit_size_) {
          ++end;
        }
        io::AlignedBuffer joined;
        if (end - i > 1) {
          joined = TakeJoinBuffer();
          // Every join buffer is in use by another writer: write the units one by one.
          if (joined.data() == nullptr) end = i + 1;
        }
        if (end - i == 1) {
          status = WriteUnit(first.plan, *first.unit);
        } else {
          size_t length = 0;
          for (size_t k = i; k < end; ++k) {
            std::memcpy(joined.data() + length, items[k].unit->buffer.data(), items[k].plan.length);
            length += items[k].plan.length;
          }
          status = file_->WriteAt(first.offset, joined.data(), length);
          ReturnJoinBuffer(std::move(joined));
          if (status.ok() && options_.drop_page_cache) {
            (void)file_->DropCache(first.offset, length);  // a hint only
          }
        }
        i = end;
      }
    }
    std::vector<std::unique_ptr<Unit>> doomed;
    doomed.reserve(items.size());
    lock.lock();
    if (!status.ok() && error_.ok()) error_ = status;
    if (write && status.ok()) {
      stats_.clusters_written_whole += items.size();
      ++stats_.write_batches;
    }
    for (const Item& item : items) {
      auto it = units_.find(item.offset);
      assert(it != units_.end() && it->second.get() == item.unit);
      doomed.push_back(std::move(it->second));
      units_.erase(it);
    }
    changed_.notify_all();
    lock.unlock();
    for (auto& unit : doomed) ReturnUnitBuffer(std::move(unit->buffer));
    doomed.clear();  // freed outside the lock
    lock.lock();
  }

  // A zero-filled buffer for a unit: a recycled one when there is one. Units come and go
  // thousands of times per second from several threads; recycling their buffers keeps the
  // allocator from spreading them over its arenas and the kernel from faulting in and
  // zeroing fresh pages for each.
  io::AlignedBuffer TakeUnitBuffer() {
    io::AlignedBuffer buffer;
    {
      std::lock_guard lock(unit_buffers_mutex_);
      if (!unit_buffers_.empty()) {
        buffer = std::move(unit_buffers_.back());
        unit_buffers_.pop_back();
      }
    }
    if (buffer.size() == 0) {
      return io::AlignedBuffer(unit_size_, std::max(alignment_, io::kBufferAlignment));
    }
    std::memset(buffer.data(), 0, buffer.size());
    return buffer;
  }
  // Keeps at most as many buffers as the cache may hold units; frees the rest.
  void ReturnUnitBuffer(io::AlignedBuffer buffer) {
    if (buffer.size() == 0) return;
    {
      std::lock_guard lock(unit_buffers_mutex_);
      if (unit_buffers_.size() < options_.max_clusters) {
        unit_buffers_.push_back(std::move(buffer));
        return;
      }
    }
    // `buffer` is freed here, outside the lock.
  }

  // A buffer for joining units (kMaxBatchBytes), reused between batches; an empty one when
  // kMaxJoinBuffers exist and all are in use (memory stays bounded however many threads
  // write: the writer thread and every writer that finds the cache full).
  io::AlignedBuffer TakeJoinBuffer() {
    {
      std::lock_guard lock(join_buffers_mutex_);
      if (!join_buffers_.empty()) {
        io::AlignedBuffer buffer = std::move(join_buffers_.back());
        join_buffers_.pop_back();
        return buffer;
      }
      if (join_buffers_created_ == kMaxJoinBuffers) return io::AlignedBuffer();
      ++join_buffers_created_;
    }
    try {
      return io::AlignedBuffer(kMaxBatchBytes, std::max(alignment_, io::kBufferAlignment));
    } catch (const std::bad_alloc&) {
      std::lock_guard lock(join_buffers_mutex_);
      --join_buffers_created_;  // the slot was not used
      return io::AlignedBuffer();
    }
  }
  void ReturnJoinBuffer(io::AlignedBuffer buffer) {
    std::lock_guard lock(join_buffers_mutex_);
    join_buffers_.push_back(std::move(buffer));
  }

  // REQUIRES: mutex_ held; the unit holds received bytes.
  WritePlan PlanWrite(uint64_t unit_offset, const Unit& unit) const {
    WritePlan plan;
    plan.offset = unit_offset;
    if (clusters_per_unit_ == 1) {
      // Finished: high_end == data_end. Unfinished: everything received so far.
      plan.length = static_cast<size_t>(
          std::min<uint64_t>(io::AlignUp(unit.fills[0].high_end, alignment_), unit_size_));
      return plan;
    }
    plan.length = unit_size_;  // one aligned block
    plan.touched.resize(clusters_per_unit_);
    for (uint32_t i = 0; i < clusters_per_unit_; ++i) {
      plan.touched[i] = unit.fills[i].touched();
      if (!plan.touched[i]) plan.read_first = true;
    }
    return plan;
  }

  // Called without the lock; `unit` is marked writing, so its buffer does not change.
  Status WriteUnit(const WritePlan& plan, const Unit& unit) {
    Status status;
    if (!plan.read_first) {
      status = file_->WriteAt(plan.offset, unit.buffer.data(), plan.length);
    } else {
      io::AlignedBuffer block(plan.length, std::max(alignment_, io::kBufferAlignment));
      Result<size_t> read = file_->ReadAt(plan.offset, block.data(), plan.length);
      if (!read.ok()) return read.status();
      for (uint32_t i = 0; i < clusters_per_unit_; ++i) {
        if (!plan.touched[i]) continue;
        std::memcpy(block.data() + static_cast<size_t>(i) * cluster_size_,
                    unit.buffer.data() + static_cast<size_t>(i) * cluster_size_, cluster_size_);
      }
      status = file_->WriteAt(plan.offset, block.data(), plan.length);
    }
    if (status.ok() && options_.drop_page_cache) {
      (void)file_->DropCache(plan.offset, plan.length);  // a hint only
    }
    return status;
  }

  // Disabled mode: the piece goes to the file at once.
  Status WriteUncached(uint64_t host_offset, std::span<const uint8_t> data) {
    {
      std::lock_guard lock(mutex_);
      if (!error_.ok() || data.empty()) return error_;
      const uint64_t first = host_offset / cluster_size_;
      const uint64_t last = (host_offset + data.size() - 1) / cluster_size_;
      stats_.pieces += last - first + 1;
    }
    Status status;
    if (!file_->direct_io()) {
      status = file_->WriteAt(host_offset, data.data(), data.size());
    } else {
      // Read-modify-write of the covering blocks; serialised, because two pieces may share
      // a block and the later write would otherwise undo the earlier one.
      const uint64_t start = io::AlignDown(host_offset, alignment_);
      const uint64_t end = io::AlignUp(host_offset + data.size(), alignment_);
      io::AlignedBuffer block(end - start, std::max(alignment_, io::kBufferAlignment));
      std::lock_guard rmw_lock(read_modify_write_mutex_);
      Result<size_t> read = file_->ReadAt(start, block.data(), block.size());
      if (read.ok()) {
        std::memcpy(block.data() + (host_offset - start), data.data(), data.size());
        status = file_->WriteAt(start, block.data(), block.size());
      } else {
        status = read.status();
      }
    }
    if (status.ok() && options_.drop_page_cache) {
      (void)file_->DropCache(host_offset, data.size());  // a hint only
    }
    if (!status.ok()) {
      std::lock_guard lock(mutex_);
      if (error_.ok()) error_ = status;
      return error_;
    }
    return Status::OK();
  }

  // Reads from the file; through an aligned bounce buffer when it is O_DIRECT.
  Status ReadFile(uint64_t host_offset, std::span<uint8_t> out) {
    return io::ReadAnyRange(*file_, host_offset, out);
  }

  io::File* const file_;
  const uint32_t cluster_size_;
  Options options_;
  const size_t alignment_;
  const uint32_t unit_size_;
  const uint32_t clusters_per_unit_;

  mutable std::mutex mutex_;
  // Signalled when a unit leaves the cache or a write of one ends (and on errors).
  std::condition_variable changed_;
  std::condition_variable work_;                     // ready_ got a unit, or stopping_
  std::map<uint64_t, std::unique_ptr<Unit>> units_;  // by unit offset
  std::set<uint64_t> ready_;                         // finished units waiting for a batch
  bool stopping_ = false;
  Status error_;  // sticky: the first failed write
  Stats stats_;

  std::mutex read_modify_write_mutex_;  // disabled mode on an O_DIRECT file
  std::mutex unit_buffers_mutex_;
  std::vector<io::AlignedBuffer> unit_buffers_;  // guarded by unit_buffers_mutex_; zeroed on take
  std::mutex join_buffers_mutex_;
  std::vector<io::AlignedBuffer> join_buffers_;  // guarded by join_buffers_mutex_
  size_t join_buffers_created_ = 0;              // guarded by join_buffers_mutex_
  std::thread writer_;          // the writer thread; guarded by mutex_ until joined
  bool writer_failed_ = false;  // guarded by mutex_
};

}  // namespace

std::unique_ptr<CompressedWriteCache> CompressedWriteCache::Create(io::File* file,
                                                                   uint32_t cluster_size,
                                                                   const Options& options) {
  assert(file != nullptr);
  assert(cluster_size >= kMinClusterSize && cluster_size <= kMaxClusterSize &&
         (cluster_size & (cluster_size - 1)) == 0);
  (void)kMinClusterSize;
  (void)kMaxClusterSize;
  return std::make_unique<CompressedWriteCacheImpl>(file, cluster_size, options);
}

}  // namespace zqcow::qcow2
