// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow measure`: qemu-img measure's sizes for a qcow2 output (same formulas, so the same
// numbers), and an estimate of the compressed output's size from a random sample of the
// source's data clusters, compressed with the chosen codec.

#ifndef ZQCOW_TOOLS_MEASURE_H_
#define ZQCOW_TOOLS_MEASURE_H_

#include <cstdint>
#include <optional>

#include "convert/source.h"
#include "zqcow/convert.h"
#include "zqcow/status.h"

namespace zqcow::cli {

// QEMU's qcow2_calc_prealloc_size: the file size of a fully allocated image of
// `virtual_size` bytes (header, L1, every L2 table, refcount metadata, all data).
uint64_t FullyAllocatedSize(uint64_t virtual_size, uint64_t cluster_size, uint32_t refcount_bits);

struct CompressedEstimate {
  uint64_t estimate = 0;  // bytes of the compressed image
  uint64_t low = 0;       // 95% interval (sampling error only)
  uint64_t high = 0;
  uint64_t sampled_clusters = 0;
};

struct Measurement {
  uint64_t required = 0;         // qemu-img measure's "required size"
  uint64_t fully_allocated = 0;  // its "fully allocated size"
  uint64_t data_clusters = 0;    // clusters (of the output's size) holding data
  std::optional<CompressedEstimate> compressed;
};

// Measures `source` (nullptr: an empty image of `virtual_size`, as --size) for an output
// with options.cluster_size / refcount_bits; with options.compress, also estimates the
// compressed size from `sample_clusters` clusters picked at random (a fixed seed: the same
// source gives the same estimate) and compressed with options.compression/level.
Result<Measurement> Measure(convert::Source* source, uint64_t virtual_size,
                            const ConvertOptions& options, uint64_t sample_clusters);

}  // namespace zqcow::cli

#endif  // ZQCOW_TOOLS_MEASURE_H_
