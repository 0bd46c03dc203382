// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "qcow2/compressed_allocator.h"

#include <algorithm>

namespace zqcow::qcow2 {

Result<format::HostOffset> CompressedAllocator::StartFresh(uint64_t length) {
  if (current_ && current_end_ < geometry_.cluster_size()) {
    // Close the cluster we leave: no piece will arrive at or beyond its end.
    ZQ_RETURN_IF_ERROR(cache_->SetClusterEnd(geometry_.host_offset(*current_).value(),
                                             static_cast<uint32_t>(current_end_)));
  }
  current_.reset();
  ZQ_ASSIGN_OR_RETURN(format::HostCluster fresh, refcounts_->Allocate(1));
  current_ = fresh;
  current_end_ = length;
  format::HostOffset start = geometry_.host_offset(fresh);
  high_water_ = std::max(high_water_, start.value() + length);
  return start;
}

Result<format::HostOffset> CompressedAllocator::Allocate(uint64_t length) {
  const uint64_t cluster_size = geometry_.cluster_size();
  if (!current_ || current_end_ >= cluster_size) return StartFresh(length);
  ZQ_ASSIGN_OR_RETURN(uint64_t refcount, refcounts_->Get(*current_));
  if (refcount >= refcounts_->geometry().max_refcount()) return StartFresh(length);

  format::HostOffset start = geometry_.host_offset(*current_) + current_end_;
  uint64_t end_in_cluster = current_end_ + length;
  if (end_in_cluster <= cluster_size) {
    ZQ_RETURN_IF_ERROR(refcounts_->Increment(*current_));
    current_end_ = end_in_cluster;
  } else {
    // Spills into the next cluster: only if that is the next free one.
    ZQ_RETURN_IF_ERROR(refcounts_->PrepareNextFree());
    format::HostCluster next = *current_ + 1;
    if (refcounts_->next_free() != next) return StartFresh(length);
    ZQ_ASSIGN_OR_RETURN(format::HostCluster allocated, refcounts_->Allocate(1));
    if (allocated != next) {
      return Status::Corruption("compressed allocator: expected host cluster " +
                                std::to_string(next.value()) + ", got " +
                                std::to_string(allocated.value()));
    }
    ZQ_RETURN_IF_ERROR(refcounts_->Increment(*current_));
    current_ = next;
    current_end_ = end_in_cluster - cluster_size;
  }
  high_water_ = std::max(high_water_, start.value() + length);
  return start;
}

void CompressedAllocator::OnClusterFreed(format::HostCluster cluster) {
  if (current_ && *current_ == cluster) current_.reset();
}

}  // namespace zqcow::qcow2
