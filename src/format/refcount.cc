// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/refcount.h"

#include <cassert>
#include <cstdio>
#include <string>

#include "format/endian.h"

namespace zqcow::format {
namespace {

constexpr uint32_t kByteOrder = 3;  // refcount_order of 8-bit entries
constexpr uint64_t kRefcountTableReservedMask = (uint64_t{1} << 9) - 1;  // bits 0..8

// Where entry `index` sits when several entries share a byte (refcount_order 0..2): entry 0
// in the least significant bits.
struct SubByteEntry {
  uint64_t byte;
  uint32_t shift;
  uint32_t mask;
};
SubByteEntry LocateSubByteEntry(uint64_t index, uint32_t refcount_order) {
  const uint32_t per_byte_bits = kByteOrder - refcount_order;
  return {index >> per_byte_bits,
          static_cast<uint32_t>(index & ((uint64_t{1} << per_byte_bits) - 1)) << refcount_order,
          (1u << (1u << refcount_order)) - 1};
}

}  // namespace

uint64_t GetRefcount(std::span<const uint8_t> block, uint64_t index, uint32_t refcount_order) {
  switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
      const SubByteEntry e = LocateSubByteEntry(index, refcount_order);
      assert(e.byte < block.size());
      return (block[e.byte] >> e.shift) & e.mask;
    }
    case 3:
      assert(index < block.size());
      return block[index];
    case 4:
      assert(index * 2 + 2 <= block.size());
      return LoadBE16(block.data() + index * 2);
    case 5:
      assert(index * 4 + 4 <= block.size());
      return LoadBE32(block.data() + index * 4);
    case 6:
      assert(index * 8 + 8 <= block.size());
      return LoadBE64(block.data() + index * 8);
    default:
      assert(false && "refcount_order above 6");
      return 0;
  }
}

void SetRefcount(std::span<uint8_t> block, uint64_t index, uint32_t refcount_order,
                 uint64_t value) {
  switch (refcount_order) {
    case 0:
    case 1:
    case 2: {
      const SubByteEntry e = LocateSubByteEntry(index, refcount_order);
      assert(e.byte < block.size());
      assert(value <= e.mask);
      block[e.byte] = static_cast<uint8_t>((block[e.byte] & ~(e.mask << e.shift)) |
                                           ((static_cast<uint32_t>(value) & e.mask) << e.shift));
      return;
    }
    case 3:
      assert(index < block.size() && value <= UINT8_MAX);
      block[index] = static_cast<uint8_t>(value);
      return;
    case 4:
      assert(index * 2 + 2 <= block.size() && value <= UINT16_MAX);
      StoreBE16(block.data() + index * 2, static_cast<uint16_t>(value));
      return;
    case 5:
      assert(index * 4 + 4 <= block.size() && value <= UINT32_MAX);
      StoreBE32(block.data() + index * 4, static_cast<uint32_t>(value));
      return;
    case 6:
      assert(index * 8 + 8 <= block.size());
      StoreBE64(block.data() + index * 8, value);
      return;
    default:
      assert(false && "refcount_order above 6");
  }
}

Result<HostOffset> DecodeRefcountTableEntry(uint64_t raw, const Geometry& geometry) {
  if (raw & kRefcountTableReservedMask) {
    char buf[64];
    snprintf(buf, sizeof(buf), "refcount table entry 0x%016llx has reserved bits set",
             static_cast<unsigned long long>(raw));
    return Status::Corruption(buf);
  }
  if (geometry.offset_in_cluster(raw) != 0) {
    char buf[80];
    snprintf(buf, sizeof(buf),
             "refcount table entry 0x%016llx: block offset is not cluster aligned",
             static_cast<unsigned long long>(raw));
    return Status::Corruption(buf);
  }
  return HostOffset(raw);
}

}  // namespace zqcow::format
