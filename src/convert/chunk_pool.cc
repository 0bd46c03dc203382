// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/chunk_pool.h"

namespace zqcow::convert {

ChunkPool::ChunkPool(size_t count, size_t chunk_bytes, size_t alignment)
    : chunk_bytes_(chunk_bytes) {
  chunks_.reserve(count);
  free_.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    auto chunk = std::make_unique<Chunk>();
    chunk->buffer = io::AlignedBuffer(chunk_bytes, alignment);
    free_.push_back(chunk.get());
    chunks_.push_back(std::move(chunk));
  }
}

Chunk* ChunkPool::Acquire() {
  std::unique_lock lock(mutex_);
  freed_.wait(lock, [this] { return stopped_ || !free_.empty(); });
  if (stopped_) return nullptr;
  Chunk* chunk = free_.back();
  free_.pop_back();
  return chunk;
}

Chunk* ChunkPool::TryAcquire() {
  std::lock_guard lock(mutex_);
  if (stopped_ || free_.empty()) return nullptr;
  Chunk* chunk = free_.back();
  free_.pop_back();
  return chunk;
}

void ChunkPool::Release(Chunk* chunk) {
  {
    std::lock_guard lock(mutex_);
    free_.push_back(chunk);
  }
  freed_.notify_one();
}

void ChunkPool::Stop() {
  {
    std::lock_guard lock(mutex_);
    stopped_ = true;
  }
  freed_.notify_all();
}

}  // namespace zqcow::convert
