// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Strong types for the three kinds of numbers that are easy to mix up: guest offsets (in
// the virtual disk), host offsets (in the image file) and cluster indices. Each wraps a
// uint64_t; converting between them takes an explicit call.

#ifndef ZQCOW_FORMAT_TYPES_H_
#define ZQCOW_FORMAT_TYPES_H_

#include <compare>
#include <cstdint>

namespace zqcow::format {

template <class Tag>
class Strong64 {
 public:
  constexpr Strong64() = default;
  constexpr explicit Strong64(uint64_t value) : value_(value) {}
  constexpr uint64_t value() const { return value_; }
  constexpr auto operator<=>(const Strong64&) const = default;
  constexpr Strong64 operator+(uint64_t delta) const { return Strong64(value_ + delta); }
  constexpr Strong64 operator-(uint64_t delta) const { return Strong64(value_ - delta); }
  constexpr uint64_t operator-(Strong64 other) const { return value_ - other.value_; }

 private:
  uint64_t value_ = 0;
};

using GuestOffset = Strong64<struct GuestOffsetTag>;
using HostOffset = Strong64<struct HostOffsetTag>;
using GuestCluster = Strong64<struct GuestClusterTag>;  // guest offset >> cluster_bits
using HostCluster = Strong64<struct HostClusterTag>;    // host offset >> cluster_bits

// The sizes everything else is derived from.
struct Geometry {
  uint32_t cluster_bits = 16;
  // Extended L2 entries (incompatible feature bit 4): 16 bytes each, the standard 64-bit
  // descriptor followed by the subcluster bitmap (format/entries.h).
  bool extended_l2 = false;

  constexpr uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  constexpr uint64_t offset_in_cluster(uint64_t offset) const { return offset & (cluster_size() - 1); }
  // Bytes of one L2 entry: 8, or 16 with extended L2 entries.
  constexpr uint64_t l2_entry_bytes() const { return extended_l2 ? 16 : 8; }
  // Entries in one L2 table (a table is one cluster of entries).
  constexpr uint64_t l2_entries() const { return cluster_size() / l2_entry_bytes(); }
  constexpr uint32_t l2_bits() const { return cluster_bits - (extended_l2 ? 4 : 3); }

  constexpr GuestCluster guest_cluster(GuestOffset g) const { return GuestCluster(g.value() >> cluster_bits); }
  constexpr HostCluster host_cluster(HostOffset h) const { return HostCluster(h.value() >> cluster_bits); }
  constexpr HostOffset host_offset(HostCluster c) const { return HostOffset(c.value() << cluster_bits); }
  constexpr GuestOffset guest_offset(GuestCluster c) const { return GuestOffset(c.value() << cluster_bits); }
  constexpr uint64_t l1_index(GuestOffset g) const { return g.value() >> (cluster_bits + l2_bits()); }
  constexpr uint64_t l2_index(GuestOffset g) const { return (g.value() >> cluster_bits) & (l2_entries() - 1); }
  // L1 entries needed to map `virtual_size` bytes.
  constexpr uint64_t l1_size_for(uint64_t virtual_size) const {
    uint64_t per_l1 = uint64_t{1} << (cluster_bits + l2_bits());
    return virtual_size / per_l1 + (virtual_size % per_l1 != 0);  // no overflow near 2^64
  }
};

inline constexpr uint32_t kMinClusterBits = 9;   // 512 B
inline constexpr uint32_t kMaxClusterBits = 21;  // 2 MiB
inline constexpr uint32_t kSectorSize = 512;

}  // namespace zqcow::format

#endif  // ZQCOW_FORMAT_TYPES_H_
