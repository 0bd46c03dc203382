// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Reading images with extended L2 entries (subclusters; format/entries.h): every guest
// cluster is 32 subclusters, each allocated (its bytes at the same offset in the host
// cluster), zero, or unallocated (read through to the backing file). Such images are
// opened read only (qcow2_open.cc), so nothing here writes.

#include <algorithm>
#include <cstring>
#include <mutex>

#include "format/entries.h"
#include "qcow2/qcow2_engine.h"

namespace zqcow::qcow2 {

using format::GuestCluster;
using format::L2Entry;

Status Qcow2Image::ReadExtended(uint64_t guest_offset, std::span<uint8_t> out) {
  const uint64_t subcluster_size = cluster_size_ / format::kSubclustersPerCluster;
  uint64_t done = 0;
  while (done < out.size()) {
    const uint64_t offset = guest_offset + done;
    const uint64_t in_cluster = geometry_.offset_in_cluster(offset);
    const uint64_t n = std::min<uint64_t>(out.size() - done, cluster_size_ - in_cluster);
    const uint64_t cluster_start = offset - in_cluster;
    ClusterMap::ExtendedEntry raw;
    {
      std::lock_guard lock(mutex_);
      if (closed_) return Error("image is closed");
      ZQ_ASSIGN_OR_RETURN(raw, cluster_map_->GetExtendedEntry(
                                   GuestCluster(offset >> geometry_.cluster_bits),
                                   HostLimitLocked()));
    }
    auto decoded = format::DecodeExtendedL2Entry(raw.raw, raw.bitmap, geometry_);
    if (!decoded.ok()) return decoded.status().WithPrefix(path_);
    const L2Entry& entry = *decoded;
    if (entry.kind == L2Entry::Kind::kCompressed) {
      ZQ_RETURN_IF_ERROR(ReadFromEntry(raw.raw, offset, out.subspan(done, n)));
      done += n;
      continue;
    }
    uint64_t pos = in_cluster;
    while (pos < in_cluster + n) {
      const auto first = static_cast<uint32_t>(pos / subcluster_size);
      const format::SubclusterRun run = format::SubclustersAt(entry, raw.bitmap, first);
      const uint64_t run_end =
          std::min<uint64_t>((first + run.count) * subcluster_size, in_cluster + n);
      std::span<uint8_t> part = out.subspan(done + (pos - in_cluster), run_end - pos);
      switch (run.kind) {
        case L2Entry::Kind::kNormal:
          ZQ_RETURN_IF_ERROR(store_->Read(entry.host_offset.value() + pos, part));
          break;
        case L2Entry::Kind::kZero:
          std::memset(part.data(), 0, part.size());
          break;
        default:  // kUnallocated (kCompressed was handled above)
          ZQ_RETURN_IF_ERROR(ReadUnallocated(cluster_start + pos, part));
          break;
      }
      pos = run_end;
    }
    done += n;
  }
  return Status::OK();
}

Result<Qcow2Image::MapStep> Qcow2Image::LookUpExtendedLocked(uint64_t offset, uint64_t end) {
  ZQ_ASSIGN_OR_RETURN(ClusterMap::ExtendedEntry raw,
                      cluster_map_->GetExtendedEntry(
                          GuestCluster(offset >> geometry_.cluster_bits), HostLimitLocked()));
  auto decoded = format::DecodeExtendedL2Entry(raw.raw, raw.bitmap, geometry_);
  if (!decoded.ok()) return decoded.status().WithPrefix(path_);
  const uint64_t subcluster_size = cluster_size_ / format::kSubclustersPerCluster;
  const uint64_t in_cluster = geometry_.offset_in_cluster(offset);
  const auto first = static_cast<uint32_t>(in_cluster / subcluster_size);
  const format::SubclusterRun run = format::SubclustersAt(*decoded, raw.bitmap, first);
  MapStep step;
  step.entry = *decoded;
  step.entry.kind = run.kind;
  step.length = std::min(end - offset, (first + run.count) * subcluster_size - in_cluster);
  return step;
}

}  // namespace zqcow::qcow2
