// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

// CompressedPlacement: step 1 of the compressed write path (see cluster_store.h).

#include "qcow2/cluster_store.h"

#include <algorithm>
#include <string>

namespace zqcow::qcow2 {

Status CompressedPlacement::CloseCluster(format::HostCluster cluster, uint64_t end) {
  // No piece will arrive at or beyond `end`.
  return store_->SetClusterEnd(geometry_.host_offset(cluster).value(), static_cast<uint32_t>(end));
}

Result<format::HostOffset> CompressedPlacement::StartFresh(uint64_t length, bool may_be_hole) {
  if (current_ && current_end_ < geometry_.cluster_size()) {
    // The cluster we leave: a hole for the rest of the batch, or closed now.
    if (in_batch_ && may_be_hole) {
      holes_.push_back({*current_, current_end_});
    } else {
      ZQ_RETURN_IF_ERROR(CloseCluster(*current_, current_end_));
    }
  }
  current_.reset();
  ZQ_ASSIGN_OR_RETURN(format::HostCluster fresh, refcounts_->Allocate(1));
  current_ = fresh;
  current_end_ = length;
  format::HostOffset start = geometry_.host_offset(fresh);
  high_water_ = std::max(high_water_, start.value() + length);
  return start;
}

Result<std::optional<format::HostOffset>> CompressedPlacement::AllocateInHole(uint64_t length) {
  const uint64_t cluster_size = geometry_.cluster_size();
  Hole* best = nullptr;
  for (Hole& hole : holes_) {
    if (hole.end + length <= cluster_size && (best == nullptr || hole.end > best->end)) {
      best = &hole;
    }
  }
  if (best == nullptr) return std::optional<format::HostOffset>();
  ZQ_ASSIGN_OR_RETURN(uint64_t refcount, refcounts_->Get(best->cluster));
  if (refcount >= refcounts_->geometry().max_refcount()) {
    return std::optional<format::HostOffset>();
  }
  ZQ_RETURN_IF_ERROR(refcounts_->Increment(best->cluster));
  format::HostOffset start = geometry_.host_offset(best->cluster) + best->end;
  best->end += length;
  if (best->end == cluster_size) {  // full: nothing to close
    *best = holes_.back();
    holes_.pop_back();
  }
  return std::optional<format::HostOffset>(start);
}

Status CompressedPlacement::EndBatch() {
  in_batch_ = false;
  Status status;
  for (const Hole& hole : holes_) {
    Status closed = CloseCluster(hole.cluster, hole.end);
    if (status.ok()) status = closed;
  }
  holes_.clear();
  return status;
}

Result<format::HostOffset> CompressedPlacement::Allocate(uint64_t length) {
  const uint64_t cluster_size = geometry_.cluster_size();
  if (!holes_.empty()) {
    ZQ_ASSIGN_OR_RETURN(std::optional<format::HostOffset> in_hole, AllocateInHole(length));
    if (in_hole) return *in_hole;
  }
  if (!current_ || current_end_ >= cluster_size) return StartFresh(length);
  ZQ_ASSIGN_OR_RETURN(uint64_t refcount, refcounts_->Get(*current_));
  if (refcount >= refcounts_->geometry().max_refcount()) {
    return StartFresh(length, /*may_be_hole=*/false);
  }

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
      return Status::Corruption("compressed placement: expected host cluster " +
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

void CompressedPlacement::OnClusterFreed(format::HostCluster cluster) {
  if (current_ && *current_ == cluster) current_.reset();
  std::erase_if(holes_, [cluster](const Hole& hole) { return hole.cluster == cluster; });
  store_->Discard(geometry_.host_offset(cluster).value());
}

Status CompressedPlacement::PlaceBatch(std::span<const CompressedCluster> clusters,
                                       std::span<format::HostOffset> hosts) {
  // One batch: a piece may fill the tail of a cluster an earlier piece of the batch had to
  // leave behind.
  BeginBatch();
  Status placed_all;
  for (size_t i = 0; i < clusters.size() && placed_all.ok(); ++i) {
    Result<format::HostOffset> placed = Allocate(clusters[i].data.size());
    placed_all = placed.status();
    if (placed.ok()) hosts[i] = *placed;
  }
  Status ended = EndBatch();
  return placed_all.ok() ? ended : placed_all;
}

}  // namespace zqcow::qcow2
