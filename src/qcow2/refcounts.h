// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Refcounts and host cluster allocation.
//
// Allocation is append-only: the next free cluster is the end of the used area, and freed
// clusters stay behind as holes with refcount 0 (never reused in this session). A new
// refcount block is placed at the next free cluster, so in the append-only path it always
// covers itself. When the refcount table is too small it is copied to a bigger one after
// the end of the used area; the header is switched at the next flush and the old table is
// freed afterwards.
//
// Decrements are DEFERRED: QueueDecrement() only records them; the image applies them with
// ApplyDecrements() after the L2/L1 changes that dropped the references are on disk. So a
// refcount on disk is never lower than the references on disk (a crash leaves leaks only).
//
// Threading: not thread-safe; the image calls it with its metadata mutex held.

#ifndef ZQCOW_QCOW2_REFCOUNTS_H_
#define ZQCOW_QCOW2_REFCOUNTS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "format/refcount.h"
#include "format/types.h"
#include "io/aligned_buffer.h"
#include "io/file.h"
#include "qcow2/metadata_cache.h"
#include "zqcow/status.h"

namespace zqcow::qcow2 {

class Refcounts {
 public:
  // `table` holds the refcount table as on disk (table_clusters whole clusters).
  // `next_free` is the first cluster past everything in use. `file` and `cache` must
  // outlive this object.
  Refcounts(io::File* file, MetadataCache* cache, const format::RefcountGeometry& geometry,
            uint64_t table_offset, uint32_t table_clusters, io::AlignedBuffer table,
            format::HostCluster next_free);

  // Refcount of a cluster (0 when no block covers it).
  Result<uint64_t> Get(format::HostCluster cluster);
  // +1. Fails (kCorruption) when the refcount is already at its maximum.
  Status Increment(format::HostCluster cluster);
  // Allocates `count` contiguous fresh clusters with refcount 1 each; returns the first.
  Result<format::HostCluster> Allocate(uint64_t count);
  // Makes sure that allocating next_free() needs no metadata allocation first (its refcount
  // block exists, the table covers it): afterwards Allocate(1) returns next_free().
  Status PrepareNextFree();
  format::HostCluster next_free() const { return next_free_; }

  void QueueDecrement(format::HostCluster cluster) { pending_decrements_.push_back(cluster); }
  size_t pending_decrements() const { return pending_decrements_.size(); }
  // Applies the queued decrements; `on_free` is called for each cluster that reaches 0.
  // Fails with kCorruption if a refcount would go below 0.
  Status ApplyDecrements(const std::function<void(format::HostCluster)>& on_free);

  // Flush steps (the image orders them). Each sets *wrote when it wrote something.
  Status WriteDirtyBlocks(bool* wrote);
  Status WriteTableIfDirty(bool* wrote);
  // Whether the table moved since the last call (the header must be rewritten).
  bool TakeTableMoved() {
    bool moved = table_moved_;
    table_moved_ = false;
    return moved;
  }
  uint64_t table_offset() const { return table_offset_; }
  uint32_t table_clusters() const { return table_clusters_; }
  const format::RefcountGeometry& geometry() const { return geometry_; }

 private:
  uint64_t table_entries() const { return table_.size() / 8; }
  uint64_t TableEntry(uint64_t index) const;
  void SetTableEntry(uint64_t index, uint64_t block_offset);
  // The refcount block at table slot `index`, loaded through the cache; nullptr when the
  // slot is empty.
  Result<std::shared_ptr<CachedTable>> LoadBlock(uint64_t index);
  // Makes sure table slot `index` has a block (allocating one, growing the table).
  Status EnsureBlock(uint64_t index);
  Status GrowTable(uint64_t min_index);
  std::string Where() const { return file_->path(); }

  io::File* file_;
  MetadataCache* cache_;
  format::RefcountGeometry geometry_;
  uint64_t cluster_size_;
  uint64_t table_offset_;
  uint32_t table_clusters_;
  io::AlignedBuffer table_;
  bool table_dirty_ = false;
  bool table_moved_ = false;
  format::HostCluster next_free_;
  std::vector<format::HostCluster> pending_decrements_;
};

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_REFCOUNTS_H_
