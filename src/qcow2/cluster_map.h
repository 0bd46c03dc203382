// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Guest cluster -> L2 entry: the L1 table (held in memory whole; its size is bounded by the
// virtual size and was validated against the file size) and the L2 tables (through the
// bounded metadata cache).
//
// Threading: not thread-safe; the image calls it with its metadata mutex held.

#ifndef ZQCOW_QCOW2_CLUSTER_MAP_H_
#define ZQCOW_QCOW2_CLUSTER_MAP_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "format/types.h"
#include "io/aligned_buffer.h"
#include "io/file.h"
#include "qcow2/metadata_cache.h"
#include "qcow2/refcounts.h"
#include "zqcow/status.h"

namespace zqcow::qcow2 {

class ClusterMap {
 public:
  // `l1` holds the L1 table as on disk, whole clusters (l1_size entries used).
  // `host_limit` bounds where existing L2 tables may lie (end of the used area).
  ClusterMap(io::File* file, MetadataCache* cache, const format::Geometry& geometry,
             uint64_t l1_offset, uint64_t l1_size, io::AlignedBuffer l1);

  // The raw L2 entry of guest cluster `cluster` (0 when it has no L2 table).
  // `host_limit`: L2 tables must end at or before it.
  Result<uint64_t> GetEntry(format::GuestCluster cluster, uint64_t host_limit);
  // Extended L2 entries (geometry.extended_l2): the descriptor and the subcluster bitmap
  // (both 0 when there is no L2 table).
  struct ExtendedEntry {
    uint64_t raw = 0;
    uint64_t bitmap = 0;
  };
  Result<ExtendedEntry> GetExtendedEntry(format::GuestCluster cluster, uint64_t host_limit);
  // Whether the L1 entry covering `cluster` points at an L2 table.
  Result<bool> HasL2(format::GuestCluster cluster);
  // Makes sure the L2 table covering `cluster` exists (allocating a zeroed one).
  Status EnsureL2(format::GuestCluster cluster, Refcounts* refcounts);
  // Sets the raw L2 entry. REQUIRES: the L2 table exists (EnsureL2).
  Status SetEntry(format::GuestCluster cluster, uint64_t raw, uint64_t host_limit);

  // Flush step: dirty L2 tables, then dirty L1 clusters. Sets *wrote when it wrote.
  Status WriteDirty(bool* wrote);

  uint64_t l1_size() const { return l1_size_; }
  // Guest clusters covered by one L2 table.
  uint64_t l2_entries() const { return geometry_.l2_entries(); }

 private:
  Result<uint64_t> L2Offset(uint64_t l1_index) const;
  Result<std::shared_ptr<CachedTable>> LoadL2(format::GuestCluster cluster, uint64_t host_limit);
  std::string Where() const { return file_->path(); }

  io::File* file_;
  MetadataCache* cache_;
  format::Geometry geometry_;
  uint64_t l1_offset_;
  uint64_t l1_size_;
  io::AlignedBuffer l1_;
  std::vector<bool> l1_cluster_dirty_;
};

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_CLUSTER_MAP_H_
