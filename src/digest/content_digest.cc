// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "digest/content_digest.h"

#include <isa-l/crc64.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cinttypes>
#include <cstdio>

namespace zqcow::digest {
namespace {

constexpr std::string_view kVersionPrefix = "v1:";
constexpr uint64_t kIndexSalt = 0x7a71636f77646967ull;  // "zqcowdig"
constexpr size_t kZeroBlock = 64 * 1024;

// SplitMix64's finaliser: a bijective mix, so distinct inputs stay distinct.
uint64_t Mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

uint64_t Combine(uint64_t cluster_index, uint64_t crc) {
  return Mix64(crc ^ Mix64(cluster_index ^ kIndexSalt));
}

bool ParseHex(std::string_view text, uint64_t& value) {
  if (text.size() != 16) return false;
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value, 16);
  return error == std::errc() && end == text.data() + text.size();
}

}  // namespace

uint64_t ClusterHash(uint64_t cluster_index, std::span<const uint8_t> content) {
  return Combine(cluster_index, crc64_ecma_refl(0, content.data(), content.size()));
}

uint64_t ZeroClusterHash(uint64_t cluster_index, uint32_t cluster_size) {
  static const std::array<uint8_t, kZeroBlock> zeros{};
  uint64_t crc = 0;
  for (uint64_t done = 0; done < cluster_size;) {
    const uint64_t length = std::min<uint64_t>(kZeroBlock, cluster_size - done);
    crc = crc64_ecma_refl(crc, zeros.data(), length);
    done += length;
  }
  return Combine(cluster_index, crc);
}

std::string ContentDigest::ToString() const {
  char text[80];
  std::snprintf(text, sizeof(text), "v1:%" PRIu64 ":%016" PRIx64 ":%016" PRIx64, clusters, sum,
                xor_all);
  return text;
}

Result<ContentDigest> ContentDigest::Parse(std::string_view text) {
  auto invalid = [&] {
    return Status::InvalidArgument("content digest '" + std::string(text) +
                                   "' is not of the form v1:COUNT:SUM:XOR");
  };
  if (!text.starts_with(kVersionPrefix)) return invalid();
  std::string_view rest = text.substr(kVersionPrefix.size());
  const size_t colon = rest.find(':');
  if (colon == std::string_view::npos || colon == 0) return invalid();
  ContentDigest digest;
  auto [end, error] = std::from_chars(rest.data(), rest.data() + colon, digest.clusters);
  if (error != std::errc() || end != rest.data() + colon) return invalid();
  rest = rest.substr(colon + 1);
  if (rest.size() != 33 || rest[16] != ':' || !ParseHex(rest.substr(0, 16), digest.sum) ||
      !ParseHex(rest.substr(17), digest.xor_all)) {
    return invalid();
  }
  return digest;
}

}  // namespace zqcow::digest
