// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "qcow2/refcounts.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "format/endian.h"
#include "qcow2/cluster_io.h"

namespace zqcow::qcow2 {

Refcounts::Refcounts(io::File* file, MetadataCache* cache, const format::RefcountGeometry& geometry,
                     uint64_t table_offset, uint32_t table_clusters, io::AlignedBuffer table,
                     format::HostCluster next_free)
    : file_(file),
      cache_(cache),
      geometry_(geometry),
      cluster_size_(uint64_t{1} << geometry.cluster_bits),
      table_offset_(table_offset),
      table_clusters_(table_clusters),
      table_(std::move(table)),
      next_free_(next_free) {}

uint64_t Refcounts::TableEntry(uint64_t index) const {
  return format::LoadBE64(table_.data() + index * 8);
}

void Refcounts::SetTableEntry(uint64_t index, uint64_t block_offset) {
  format::StoreBE64(table_.data() + index * 8, block_offset);
  table_dirty_ = true;
}

Result<std::shared_ptr<CachedTable>> Refcounts::LoadBlock(uint64_t index) {
  if (index >= table_entries()) return std::shared_ptr<CachedTable>();
  format::Geometry g{geometry_.cluster_bits};
  auto decoded = format::DecodeRefcountTableEntry(TableEntry(index), g);
  if (!decoded.ok()) return decoded.status().WithPrefix(Where());
  uint64_t offset = decoded->value();
  if (offset == 0) return std::shared_ptr<CachedTable>();
  if (auto hit = cache_->Find(offset)) return hit;
  if (offset + cluster_size_ > next_free_.value() * cluster_size_) {
    return Status::Corruption(Where() + ": refcount block " + std::to_string(index) +
                              " at offset " + Hex(offset) + " lies past the end of the image");
  }
  ZQ_ASSIGN_OR_RETURN(auto data, ReadTable(file_, offset, cluster_size_));
  return cache_->Insert(offset, TableKind::kRefcountBlock, std::move(data), /*dirty=*/false);
}

Result<uint64_t> Refcounts::Get(format::HostCluster cluster) {
  ZQ_ASSIGN_OR_RETURN(auto block, LoadBlock(geometry_.table_index(cluster)));
  if (!block) return uint64_t{0};
  return format::GetRefcount(block->data.span(), geometry_.block_index(cluster),
                             geometry_.refcount_order);
}

Status Refcounts::Increment(format::HostCluster cluster) {
  uint64_t index = geometry_.table_index(cluster);
  ZQ_RETURN_IF_ERROR(EnsureBlock(index));
  ZQ_ASSIGN_OR_RETURN(auto block, LoadBlock(index));
  uint64_t entry = geometry_.block_index(cluster);
  uint64_t value = format::GetRefcount(block->data.span(), entry, geometry_.refcount_order);
  if (value >= geometry_.max_refcount()) {
    return Status::Corruption(Where() + ": refcount of host cluster " +
                              std::to_string(cluster.value()) + " would overflow");
  }
  format::SetRefcount(block->data.span(), entry, geometry_.refcount_order, value + 1);
  cache_->MarkDirty(*block);
  return Status::OK();
}

Status Refcounts::EnsureBlock(uint64_t index) {
  if (index >= table_entries()) ZQ_RETURN_IF_ERROR(GrowTable(index));
  if (TableEntry(index) != 0) return Status::OK();
  format::HostCluster block_cluster = next_free_;
  next_free_ = next_free_ + 1;
  uint64_t own_index = geometry_.table_index(block_cluster);
  if (own_index >= table_entries()) ZQ_RETURN_IF_ERROR(GrowTable(own_index));
  if (TableEntry(index) != 0) {
    // Growing the table allocated this slot's block already; our cluster stays a hole
    // (refcount 0), which costs nothing but one cluster.
    return Status::OK();
  }
  uint64_t block_offset = block_cluster.value() * cluster_size_;
  SetTableEntry(index, block_offset);
  auto block = cache_->Insert(block_offset, TableKind::kRefcountBlock,
                              io::AlignedBuffer(cluster_size_), /*dirty=*/true);
  if (own_index == index) {
    format::SetRefcount(block->data.span(), geometry_.block_index(block_cluster),
                        geometry_.refcount_order, 1);
    return Status::OK();
  }
  return Increment(block_cluster);
}

Status Refcounts::GrowTable(uint64_t min_index) {
  uint64_t old_entries = table_entries();
  uint64_t new_entries = std::max(min_index + 1, old_entries * 2);
  uint64_t new_clusters = 0;
  for (;;) {
    new_clusters = (new_entries * 8 + cluster_size_ - 1) / cluster_size_;
    // The new table and the blocks that will describe it must be covered by it as well.
    format::HostCluster end = next_free_ + new_clusters + 2;
    if (geometry_.table_index(end) < new_entries) break;
    new_entries *= 2;
  }
  io::AlignedBuffer bigger(new_clusters * cluster_size_);
  std::memcpy(bigger.data(), table_.data(), table_.size());
  uint64_t old_offset = table_offset_;
  uint32_t old_clusters = table_clusters_;

  format::HostCluster first = next_free_;
  next_free_ = next_free_ + new_clusters;
  table_ = std::move(bigger);
  table_offset_ = first.value() * cluster_size_;
  table_clusters_ = static_cast<uint32_t>(new_clusters);
  table_dirty_ = true;
  table_moved_ = true;
  for (uint64_t i = 0; i < new_clusters; ++i) ZQ_RETURN_IF_ERROR(Increment(first + i));
  // The old table is freed once the header points at the new one (deferred decrement).
  for (uint64_t i = 0; i < old_clusters; ++i) {
    QueueDecrement(format::HostCluster(old_offset / cluster_size_ + i));
  }
  return Status::OK();
}

Result<format::HostCluster> Refcounts::Allocate(uint64_t count) {
  if (count == 1) ZQ_RETURN_IF_ERROR(PrepareNextFree());
  format::HostCluster first = next_free_;
  next_free_ = next_free_ + count;
  for (uint64_t i = 0; i < count; ++i) ZQ_RETURN_IF_ERROR(Increment(first + i));
  return first;
}

Status Refcounts::PrepareNextFree() {
  for (;;) {
    uint64_t index = geometry_.table_index(next_free_);
    if (index < table_entries() && TableEntry(index) != 0) return Status::OK();
    ZQ_RETURN_IF_ERROR(EnsureBlock(index));
  }
}

Status Refcounts::ApplyDecrements(const std::function<void(format::HostCluster)>& on_free) {
  std::vector<format::HostCluster> pending;
  pending.swap(pending_decrements_);
  for (format::HostCluster cluster : pending) {
    ZQ_ASSIGN_OR_RETURN(auto block, LoadBlock(geometry_.table_index(cluster)));
    uint64_t entry = geometry_.block_index(cluster);
    uint64_t value =
        block ? format::GetRefcount(block->data.span(), entry, geometry_.refcount_order) : 0;
    if (value == 0) {
      return Status::Corruption(Where() + ": refcount of host cluster " +
                                std::to_string(cluster.value()) + " would drop below zero");
    }
    format::SetRefcount(block->data.span(), entry, geometry_.refcount_order, value - 1);
    cache_->MarkDirty(*block);
    if (value == 1) on_free(cluster);
  }
  return Status::OK();
}

Status Refcounts::WriteDirtyBlocks(bool* wrote) {
  for (const auto& block : cache_->Dirty(TableKind::kRefcountBlock)) {
    ZQ_RETURN_IF_ERROR(WriteTable(file_, block->host_offset, block->data));
    cache_->MarkClean(*block);
    *wrote = true;
  }
  return Status::OK();
}

Status Refcounts::WriteTableIfDirty(bool* wrote) {
  if (!table_dirty_) return Status::OK();
  ZQ_RETURN_IF_ERROR(WriteTable(file_, table_offset_, table_));
  table_dirty_ = false;
  *wrote = true;
  return Status::OK();
}

}  // namespace zqcow::qcow2
