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
#include <vector>

#include "io/aligned_buffer.h"

namespace zqcow::convert {

// One read buffer holding `chunk_bytes` of guest data starting at guest_offset.
struct Chunk {
  io::AlignedBuffer buffer;
  uint64_t guest_offset = 0;
  // Clusters of this chunk still being worked on; whoever brings it to zero releases it.
  std::atomic<uint32_t> pending_clusters{0};
};

// Threading: all methods may be called from any thread.
class ChunkPool {
 public:
  // `count` chunks of `chunk_bytes` each, memory aligned to `alignment`.
  ChunkPool(size_t count, size_t chunk_bytes, size_t alignment);

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
  std::vector<std::unique_ptr<Chunk>> chunks_;  // owns every chunk
  std::mutex mutex_;
  std::condition_variable freed_;
  std::vector<Chunk*> free_;  // guarded by mutex_
  bool stopped_ = false;      // guarded by mutex_
};

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_CHUNK_POOL_H_
