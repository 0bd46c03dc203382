// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// AssemblingStore: pieces, cluster ends, reads, flush, discard (see assembling_store.h).

#include "qcow2/assembling_store.h"

#include <algorithm>
#include <cassert>
#include <cstring>
#include <string>
#include <utility>

#include "qcow2/cluster_io.h"

namespace zqcow::qcow2 {

AssemblingStore::AssemblingStore(io::File* file, uint32_t cluster_size, const Options& options)
    : file_(file),
      cluster_size_(cluster_size),
      options_(options),
      alignment_(std::max<size_t>(file->alignment(), 1)) {
  assert(alignment_ <= cluster_size_);
  if (options_.max_clusters == 0) options_.max_clusters = 1;
}

AssemblingStore::~AssemblingStore() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  work_.notify_all();
  if (writer_.joinable()) writer_.join();
  std::lock_guard lock(mutex_);
  for ([[maybe_unused]] const auto& [offset, held] : clusters_) assert(!held->writing);
}

Status AssemblingStore::Write(uint64_t host_offset, std::span<const uint8_t> data) {
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

Status AssemblingStore::WriteBatch(std::span<const CompressedCluster> clusters,
                                   std::span<const format::HostOffset> hosts) {
  // Per-thread scratch for runs whose pieces are not adjacent in memory, and the pieces'
  // order by host offset.
  thread_local std::vector<uint8_t> staging;
  thread_local std::vector<size_t> order;
  // Each thread's pieces in host-offset order (the progress rule): a piece placed in a hole
  // lies below the pieces placed before it.
  order.resize(clusters.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  if (!std::is_sorted(hosts.begin(), hosts.end())) {
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return hosts[a] < hosts[b]; });
  }
  size_t first = 0;
  while (first < order.size()) {
    // The longest run [first, end) of the order whose pieces lie back to back in the file.
    const CompressedCluster& head = clusters[order[first]];
    const uint64_t run_start = hosts[order[first]].value();
    uint64_t run_end = run_start + head.data.size();
    bool adjacent_in_memory = true;
    size_t end = first + 1;
    for (; end < order.size() && hosts[order[end]].value() == run_end; ++end) {
      const std::span<const uint8_t>& previous = clusters[order[end - 1]].data;
      const std::span<const uint8_t>& next = clusters[order[end]].data;
      adjacent_in_memory = adjacent_in_memory && next.data() == previous.data() + previous.size();
      run_end += next.size();
    }
    std::span<const uint8_t> run(head.data.data(), run_end - run_start);
    if (!adjacent_in_memory) {
      staging.clear();
      for (size_t k = first; k < end; ++k) {
        const std::span<const uint8_t>& piece = clusters[order[k]].data;
        staging.insert(staging.end(), piece.begin(), piece.end());
      }
      run = staging;
    }
    ZQ_RETURN_IF_ERROR(Write(run_start, run));
    first = end;
  }
  return Status::OK();
}

Status AssemblingStore::Rewrite(uint64_t host_cluster_offset, std::span<const uint8_t> cluster) {
  if (host_cluster_offset % cluster_size_ != 0 || cluster.size() != cluster_size_) {
    assert(!"Rewrite: not one whole host cluster");
    return Status::InvalidArgument(file_->path() + ": rewrite of " +
                                   std::to_string(cluster.size()) + " bytes at host offset " +
                                   Hex(host_cluster_offset) + " is not one whole cluster");
  }
  return WritePiece(host_cluster_offset, cluster, /*replace=*/true);
}

Status AssemblingStore::SetClusterEnd(uint64_t host_cluster_offset, uint32_t data_end) {
  if (host_cluster_offset % cluster_size_ != 0 || data_end == 0 || data_end > cluster_size_) {
    assert(!"SetClusterEnd: unaligned cluster or data end out of range");
    return Status::InvalidArgument(file_->path() + ": cluster end " + std::to_string(data_end) +
                                   " for host cluster " + Hex(host_cluster_offset) +
                                   " is out of range");
  }
  std::unique_lock lock(mutex_);
  Held* held = nullptr;
  for (;;) {
    if (!error_.ok()) return error_;
    auto it = clusters_.find(host_cluster_offset);
    if (it == clusters_.end()) break;
    if (it->second->writing) {
      changed_.wait(lock);
      continue;
    }
    held = it->second.get();
    break;
  }
  if (held == nullptr) {
    // Nothing held: a full data end is the default, nothing to remember.
    if (data_end == cluster_size_) return Status::OK();
    // Never waits for room (the placement calls this under the image's lock).
    held = Insert(host_cluster_offset, io::AlignedBuffer());
  }
  Fill& fill = held->fill;
  if (fill.high_end > data_end) {
    assert(!"SetClusterEnd below bytes already received");
    return Status::InvalidArgument(file_->path() + ": cluster end " + std::to_string(data_end) +
                                   " for host cluster " + Hex(host_cluster_offset) +
                                   " lies below compressed data already written (" +
                                   std::to_string(fill.high_end) + ")");
  }
  fill.data_end = data_end;
  fill.end_set = true;
  return Changed(lock, host_cluster_offset, held);
}

Status AssemblingStore::Flush() {
  std::unique_lock lock(mutex_);
  if (!error_.ok()) return error_;
  // Every cluster held now: unfinished ones are written up to their received end; finished
  // ones are in flight (their writer started them) and are waited for.
  std::vector<uint64_t> offsets;
  offsets.reserve(clusters_.size());
  for (const auto& [offset, held] : clusters_) offsets.push_back(offset);
  for (uint64_t cluster_offset : offsets) {
    for (;;) {
      if (!error_.ok()) return error_;
      auto it = clusters_.find(cluster_offset);
      if (it == clusters_.end()) break;
      Held* held = it->second.get();
      if (held->ready) {
        WriteReadyBatch(lock);  // rather than wait for the writer thread
        continue;
      }
      if (held->writing) {
        changed_.wait(lock);
        continue;
      }
      if (held->dirty && held->buffer.size() != 0) {
        const size_t length = WriteLength(*held);
        held->writing = true;
        lock.unlock();
        const Status status = WriteHeld(cluster_offset, length, *held);
        lock.lock();
        held->writing = false;
        if (status.ok()) {
          held->dirty = false;
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

Status AssemblingStore::Read(uint64_t host_offset, std::span<uint8_t> out) {
  // Clusters the store does not hold are read from the file, in contiguous runs.
  size_t file_run_start = 0;
  size_t file_run_length = 0;
  size_t done = 0;
  while (done < out.size()) {
    const uint64_t offset = host_offset + done;
    const uint64_t cluster_offset = io::AlignDown(offset, cluster_size_);
    const size_t length = static_cast<size_t>(
        std::min<uint64_t>(out.size() - done, cluster_offset + cluster_size_ - offset));
    bool held = false;
    {
      std::lock_guard lock(mutex_);
      if (!error_.ok()) return error_;
      auto it = clusters_.find(cluster_offset);
      if (it != clusters_.end()) {
        held = true;
        const io::AlignedBuffer& buffer = it->second->buffer;
        if (buffer.size() == 0) {
          std::memset(out.data() + done, 0, length);
        } else {
          std::memcpy(out.data() + done, buffer.data() + (offset - cluster_offset), length);
        }
      }
    }
    if (held) {
      if (file_run_length != 0) {
        ZQ_RETURN_IF_ERROR(io::ReadAnyRange(*file_, host_offset + file_run_start,
                                            out.subspan(file_run_start, file_run_length)));
        file_run_length = 0;
      }
    } else {
      if (file_run_length == 0) file_run_start = done;
      file_run_length += length;
    }
    done += length;
  }
  if (file_run_length != 0) {
    ZQ_RETURN_IF_ERROR(io::ReadAnyRange(*file_, host_offset + file_run_start,
                                        out.subspan(file_run_start, file_run_length)));
  }
  return Status::OK();
}

void AssemblingStore::Discard(uint64_t host_cluster_offset) {
  const uint64_t cluster_offset = io::AlignDown(host_cluster_offset, cluster_size_);
  std::unique_lock lock(mutex_);
  for (;;) {
    auto it = clusters_.find(cluster_offset);
    if (it == clusters_.end()) return;
    if (it->second->writing) {
      changed_.wait(lock);
      continue;
    }
    if (it->second->ready) ready_.erase(cluster_offset);
    std::unique_ptr<Held> doomed = std::move(it->second);
    clusters_.erase(it);
    changed_.notify_all();
    lock.unlock();
    ReturnClusterBuffer(std::move(doomed->buffer));
    return;  // `doomed` freed outside the lock
  }
}

Status AssemblingStore::error() const {
  std::lock_guard lock(mutex_);
  return error_;
}

ClusterStore::Stats AssemblingStore::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

AssemblingStore::Fill AssemblingStore::EmptyFill() const {
  Fill fill;
  fill.data_end = cluster_size_;
  return fill;
}

bool AssemblingStore::Admissible(uint64_t cluster_offset, bool whole_cluster) const {
  if (clusters_.size() < options_.max_clusters || clusters_.empty() ||
      cluster_offset < clusters_.begin()->first) {
    return true;
  }
  // A piece that finishes its cluster on arrival (a whole normal cluster) only has to wait
  // for finished clusters to drain, which the writer thread (or a waiting writer) does
  // whatever else happens. Waiting for the unfinished ones could take forever: the
  // placement's open compressed cluster finishes only with a later compressed piece, and
  // that may come after this write.
  if (!whole_cluster) return false;
  size_t finished = 0;
  for (const auto& [offset, held] : clusters_) finished += held->ready || held->writing;
  return finished < options_.max_clusters;
}

AssemblingStore::Held* AssemblingStore::Insert(uint64_t cluster_offset,
                                               io::AlignedBuffer buffer) {
  auto held = std::make_unique<Held>();
  held->buffer = std::move(buffer);
  held->fill = EmptyFill();
  Held* raw = held.get();
  clusters_.emplace(cluster_offset, std::move(held));
  stats_.peak_clusters = std::max<uint64_t>(stats_.peak_clusters, clusters_.size());
  return raw;
}

Status AssemblingStore::WritePiece(uint64_t offset, std::span<const uint8_t> piece,
                                   bool replace) {
  const uint64_t cluster_offset = io::AlignDown(offset, cluster_size_);
  const uint32_t in_cluster = static_cast<uint32_t>(offset - cluster_offset);
  const uint32_t length = static_cast<uint32_t>(piece.size());
  io::AlignedBuffer spare;  // taken outside the lock when the cluster needs a buffer
  // Declared before `lock`, so it runs after the lock is released: an unused spare goes
  // back to the recycled buffers.
  struct SpareReturn {
    AssemblingStore* store;
    io::AlignedBuffer* spare;
    ~SpareReturn() {
      if (spare->size() != 0) store->ReturnClusterBuffer(std::move(*spare));
    }
  } spare_return{this, &spare};
  std::unique_lock lock(mutex_);
  ++stats_.pieces;
  bool counted_wait = false;
  Held* held = nullptr;
  for (;;) {
    if (!error_.ok()) return error_;
    auto it = clusters_.find(cluster_offset);
    const bool cached = it != clusters_.end();
    if (cached && it->second->writing) {
      changed_.wait(lock);
      continue;
    }
    if (!cached && !Admissible(cluster_offset, /*whole_cluster=*/length == cluster_size_)) {
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
      spare = TakeClusterBuffer();
      lock.lock();
      continue;  // the world may have changed meanwhile
    }
    if (!cached) {
      held = Insert(cluster_offset, std::move(spare));
    } else {
      held = it->second.get();
      if (held->buffer.size() == 0) held->buffer = std::move(spare);
    }
    break;
  }
  Fill& fill = held->fill;
  // Under the same lock as the copy below: no reader or flush sees the cluster without its
  // old or its new bytes.
  if (replace) fill = EmptyFill();
  if (in_cluster + length > fill.data_end || fill.received + length > fill.data_end) {
    assert(!"compressed piece beyond the cluster's data end, or overlapping");
    return Status::InvalidArgument(
        file_->path() + ": compressed data of " + std::to_string(length) +
        " bytes at host offset " + Hex(offset) + " lies beyond the cluster's data end " +
        std::to_string(fill.data_end) + " or overlaps data already written");
  }
  std::memcpy(held->buffer.data() + in_cluster, piece.data(), length);
  fill.received += length;
  fill.high_end = std::max(fill.high_end, in_cluster + length);
  held->dirty = true;
  return Changed(lock, cluster_offset, held);
}

Status AssemblingStore::Changed(std::unique_lock<std::mutex>& lock, uint64_t cluster_offset,
                                Held* held) {
  const bool finished = held->fill.finished();
  if (held->ready && !finished) {
    ready_.erase(cluster_offset);
    held->ready = false;
  } else if (!held->ready && finished) {
    held->ready = true;
    ready_.insert(cluster_offset);
    if (HaveWriterThread()) {
      work_.notify_one();
    } else {
      WriteReadyBatch(lock);
    }
  }
  return error_;
}

}  // namespace zqcow::qcow2
