// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Fuzzes format::ParseHeader with arbitrary bytes and arbitrary claimed file sizes. A header
// that parses must serialize again, and the serialized form must parse to the same geometry.
// Nothing may crash, read outside `bytes`, or allocate in proportion to a field's value.

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

#include "format/header.h"
#include "format/types.h"
#include "fuzz_require.h"

namespace {

using zqcow::format::Header;
using zqcow::format::ParseHeader;
using zqcow::format::SerializeHeader;

void CheckRoundTrip(const Header& header, uint64_t file_size) {
  auto serialized = SerializeHeader(header);
  if (!serialized.ok()) return;  // e.g. extensions that no longer fit: refusing is fine
  FUZZ_REQUIRE(serialized->size() <= header.cluster_size());
  auto reparsed = ParseHeader(*serialized, file_size);
  if (!reparsed.ok()) return;  // offsets may now point past a shorter prefix: no crash is enough
  FUZZ_REQUIRE(reparsed->version == header.version);
  FUZZ_REQUIRE(reparsed->cluster_bits == header.cluster_bits);
  FUZZ_REQUIRE(reparsed->size == header.size);
  FUZZ_REQUIRE(reparsed->l1_size == header.l1_size);
  FUZZ_REQUIRE(reparsed->l1_table_offset == header.l1_table_offset);
  FUZZ_REQUIRE(reparsed->refcount_table_offset == header.refcount_table_offset);
  FUZZ_REQUIRE(reparsed->refcount_order == header.refcount_order);
  FUZZ_REQUIRE(reparsed->compression_type == header.compression_type);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider provider(data, size);
  // The claimed file size comes from the END of the input (FuzzedDataProvider consumes
  // integers from the back), so the header bytes stay at the front where seeds put them.
  const uint64_t extra = provider.ConsumeIntegral<uint64_t>();
  const bool huge = provider.ConsumeBool();
  std::vector<uint8_t> bytes = provider.ConsumeRemainingBytes<uint8_t>();

  // The honest call: the whole "file" is in hand.
  auto header = ParseHeader(bytes, bytes.size());
  if (header.ok()) CheckRoundTrip(*header, bytes.size());

  // A file claimed longer than the bytes in hand (a short read of the first cluster), up to
  // the largest size a file can have.
  const uint64_t claimed = huge ? extra : bytes.size() + (extra & 0xffffffffu);
  auto header_long = ParseHeader(bytes, claimed < bytes.size() ? bytes.size() : claimed);
  if (header_long.ok()) {
    FUZZ_REQUIRE(header_long->cluster_bits >= zqcow::format::kMinClusterBits);
    FUZZ_REQUIRE(header_long->cluster_bits <= zqcow::format::kMaxClusterBits);
    FUZZ_REQUIRE(header_long->refcount_order <= 6);
  }
  return 0;
}
