// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The content digest: what "the guest content an image holds" hashes to. Defined here and
// nowhere else. The conversion pipeline computes it over the clusters it writes with data,
// from the data it reads off the source (ConvertStats::content_digest); `zqcow backup` adds
// the image's zero clusters (they carry no data; see src/backup/backup.cc), and
// `zqcow verify` recomputes the whole from an image's own clusters.
//
// Definition (version 1). For an image with cluster size C, over the guest clusters the
// image itself allocates (data, compressed or zero-flag clusters; unallocated ones are not
// part of it):
//   content(i)  = the C bytes of guest cluster i: all zeros for a zero cluster, the last
//                 cluster of the disk padded with zeros to C bytes
//   crc(i)      = CRC-64/ECMA-182 (reflected, ISA-L's crc64_ecma_refl, initial value 0)
//                 of content(i)
//   hash(i)     = Mix64(crc(i) ^ Mix64(i ^ kIndexSalt)), Mix64 = SplitMix64's finaliser
// and the digest is (count, sum, xor) of hash(i) over those clusters: sum modulo 2^64 and
// xor, so clusters may be added in any order (pipeline workers finish out of order).
// Textual form: "v1:<count>:<sum as 16 hex digits>:<xor as 16 hex digits>".
//
// It detects accidental change (a flipped byte, a cluster lost, moved or added, an image of
// other content); it is an integrity check, not a cryptographic one: someone who wants to
// can forge content with the same digest.

#ifndef ZQCOW_DIGEST_CONTENT_DIGEST_H_
#define ZQCOW_DIGEST_CONTENT_DIGEST_H_

#include <atomic>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "zqcow/status.h"

namespace zqcow::digest {

// hash(i) of guest cluster `cluster_index` whose content is `content` (exactly the cluster
// size, the last cluster already padded with zeros).
uint64_t ClusterHash(uint64_t cluster_index, std::span<const uint8_t> content);
// hash(i) of a cluster of `cluster_size` zero bytes, without needing the bytes.
uint64_t ZeroClusterHash(uint64_t cluster_index, uint32_t cluster_size);

struct ContentDigest {
  uint64_t clusters = 0;
  uint64_t sum = 0;
  uint64_t xor_all = 0;

  void Add(uint64_t cluster_hash) {
    ++clusters;
    sum += cluster_hash;
    xor_all ^= cluster_hash;
  }
  void Merge(const ContentDigest& other) {
    clusters += other.clusters;
    sum += other.sum;
    xor_all ^= other.xor_all;
  }
  bool operator==(const ContentDigest&) const = default;

  std::string ToString() const;
  // Parses ToString()'s form; kInvalidArgument otherwise.
  static Result<ContentDigest> Parse(std::string_view text);
};

// A ContentDigest many threads add to at once (lock-free).
class ConcurrentDigest {
 public:
  void Add(uint64_t cluster_hash) {
    clusters_.fetch_add(1, std::memory_order_relaxed);
    sum_.fetch_add(cluster_hash, std::memory_order_relaxed);
    xor_all_.fetch_xor(cluster_hash, std::memory_order_relaxed);
  }
  // REQUIRES: no Add() runs concurrently (e.g. after the adding threads were joined).
  ContentDigest value() const { return {clusters_.load(), sum_.load(), xor_all_.load()}; }

 private:
  std::atomic<uint64_t> clusters_{0};
  std::atomic<uint64_t> sum_{0};
  std::atomic<uint64_t> xor_all_{0};
};

}  // namespace zqcow::digest

#endif  // ZQCOW_DIGEST_CONTENT_DIGEST_H_
