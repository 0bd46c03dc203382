// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The one byte-granular bump allocator for compressed data. Compressed clusters are packed
// back to back; data continues into the next host cluster only when that cluster is the
// next free one (contiguous), otherwise the current cluster is closed (the write cache is
// told where its data ends) and a fresh cluster is started. A host cluster whose refcount
// would exceed the maximum (refcount_bits 1!) is closed the same way. Every host cluster a
// compressed cluster touches gets +1. A new session always starts at a fresh cluster.
//
// Threading: not thread-safe; the image calls it with its metadata mutex held.

#ifndef ZQCOW_QCOW2_COMPRESSED_ALLOCATOR_H_
#define ZQCOW_QCOW2_COMPRESSED_ALLOCATOR_H_

#include <cstdint>
#include <optional>

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

  // A host cluster's refcount reached 0: if it is the one being filled, forget it (the
  // next allocation starts a fresh cluster).
  void OnClusterFreed(format::HostCluster cluster);

  // One past the last byte ever handed out (0 if none): the file must reach at least this
  // offset rounded up to a sector.
  uint64_t high_water() const { return high_water_; }

 private:
  Result<format::HostOffset> StartFresh(uint64_t length);

  format::Geometry geometry_;
  Refcounts* refcounts_;
  CompressedWriteCache* cache_;
  std::optional<format::HostCluster> current_;  // the cluster being filled
  uint64_t current_end_ = 0;                    // bytes used in it (1 .. cluster size)
  uint64_t high_water_ = 0;
};

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_COMPRESSED_ALLOCATOR_H_
