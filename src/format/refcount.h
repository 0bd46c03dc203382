// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Refcount table and refcount blocks. The refcount table is an array of 64-bit big-endian
// offsets of refcount blocks (bits 9..63; 0 = not allocated, low 9 bits reserved). A
// refcount block is one cluster holding cluster_size * 8 / refcount_bits entries of
// refcount_bits = 1 << refcount_order bits each, big-endian, packed (for widths below 8
// bits, entry 0 is the least significant bits of byte 0).

#ifndef ZQCOW_FORMAT_REFCOUNT_H_
#define ZQCOW_FORMAT_REFCOUNT_H_

#include <cstdint>
#include <span>

#include "format/types.h"
#include "zqcow/status.h"

namespace zqcow::format {

inline constexpr uint32_t kMaxRefcountOrder = 6;

struct RefcountGeometry {
  uint32_t cluster_bits = 16;
  uint32_t refcount_order = 4;

  constexpr uint32_t refcount_bits() const { return 1u << refcount_order; }
  constexpr uint64_t max_refcount() const {
    return refcount_order == 6 ? ~uint64_t{0} : (uint64_t{1} << refcount_bits()) - 1;
  }
  // log2 of the entries in one refcount block.
  constexpr uint32_t block_entry_bits() const { return cluster_bits + 3 - refcount_order; }
  constexpr uint64_t block_entries() const { return uint64_t{1} << block_entry_bits(); }
  // Which refcount table slot and which entry in that block describe host cluster c.
  constexpr uint64_t table_index(HostCluster c) const { return c.value() >> block_entry_bits(); }
  constexpr uint64_t block_index(HostCluster c) const { return c.value() & (block_entries() - 1); }
};

// Entry `index` of a refcount block (`block` is one whole cluster).
uint64_t GetRefcount(std::span<const uint8_t> block, uint64_t index, uint32_t refcount_order);
// REQUIRES: value <= max_refcount().
void SetRefcount(std::span<uint8_t> block, uint64_t index, uint32_t refcount_order, uint64_t value);

// Refcount table entry: rejects set reserved bits (0..8) and offsets not cluster aligned.
Result<HostOffset> DecodeRefcountTableEntry(uint64_t raw, const Geometry& geometry);

}  // namespace zqcow::format

#endif  // ZQCOW_FORMAT_REFCOUNT_H_
