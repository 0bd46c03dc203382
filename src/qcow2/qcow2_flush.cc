// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Qcow2Image: the ordered flush, the header, close.
//
// Flush order (each step only when it has something to write):
//   1. compressed write cache -> file; fdatasync        data before anything points at it
//   2. dirty refcount blocks; fdatasync                 refcounts >= references on disk
//   3. refcount table (if it changed); fdatasync;
//      header (if the table moved); fdatasync
//   4. dirty L2 tables, dirty L1 clusters; fdatasync     references
//   5. deferred decrements -> refcount blocks; fdatasync  only after the L2 change is durable
// A crash between any two steps leaves refcounts on disk >= references on disk: leaks at
// worst, never corruption.

#include <algorithm>
#include <cstring>

#include "format/endian.h"
#include "qcow2/cluster_io.h"
#include "qcow2/qcow2_engine.h"

namespace zqcow::qcow2 {

Status Qcow2Image::WriteHeaderLocked() {
  ZQ_RETURN_IF_ERROR(WriteTable(file_.get(), 0, header_cluster_));
  header_dirty_ = false;
  return Status::OK();
}

Status Qcow2Image::DoFlushLocked() {
  ZQ_RETURN_IF_ERROR(store_->Flush());
  // Readers read whole sectors of compressed data: the file must reach the end of the
  // sector holding the last compressed byte. Extend it to the end of the allocated area,
  // never less: normal-cluster writes run outside the lock and may be extending the file
  // right now, and a truncate to anything below their end would cut their data off. Every
  // write in flight ends at or before HostLimitLocked().
  uint64_t needed = io::AlignUp(placement_->high_water(), format::kSectorSize);
  if (needed > 0) {
    ZQ_ASSIGN_OR_RETURN(uint64_t size, file_->Size());
    if (size < needed) ZQ_RETURN_IF_ERROR(file_->Truncate(std::max(needed, HostLimitLocked())));
  }
  ZQ_RETURN_IF_ERROR(file_->Sync());

  bool wrote = false;
  ZQ_RETURN_IF_ERROR(refcounts_->WriteDirtyBlocks(&wrote));
  if (wrote) ZQ_RETURN_IF_ERROR(file_->Sync());

  wrote = false;
  ZQ_RETURN_IF_ERROR(refcounts_->WriteTableIfDirty(&wrote));
  if (wrote) ZQ_RETURN_IF_ERROR(file_->Sync());
  if (refcounts_->TakeTableMoved()) {
    format::StoreBE64(header_cluster_.data() + kHeaderRefcountTableOffset,
                      refcounts_->table_offset());
    format::StoreBE32(header_cluster_.data() + kHeaderRefcountTableClusters,
                      refcounts_->table_clusters());
    header_.refcount_table_offset = refcounts_->table_offset();
    header_.refcount_table_clusters = refcounts_->table_clusters();
    header_dirty_ = true;
  }
  if (header_dirty_) {
    ZQ_RETURN_IF_ERROR(WriteHeaderLocked());
    ZQ_RETURN_IF_ERROR(file_->Sync());
  }

  wrote = false;
  ZQ_RETURN_IF_ERROR(cluster_map_->WriteDirty(&wrote));
  if (wrote) ZQ_RETURN_IF_ERROR(file_->Sync());

  if (refcounts_->pending_decrements() > 0) {
    ZQ_RETURN_IF_ERROR(refcounts_->ApplyDecrements([this](format::HostCluster cluster) {
      placement_->OnClusterFreed(cluster);  // and from the store
    }));
    wrote = false;
    ZQ_RETURN_IF_ERROR(refcounts_->WriteDirtyBlocks(&wrote));
    if (wrote) ZQ_RETURN_IF_ERROR(file_->Sync());
  }
  metadata_cache_->Trim();
  return Status::OK();
}

Status Qcow2Image::FlushLocked() {
  if (closed_) return Error("image is closed");
  if (!writable_) return Status::OK();
  ZQ_RETURN_IF_ERROR(failed_);
  return FailLocked(DoFlushLocked());
}

Status Qcow2Image::MaybeFlushLocked() {
  if (metadata_cache_->over_budget()) {
    metadata_cache_->Trim();
    if (!metadata_cache_->over_budget() &&
        refcounts_->pending_decrements() <= kMaxPendingDecrements) {
      return Status::OK();
    }
  } else if (refcounts_->pending_decrements() <= kMaxPendingDecrements) {
    return Status::OK();
  }
  return FlushLocked();
}

Status Qcow2Image::Flush() {
  std::lock_guard lock(mutex_);
  return FlushLocked();
}

Status Qcow2Image::InitialFlush() {
  std::lock_guard lock(mutex_);
  header_dirty_ = true;
  return FlushLocked();
}

Status Qcow2Image::MarkOpenForWriting() {
  std::lock_guard lock(mutex_);
  if (header_.version < 3) return Status::OK();  // v2 has no dirty bit
  uint8_t* h = header_cluster_.data();
  uint64_t incompatible = format::LoadBE64(h + kHeaderIncompatibleFeatures);
  format::StoreBE64(h + kHeaderIncompatibleFeatures, incompatible | format::kIncompatDirty);
  // Autoclear features describe data we do not maintain (bitmaps...): clear them.
  format::StoreBE64(h + kHeaderAutoclearFeatures, 0);
  header_.incompatible_features = incompatible | format::kIncompatDirty;
  header_.autoclear_features = 0;
  Status s = WriteHeaderLocked();
  if (s.ok()) s = file_->Sync();
  return FailLocked(s);
}

Status Qcow2Image::CloseLocked(bool clear_dirty) {
  if (closed_) return close_status_;
  Status s;
  if (writable_) {
    s = failed_.ok() ? FlushLocked() : failed_;
    if (s.ok() && clear_dirty && header_.version >= 3) {
      uint8_t* h = header_cluster_.data();
      uint64_t incompatible = format::LoadBE64(h + kHeaderIncompatibleFeatures);
      format::StoreBE64(h + kHeaderIncompatibleFeatures, incompatible & ~format::kIncompatDirty);
      header_.incompatible_features = incompatible & ~format::kIncompatDirty;
      s = WriteHeaderLocked();
      if (s.ok()) s = file_->Sync();
      if (!s.ok()) {
        // The clean header may sit in the page cache without being durable: put the dirty
        // bit back (best effort) so the image never looks complete after a failed close.
        format::StoreBE64(h + kHeaderIncompatibleFeatures, incompatible);
        header_.incompatible_features = incompatible;
        (void)WriteHeaderLocked();
      }
    }
  }
  if (backing_) {
    Status backing_closed = backing_->Close();
    if (s.ok()) s = backing_closed;
    backing_.reset();
  }
  closed_ = true;
  close_status_ = s;
  store_.reset();
  file_.reset();
  return s;
}

Status Qcow2Image::Close() {
  std::lock_guard lock(mutex_);
  return CloseLocked(/*clear_dirty=*/true);
}

Status Qcow2Image::CloseIncomplete() {
  std::lock_guard lock(mutex_);
  return CloseLocked(/*clear_dirty=*/false);
}

}  // namespace zqcow::qcow2
