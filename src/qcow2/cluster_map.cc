// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "qcow2/cluster_map.h"

#include <cstdio>
#include <utility>

#include "format/endian.h"
#include "format/entries.h"
#include "qcow2/cluster_io.h"

namespace zqcow::qcow2 {

ClusterMap::ClusterMap(io::File* file, MetadataCache* cache, const format::Geometry& geometry,
                       uint64_t l1_offset, uint64_t l1_size, io::AlignedBuffer l1)
    : file_(file),
      cache_(cache),
      geometry_(geometry),
      l1_offset_(l1_offset),
      l1_size_(l1_size),
      l1_(std::move(l1)),
      l1_cluster_dirty_(l1_.size() / geometry.cluster_size(), false) {}

Result<uint64_t> ClusterMap::L2Offset(uint64_t l1_index) const {
  if (l1_index >= l1_size_) {
    return Status::Corruption(Where() + ": L1 index " + std::to_string(l1_index) +
                              " beyond the L1 table (" + std::to_string(l1_size_) + " entries)");
  }
  auto entry = format::DecodeL1Entry(format::LoadBE64(l1_.data() + l1_index * 8), geometry_);
  if (!entry.ok()) return entry.status().WithPrefix(Where());
  return entry->l2_offset.value();
}

Result<bool> ClusterMap::HasL2(format::GuestCluster cluster) {
  ZQ_ASSIGN_OR_RETURN(uint64_t offset, L2Offset(cluster.value() >> geometry_.l2_bits()));
  return offset != 0;
}

Result<std::shared_ptr<CachedTable>> ClusterMap::LoadL2(format::GuestCluster cluster,
                                                        uint64_t host_limit) {
  uint64_t l1_index = cluster.value() >> geometry_.l2_bits();
  ZQ_ASSIGN_OR_RETURN(uint64_t offset, L2Offset(l1_index));
  if (offset == 0) return std::shared_ptr<CachedTable>();
  if (auto hit = cache_->Find(offset)) return hit;
  if (offset + geometry_.cluster_size() > host_limit) {
    return Status::Corruption(Where() + ": L2 table " + std::to_string(l1_index) + " at offset " +
                              Hex(offset) + " lies past the end of the image");
  }
  ZQ_ASSIGN_OR_RETURN(auto data, ReadTable(file_, offset, geometry_.cluster_size()));
  return cache_->Insert(offset, TableKind::kL2, std::move(data), /*dirty=*/false);
}

Result<uint64_t> ClusterMap::GetEntry(format::GuestCluster cluster, uint64_t host_limit) {
  ZQ_ASSIGN_OR_RETURN(auto table, LoadL2(cluster, host_limit));
  if (!table) return uint64_t{0};
  uint64_t index = cluster.value() & (geometry_.l2_entries() - 1);
  return format::LoadBE64(table->data.data() + index * geometry_.l2_entry_bytes());
}

Result<ClusterMap::ExtendedEntry> ClusterMap::GetExtendedEntry(format::GuestCluster cluster,
                                                               uint64_t host_limit) {
  ZQ_ASSIGN_OR_RETURN(auto table, LoadL2(cluster, host_limit));
  if (!table) return ExtendedEntry{};
  const uint64_t index = cluster.value() & (geometry_.l2_entries() - 1);
  const uint8_t* entry = table->data.data() + index * geometry_.l2_entry_bytes();
  return ExtendedEntry{format::LoadBE64(entry), format::LoadBE64(entry + 8)};
}

Status ClusterMap::EnsureL2(format::GuestCluster cluster, Refcounts* refcounts) {
  uint64_t l1_index = cluster.value() >> geometry_.l2_bits();
  ZQ_ASSIGN_OR_RETURN(uint64_t offset, L2Offset(l1_index));
  if (offset != 0) return Status::OK();
  ZQ_ASSIGN_OR_RETURN(format::HostCluster host, refcounts->Allocate(1));
  uint64_t table_offset = host.value() << geometry_.cluster_bits;
  cache_->Insert(table_offset, TableKind::kL2, io::AlignedBuffer(geometry_.cluster_size()),
                 /*dirty=*/true);
  // The new table has refcount 1: COPIED.
  uint64_t raw = format::EncodeL1Entry({format::HostOffset(table_offset), /*copied=*/true});
  format::StoreBE64(l1_.data() + l1_index * 8, raw);
  l1_cluster_dirty_[l1_index * 8 / geometry_.cluster_size()] = true;
  return Status::OK();
}

Status ClusterMap::SetEntry(format::GuestCluster cluster, uint64_t raw, uint64_t host_limit) {
  ZQ_ASSIGN_OR_RETURN(auto table, LoadL2(cluster, host_limit));
  if (!table) {
    return Status::Corruption(Where() + ": no L2 table for guest cluster " +
                              std::to_string(cluster.value()));
  }
  uint64_t index = cluster.value() & (geometry_.l2_entries() - 1);
  format::StoreBE64(table->data.data() + index * geometry_.l2_entry_bytes(), raw);
  cache_->MarkDirty(*table);
  return Status::OK();
}

Status ClusterMap::WriteDirty(bool* wrote) {
  for (const auto& table : cache_->Dirty(TableKind::kL2)) {
    ZQ_RETURN_IF_ERROR(WriteTable(file_, table->host_offset, table->data));
    cache_->MarkClean(*table);
    *wrote = true;
  }
  uint64_t cluster_size = geometry_.cluster_size();
  for (size_t i = 0; i < l1_cluster_dirty_.size(); ++i) {
    if (!l1_cluster_dirty_[i]) continue;
    ZQ_RETURN_IF_ERROR(
        file_->WriteAt(l1_offset_ + i * cluster_size, l1_.data() + i * cluster_size, cluster_size));
    l1_cluster_dirty_[i] = false;
    *wrote = true;
  }
  return Status::OK();
}

}  // namespace zqcow::qcow2
