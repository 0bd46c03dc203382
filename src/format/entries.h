// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// L1 and L2 table entries (64-bit big-endian words).
//
// L1 entry: bits 9..55 offset of the L2 table (cluster aligned), bit 63 COPIED.
// Standard L2 entry: bit 0 "reads as zero" (v3), bits 9..55 host cluster offset,
//   bit 62 = 0, bit 63 COPIED (refcount is exactly 1).
// Compressed L2 entry: bit 62 = 1. With x = 62 - (cluster_bits - 8):
//   bits 0..x-1  host BYTE offset of the compressed data,
//   bits x..61   additional 512-byte sectors beyond the first: ((off+len-1)>>9) - (off>>9).
//   Never COPIED.

#ifndef ZQCOW_FORMAT_ENTRIES_H_
#define ZQCOW_FORMAT_ENTRIES_H_

#include <cstdint>

#include "format/types.h"
#include "zqcow/status.h"

namespace zqcow::format {

inline constexpr uint64_t kEntryCopied = 1ull << 63;
inline constexpr uint64_t kEntryCompressed = 1ull << 62;
inline constexpr uint64_t kEntryZero = 1ull << 0;
inline constexpr uint64_t kEntryOffsetMask = 0x00fffffffffffe00ull;  // bits 9..55
// Bits that must be zero: L1 entries bits 0..8 and 56..62; standard L2 entries bits 1..8
// and 56..61. (Compressed L2 entries have no reserved bits besides bit 63.)
inline constexpr uint64_t kL1ReservedMask = ~(kEntryOffsetMask | kEntryCopied);
inline constexpr uint64_t kL2StandardReservedMask =
    ~(kEntryOffsetMask | kEntryCopied | kEntryCompressed | kEntryZero);

// Field positions of a compressed descriptor: x = 62 - (cluster_bits - 8).
constexpr uint32_t CompressedOffsetBits(const Geometry& geometry) {
  return 62 - (geometry.cluster_bits - 8);
}
// Largest value of the "additional sectors" field.
constexpr uint64_t CompressedSectorsMask(const Geometry& geometry) {
  return (uint64_t{1} << (geometry.cluster_bits - 8)) - 1;
}

struct L1Entry {
  HostOffset l2_offset;  // 0 = no L2 table
  bool copied = false;
};
// Rejects reserved bits set and offsets not aligned to the cluster.
Result<L1Entry> DecodeL1Entry(uint64_t raw, const Geometry& geometry);
uint64_t EncodeL1Entry(const L1Entry& entry);

struct L2Entry {
  enum class Kind : uint8_t { kUnallocated, kZero, kNormal, kCompressed };
  Kind kind = Kind::kUnallocated;
  // kNormal: host cluster offset (kZero may carry a preallocated one, else 0).
  // kCompressed: host byte offset of the compressed data.
  HostOffset host_offset;
  // kCompressed: bytes readers must read from host_offset, i.e. up to the end of the last
  // sector the descriptor names: (nb_csectors + 1) * 512 - (host_offset & 511).
  uint64_t compressed_span = 0;
  // Bit 63. For kCompressed it must be 0: decoding reports it, check counts it as corruption.
  bool copied = false;
};
// Rejects reserved bits, unaligned normal (and preallocated zero) offsets. Compressed:
// offset/sector fields as the descriptor above. The zero flag is decoded in v2 images too
// (QEMU does the same).
Result<L2Entry> DecodeL2Entry(uint64_t raw, const Geometry& geometry);

// Extended L2 entries (incompatible feature bit 4): each guest cluster has 32 subclusters;
// the entry's second word is a bitmap, bits 0..31 "subcluster i is allocated" (its data at
// host_offset + i * subcluster size), bits 32..63 "subcluster i reads as zeros"; a
// subcluster with neither bit reads from the backing file (or as zeros without one). Bit 0
// of the first word (the standard zero flag) is reserved then. A compressed cluster is
// compressed whole; its bitmap is ignored, as QEMU does.
inline constexpr uint32_t kSubclustersPerCluster = 32;

// What subclusters [first, first + count) of one extended entry are: they all have `kind`
// (kUnallocated, kZero or kNormal). kCompressed covers the whole cluster.
struct SubclusterRun {
  L2Entry::Kind kind = L2Entry::Kind::kUnallocated;
  uint32_t count = 0;
};
// Decodes an extended entry (`raw` as DecodeL2Entry, plus `bitmap`): rejects the reserved
// zero flag, a subcluster both allocated and zero, and allocated subclusters without a host
// cluster. The returned kind is kCompressed, kNormal (has a host cluster) or kUnallocated
// (none; subclusters may still read as zeros).
Result<L2Entry> DecodeExtendedL2Entry(uint64_t raw, uint64_t bitmap, const Geometry& geometry);
// The run of subclusters of one kind starting at subcluster `first` (< 32) of an entry that
// DecodeExtendedL2Entry accepted.
SubclusterRun SubclustersAt(const L2Entry& entry, uint64_t bitmap, uint32_t first);

uint64_t EncodeUnallocatedL2Entry();
uint64_t EncodeZeroL2Entry();  // v3 only: "reads as zero", no host cluster
uint64_t EncodeNormalL2Entry(HostOffset host_cluster_offset, bool copied);
// REQUIRES: 0 < length < cluster size; host_offset fits in x bits.
uint64_t EncodeCompressedL2Entry(HostOffset host_offset, uint64_t length, const Geometry& geometry);

// Host clusters a compressed cluster's data touches: first and last (inclusive), from the
// descriptor's byte offset and its sector span. Every one of them holds one reference.
struct HostClusterRange {
  HostCluster first;
  HostCluster last;
};
HostClusterRange CompressedHostClusters(const L2Entry& entry, const Geometry& geometry);

}  // namespace zqcow::format

#endif  // ZQCOW_FORMAT_ENTRIES_H_
