// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The one byte-granular bump allocator for compressed data. Compressed clusters are packed
// back to back; data continues into the next host cluster only when that cluster is the
// next free one (contiguous), otherwise the current cluster is closed (the write cache is
// told where its data ends) and a fresh cluster is started. A host cluster whose refcount
// would exceed the maximum (refcount_bits 1!) is closed the same way. Every host cluster a
// compressed cluster touches gets +1. A new session always starts at a fresh cluster.
//
// Batches. Inside BeginBatch/EndBatch (one Image::WriteCompressedBatch), a cluster left
// behind because the next piece did not fit and its neighbour was taken (by a normal
// cluster or a table allocated since the last batch) is not closed at once: it stays open
// as a *hole*, and later pieces of the batch that fit go there (the fullest hole that
// fits). EndBatch closes what is left of the holes. So a break in the file layout costs
// what no piece of the batch could fill instead of the whole tail (on a 1.5 GiB ext4
// image, 1.6 -> 0.7 MiB of tails in a simulation of the allocation sequence). Holes never
// outlive a batch, so the write cache's progress rule still holds as long as the caller
// hands a batch's pieces to the cache in host-offset order (see WriteCompressedRuns).
//
// Threading: not thread-safe; the image calls it with its metadata mutex held.

#ifndef ZQCOW_QCOW2_COMPRESSED_ALLOCATOR_H_
#define ZQCOW_QCOW2_COMPRESSED_ALLOCATOR_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "format/types.h"
#include "qcow2/compressed_write_cache.h"
#include "qcow2/refcounts.h"
#include "zqcow/status.h"

namespace zqcow::qcow2 {

class CompressedAllocator {
 public:
  // `refcounts` and `cache` must outlive the allocator.
  CompressedAllocator(const format::Geometry& geometry, Refcounts* refcounts,
                      CompressedWriteCache* cache)
      : geometry_(geometry), refcounts_(refcounts), cache_(cache) {}

  // Reserves `length` bytes (0 < length < cluster size); returns their host byte offset.
  Result<format::HostOffset> Allocate(uint64_t length);

  // Brackets the allocations of one batch (see the file comment). EndBatch closes the
  // holes; call it also when an allocation of the batch failed. No nesting.
  void BeginBatch() { in_batch_ = true; }
  Status EndBatch();

  // A host cluster's refcount reached 0: if it is the one being filled, forget it (the
  // next allocation starts a fresh cluster).
  void OnClusterFreed(format::HostCluster cluster);

  // One past the last byte ever handed out (0 if none): the file must reach at least this
  // offset rounded up to a sector.
  uint64_t high_water() const { return high_water_; }

 private:
  // Starts a fresh cluster with a piece of `length` bytes. The cluster left behind becomes
  // a hole inside a batch when `may_be_hole` (not when its refcount is at the maximum).
  Result<format::HostOffset> StartFresh(uint64_t length, bool may_be_hole = true);
  // A piece of `length` bytes in the fullest hole it fits in; nullopt when none.
  Result<std::optional<format::HostOffset>> AllocateInHole(uint64_t length);
  Status CloseCluster(format::HostCluster cluster, uint64_t end);

  struct Hole {
    format::HostCluster cluster;
    uint64_t end = 0;  // bytes used in it (1 .. cluster size - 1)
  };

  format::Geometry geometry_;
  Refcounts* refcounts_;
  CompressedWriteCache* cache_;
  std::optional<format::HostCluster> current_;  // the cluster being filled
  uint64_t current_end_ = 0;                    // bytes used in it (1 .. cluster size)
  uint64_t high_water_ = 0;
  bool in_batch_ = false;
  std::vector<Hole> holes_;  // only inside a batch
};

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_COMPRESSED_ALLOCATOR_H_
