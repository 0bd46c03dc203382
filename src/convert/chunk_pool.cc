// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/chunk_pool.h"

#include <sys/mman.h>

#include <algorithm>
#include <new>

namespace zqcow::convert {

namespace {
// Transparent huge pages are this large on x86-64 and arm64 with 4 KiB pages; aligning the
// region to it lets the kernel back it with huge pages from the start.
constexpr size_t kHugePageBytes = size_t{2} << 20;
}  // namespace

ChunkPool::ChunkPool(size_t count, size_t chunk_bytes, size_t alignment)
    : chunk_bytes_(io::AlignUp(chunk_bytes, alignment)) {
  const size_t region_bytes =
      io::AlignUp(std::max<size_t>(1, count * chunk_bytes_), kHugePageBytes);
  const size_t region_alignment = std::max(alignment, kHugePageBytes);
  // Map enough to place an aligned region inside. The slack around it stays mapped but is
  // never touched: it costs address space, not memory.
  mapping_bytes_ = region_bytes + region_alignment;
  mapping_ =
      mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping_ == MAP_FAILED) {
    mapping_ = nullptr;
    throw std::bad_alloc();
  }
  auto* base = static_cast<uint8_t*>(mapping_);
  auto* region =
      reinterpret_cast<uint8_t*>(io::AlignUp(reinterpret_cast<uintptr_t>(base), region_alignment));
  // Advisory: without huge pages the pool still works, only the reads are split more.
  madvise(region, region_bytes, MADV_HUGEPAGE);
  try {
    chunks_.reserve(count);
    free_.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      auto chunk = std::make_unique<Chunk>();
      chunk->buffer = {region + i * chunk_bytes_, chunk_bytes};
      free_.push_back(chunk.get());
      chunks_.push_back(std::move(chunk));
    }
  } catch (...) {
    munmap(mapping_, mapping_bytes_);  // the destructor does not run for a failed constructor
    throw;
  }
}

ChunkPool::~ChunkPool() {
  if (mapping_ != nullptr) munmap(mapping_, mapping_bytes_);
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
