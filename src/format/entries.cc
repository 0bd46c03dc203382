// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/entries.h"

#include <cstdio>
#include <string>

namespace zqcow::format {
namespace {

std::string Hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof(buf), "0x%016llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

Result<L1Entry> DecodeL1Entry(uint64_t raw, const Geometry& geometry) {
  if (raw & kL1ReservedMask) {
    return Status::Corruption("L1 entry " + Hex(raw) + " has reserved bits set");
  }
  L1Entry entry;
  entry.l2_offset = HostOffset(raw & kEntryOffsetMask);
  entry.copied = (raw & kEntryCopied) != 0;
  if (geometry.offset_in_cluster(entry.l2_offset.value()) != 0) {
    return Status::Corruption("L1 entry " + Hex(raw) + ": L2 table offset is not cluster aligned");
  }
  return entry;
}

uint64_t EncodeL1Entry(const L1Entry& entry) {
  return (entry.l2_offset.value() & kEntryOffsetMask) | (entry.copied ? kEntryCopied : 0);
}

Result<L2Entry> DecodeL2Entry(uint64_t raw, const Geometry& geometry) {
  L2Entry entry;
  entry.copied = (raw & kEntryCopied) != 0;
  if (raw & kEntryCompressed) {
    const uint32_t offset_bits = CompressedOffsetBits(geometry);
    const uint64_t offset = raw & ((uint64_t{1} << offset_bits) - 1);
    const uint64_t extra_sectors = (raw >> offset_bits) & CompressedSectorsMask(geometry);
    entry.kind = L2Entry::Kind::kCompressed;
    entry.host_offset = HostOffset(offset);
    entry.compressed_span = (extra_sectors + 1) * kSectorSize - (offset % kSectorSize);
    return entry;
  }
  if (raw & kL2StandardReservedMask) {
    return Status::Corruption("L2 entry " + Hex(raw) + " has reserved bits set");
  }
  const uint64_t offset = raw & kEntryOffsetMask;
  if (geometry.offset_in_cluster(offset) != 0) {
    return Status::Corruption("L2 entry " + Hex(raw) + ": cluster offset is not cluster aligned");
  }
  entry.host_offset = HostOffset(offset);
  if (raw & kEntryZero) {
    entry.kind = L2Entry::Kind::kZero;
  } else if (offset == 0) {
    entry.kind = L2Entry::Kind::kUnallocated;
  } else {
    entry.kind = L2Entry::Kind::kNormal;
  }
  return entry;
}

Result<L2Entry> DecodeExtendedL2Entry(uint64_t raw, uint64_t bitmap, const Geometry& geometry) {
  if ((raw & kEntryCompressed) == 0 && (raw & kEntryZero) != 0) {
    return Status::Corruption("extended L2 entry " + Hex(raw) +
                              " has the reserved bit 0 (zero flag) set");
  }
  ZQ_ASSIGN_OR_RETURN(L2Entry entry, DecodeL2Entry(raw, geometry));
  if (entry.kind == L2Entry::Kind::kCompressed) return entry;
  const uint32_t allocated = static_cast<uint32_t>(bitmap);
  const uint32_t zero = static_cast<uint32_t>(bitmap >> 32);
  if ((allocated & zero) != 0) {
    return Status::Corruption("extended L2 entry " + Hex(raw) + " bitmap " + Hex(bitmap) +
                              ": subclusters both allocated and zero");
  }
  if (entry.kind == L2Entry::Kind::kUnallocated && allocated != 0) {
    return Status::Corruption("extended L2 entry " + Hex(raw) + " bitmap " + Hex(bitmap) +
                              ": allocated subclusters without a host cluster");
  }
  return entry;
}

SubclusterRun SubclustersAt(const L2Entry& entry, uint64_t bitmap, uint32_t first) {
  if (entry.kind == L2Entry::Kind::kCompressed) {
    return {L2Entry::Kind::kCompressed, kSubclustersPerCluster - first};
  }
  const uint32_t allocated = static_cast<uint32_t>(bitmap);
  const uint32_t zero = static_cast<uint32_t>(bitmap >> 32);
  auto kind_of = [&](uint32_t i) {
    if (allocated & (1u << i)) return L2Entry::Kind::kNormal;
    if (zero & (1u << i)) return L2Entry::Kind::kZero;
    return L2Entry::Kind::kUnallocated;
  };
  const L2Entry::Kind kind = kind_of(first);
  uint32_t end = first + 1;
  while (end < kSubclustersPerCluster && kind_of(end) == kind) ++end;
  return {kind, end - first};
}

uint64_t EncodeUnallocatedL2Entry() { return 0; }

uint64_t EncodeZeroL2Entry() { return kEntryZero; }

uint64_t EncodeNormalL2Entry(HostOffset host_cluster_offset, bool copied) {
  return (host_cluster_offset.value() & kEntryOffsetMask) | (copied ? kEntryCopied : 0);
}

uint64_t EncodeCompressedL2Entry(HostOffset host_offset, uint64_t length,
                                 const Geometry& geometry) {
  const uint64_t offset = host_offset.value();
  const uint64_t extra_sectors = (offset + length - 1) / kSectorSize - offset / kSectorSize;
  const uint32_t offset_bits = CompressedOffsetBits(geometry);
  return kEntryCompressed | ((extra_sectors & CompressedSectorsMask(geometry)) << offset_bits) |
         (offset & ((uint64_t{1} << offset_bits) - 1));
}

HostClusterRange CompressedHostClusters(const L2Entry& entry, const Geometry& geometry) {
  const uint64_t first = entry.host_offset.value();
  const uint64_t last = first + (entry.compressed_span > 0 ? entry.compressed_span - 1 : 0);
  return {geometry.host_cluster(HostOffset(first)), geometry.host_cluster(HostOffset(last))};
}

}  // namespace zqcow::format
