// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// AssemblingStore: the writer thread, batch writes of finished clusters, and the recycled
// buffers (see assembling_store.h).

#include <algorithm>
#include <cassert>
#include <cstring>
#include <new>
#include <system_error>
#include <utility>

#include "qcow2/assembling_store.h"

namespace zqcow::qcow2 {

namespace {

// Most bytes of finished clusters one batch writes (at least one cluster).
constexpr size_t kMaxBatchBytes = size_t{2} << 20;
// Join buffers (kMaxBatchBytes each) that may exist at once.
constexpr size_t kMaxJoinBuffers = 2;

}  // namespace

bool AssemblingStore::HaveWriterThread() {
  if (!writer_.joinable() && options_.background_writer && !writer_failed_) {
    try {
      writer_ = std::thread([this] { WriterMain(); });
    } catch (const std::system_error&) {
      writer_failed_ = true;
    }
  }
  return writer_.joinable();
}

void AssemblingStore::WriterMain() {
  std::unique_lock lock(mutex_);
  for (;;) {
    work_.wait(lock, [this] { return stopping_ || !ready_.empty(); });
    if (stopping_) return;
    WriteReadyBatch(lock);
  }
}

void AssemblingStore::WriteReadyBatch(std::unique_lock<std::mutex>& lock) {
  struct Item {
    uint64_t offset;
    Held* held;
    size_t length;
  };
  std::vector<Item> items;
  size_t bytes = 0;
  while (!ready_.empty() && (items.empty() || bytes + cluster_size_ <= kMaxBatchBytes)) {
    const uint64_t cluster_offset = *ready_.begin();
    ready_.erase(ready_.begin());
    Held* held = clusters_.at(cluster_offset).get();
    assert(held->ready && !held->writing);
    held->ready = false;
    held->writing = true;
    items.push_back({cluster_offset, held, WriteLength(*held)});
    bytes += cluster_size_;
  }
  const bool write = error_.ok();
  lock.unlock();
  Status status;
  if (write) {
    // Clusters back to back go out as one write (copied together), so the file system sees
    // one large request instead of several racing for the same inode lock.
    size_t i = 0;
    while (status.ok() && i < items.size()) {
      const Item& first = items[i];
      size_t end = i + 1;
      while (end < items.size() && items[end - 1].length == cluster_size_ &&
             items[end].offset == items[end - 1].offset + cluster_size_) {
        ++end;
      }
      io::AlignedBuffer joined;
      if (end - i > 1) {
        joined = TakeJoinBuffer();
        // Every join buffer is in use by another writer: write the clusters one by one.
        if (joined.data() == nullptr) end = i + 1;
      }
      if (end - i == 1) {
        status = WriteHeld(first.offset, first.length, *first.held);
      } else {
        size_t length = 0;
        for (size_t k = i; k < end; ++k) {
          std::memcpy(joined.data() + length, items[k].held->buffer.data(), items[k].length);
          length += items[k].length;
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
  std::vector<std::unique_ptr<Held>> doomed;
  doomed.reserve(items.size());
  lock.lock();
  if (!status.ok() && error_.ok()) error_ = status;
  if (write && status.ok()) {
    stats_.clusters_written_whole += items.size();
    ++stats_.write_batches;
  }
  for (const Item& item : items) {
    auto it = clusters_.find(item.offset);
    assert(it != clusters_.end() && it->second.get() == item.held);
    doomed.push_back(std::move(it->second));
    clusters_.erase(it);
  }
  changed_.notify_all();
  lock.unlock();
  for (auto& held : doomed) ReturnClusterBuffer(std::move(held->buffer));
  doomed.clear();  // freed outside the lock
  lock.lock();
}

size_t AssemblingStore::WriteLength(const Held& held) const {
  // Finished: high_end == data_end. Unfinished: everything received so far.
  return static_cast<size_t>(
      std::min<uint64_t>(io::AlignUp(held.fill.high_end, alignment_), cluster_size_));
}

Status AssemblingStore::WriteHeld(uint64_t cluster_offset, size_t length, const Held& held) {
  const Status status = file_->WriteAt(cluster_offset, held.buffer.data(), length);
  if (status.ok() && options_.drop_page_cache) {
    (void)file_->DropCache(cluster_offset, length);  // a hint only
  }
  return status;
}

io::AlignedBuffer AssemblingStore::TakeClusterBuffer() {
  io::AlignedBuffer buffer;
  {
    std::lock_guard lock(cluster_buffers_mutex_);
    if (!cluster_buffers_.empty()) {
      buffer = std::move(cluster_buffers_.back());
      cluster_buffers_.pop_back();
    }
  }
  if (buffer.size() == 0) {
    return io::AlignedBuffer(cluster_size_, std::max(alignment_, io::kBufferAlignment));
  }
  std::memset(buffer.data(), 0, buffer.size());
  return buffer;
}

void AssemblingStore::ReturnClusterBuffer(io::AlignedBuffer buffer) {
  if (buffer.size() == 0) return;
  {
    std::lock_guard lock(cluster_buffers_mutex_);
    if (cluster_buffers_.size() < options_.max_clusters) {
      cluster_buffers_.push_back(std::move(buffer));
      return;
    }
  }
  // `buffer` is freed here, outside the lock.
}

io::AlignedBuffer AssemblingStore::TakeJoinBuffer() {
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

void AssemblingStore::ReturnJoinBuffer(io::AlignedBuffer buffer) {
  std::lock_guard lock(join_buffers_mutex_);
  join_buffers_.push_back(std::move(buffer));
}

}  // namespace zqcow::qcow2
