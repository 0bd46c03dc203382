// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Fuzzes the table-entry codecs for every cluster size and refcount width: L1/L2 entry
// decoding, the host clusters a compressed descriptor touches, refcount table entries and
// refcount block Get/Set. Properties checked besides "no crash":
// - decoded offsets stay inside the 56-bit offset space and are aligned as the format says;
// - a normal L2 entry and an L1 entry re-encode to the same 64-bit word (minus nothing);
// - CompressedHostClusters covers the descriptor's span, first <= last;
// - SetRefcount then GetRefcount returns the value and leaves the neighbours untouched.

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#include "format/entries.h"
#include "format/refcount.h"
#include "format/types.h"
#include "fuzz_require.h"

namespace {

namespace format = zqcow::format;

// Largest cluster whose refcount block the fuzzer materialises (64 KiB keeps runs fast; the
// bit arithmetic does not depend on the block size beyond the entry count).
constexpr uint32_t kMaxFuzzedBlockBits = 16;

void FuzzEntries(uint32_t cluster_bits, uint64_t raw) {
  const format::Geometry geometry{cluster_bits};
  auto l1 = format::DecodeL1Entry(raw, geometry);
  if (l1.ok()) {
    FUZZ_REQUIRE(l1->l2_offset.value() % geometry.cluster_size() == 0);
    FUZZ_REQUIRE((l1->l2_offset.value() & ~format::kEntryOffsetMask) == 0);
    auto again = format::DecodeL1Entry(format::EncodeL1Entry(*l1), geometry);
    FUZZ_REQUIRE(again.ok() && again->l2_offset == l1->l2_offset && again->copied == l1->copied);
  }
  auto l2 = format::DecodeL2Entry(raw, geometry);
  if (!l2.ok()) return;
  switch (l2->kind) {
    case format::L2Entry::Kind::kNormal: {
      FUZZ_REQUIRE(l2->host_offset.value() % geometry.cluster_size() == 0);
      FUZZ_REQUIRE(l2->host_offset.value() != 0);
      auto again =
          format::DecodeL2Entry(format::EncodeNormalL2Entry(l2->host_offset, l2->copied), geometry);
      FUZZ_REQUIRE(again.ok() && again->kind == format::L2Entry::Kind::kNormal &&
                   again->host_offset == l2->host_offset && again->copied == l2->copied);
      break;
    }
    case format::L2Entry::Kind::kCompressed: {
      // COPIED is never valid here; a decoder that accepts it must say so (check flags it).
      FUZZ_REQUIRE(l2->copied == ((raw & format::kEntryCopied) != 0));
      FUZZ_REQUIRE(l2->compressed_span > 0);
      // At most 2^(cluster_bits - 8) sectors can be named.
      FUZZ_REQUIRE(l2->compressed_span <=
                   (uint64_t{1} << (cluster_bits - 8)) * format::kSectorSize);
      const format::HostClusterRange range = format::CompressedHostClusters(*l2, geometry);
      FUZZ_REQUIRE(range.first <= range.last);
      FUZZ_REQUIRE(range.first == geometry.host_cluster(l2->host_offset));
      FUZZ_REQUIRE(range.last ==
                   geometry.host_cluster(l2->host_offset + (l2->compressed_span - 1)));
      break;
    }
    case format::L2Entry::Kind::kZero:
    case format::L2Entry::Kind::kUnallocated:
      break;
  }
  auto refcount_table_entry = format::DecodeRefcountTableEntry(raw, geometry);
  if (refcount_table_entry.ok()) {
    FUZZ_REQUIRE(refcount_table_entry->value() % geometry.cluster_size() == 0);
  }
}

void FuzzRefcounts(FuzzedDataProvider& provider, uint32_t cluster_bits, uint32_t order) {
  const format::RefcountGeometry geometry{cluster_bits, order};
  std::vector<uint8_t> block = provider.ConsumeBytes<uint8_t>(
      geometry.block_entries() == 0 ? 0 : (size_t{1} << cluster_bits));
  block.resize(size_t{1} << cluster_bits);
  const uint64_t entries = geometry.block_entries();
  while (provider.remaining_bytes() > 0) {
    const uint64_t index = provider.ConsumeIntegralInRange<uint64_t>(0, entries - 1);
    const uint64_t value = provider.ConsumeIntegral<uint64_t>() & geometry.max_refcount();
    const uint64_t before = index > 0 ? format::GetRefcount(block, index - 1, order) : 0;
    const uint64_t after = index + 1 < entries ? format::GetRefcount(block, index + 1, order) : 0;
    FUZZ_REQUIRE(format::GetRefcount(block, index, order) <= geometry.max_refcount());
    format::SetRefcount(block, index, order, value);
    FUZZ_REQUIRE(format::GetRefcount(block, index, order) == value);
    if (index > 0) FUZZ_REQUIRE(format::GetRefcount(block, index - 1, order) == before);
    if (index + 1 < entries) FUZZ_REQUIRE(format::GetRefcount(block, index + 1, order) == after);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider provider(data, size);
  const uint32_t cluster_bits =
      provider.ConsumeIntegralInRange<uint32_t>(format::kMinClusterBits, format::kMaxClusterBits);
  const uint32_t order = provider.ConsumeIntegralInRange<uint32_t>(0, format::kMaxRefcountOrder);
  for (int i = 0; i < 8 && provider.remaining_bytes() >= sizeof(uint64_t); ++i) {
    FuzzEntries(cluster_bits, provider.ConsumeIntegral<uint64_t>());
  }
  FuzzRefcounts(provider, cluster_bits < kMaxFuzzedBlockBits ? cluster_bits : kMaxFuzzedBlockBits,
                order);
  return 0;
}
