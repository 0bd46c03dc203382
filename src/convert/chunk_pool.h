// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The pipeline's read buffers: a fixed set of aligned chunks that the reader fills and the
// workers hand back once every cluster in them is done. The pool's size bounds how much
// source data is in memory at once.

#ifndef ZQCOW_CONVERT_CHUNK_POOL_H_
#define ZQCOW_CONVERT_CHUNK_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "io/aligned_buffer.h"

namespace zqcow::convert {

// One read buffer holding `chunk_bytes` of guest data starting at guest_offset.
struct Chunk {
  std::span<uint8_t> buffer;  // a slice of the pool's region
  uint64_t guest_offset = 0;
  // Clusters of this chunk still being worked on; whoever brings it to zero releases it.
  std::atomic<uint32_t> pending_clusters{0};
};

// Threading: all methods may be called from any thread.
class ChunkPool {
 public:
  // `count` chunks of `chunk_bytes` each, memory aligned to `alignment`. The chunks are
  // slices of one region backed by transparent huge pages where the kernel allows: an
  // O_DIRECT read into 4 KiB pages needs one DMA segment per page, and a virtio disk
  // takes at most a few hundred segments per request, so a 1 MiB read into scattered
  // pages is split in two and the whole read runs at about half the device's speed.
  ChunkPool(size_t count, size_t chunk_bytes, size_t alignment);
  ~ChunkPool();
  ChunkPool(const ChunkPool&) = delete;
  ChunkPool& operator=(const ChunkPool&) = delete;

  // Waits for a free chunk. Returns nullptr once Stop() was called.
  Chunk* Acquire();
  // A free chunk, or nullptr when none is free right now (or after Stop()).
  Chunk* TryAcquire();
  // REQUIRES: `chunk` came from this pool and is not in use any more.
  void Release(Chunk* chunk);
  // Wakes every waiter; Acquire returns nullptr from now on.
  void Stop();

  size_t count() const { return chunks_.size(); }
  size_t chunk_bytes() const { return chunk_bytes_; }

 private:
  const size_t chunk_bytes_;
  void* mapping_ = nullptr;  // the region's mapping (mmap), and its length
  size_t mapping_bytes_ = 0;
  std::vector<std::unique_ptr<Chunk>> chunks_;  // owns every chunk
  std::mutex mutex_;
  std::condition_variable freed_;
  std::vector<Chunk*> free_;  // guarded by mutex_
  bool stopped_ = false;      // guarded by mutex_
};

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_CHUNK_POOL_H_
