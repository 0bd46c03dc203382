// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// ClusterStore: choosing the strategy (see cluster_store.h).

#include "qcow2/cluster_store.h"

#include <algorithm>
#include <cassert>

#include "qcow2/assembling_store.h"

namespace zqcow::qcow2 {

// write_through_store.cc
std::unique_ptr<ClusterStore> MakeWriteThroughStore(io::File* file, uint32_t cluster_size,
                                                    const ClusterStore::Options& options);

namespace {

constexpr uint32_t kMinClusterSize = 512;
constexpr uint32_t kMaxClusterSize = 2U << 20;

}  // namespace

ClusterStore::Options ClusterStore::OptionsFor(const IoOptions& io, const io::File& file,
                                               uint32_t cluster_size) {
  Options options;
  switch (io.write_cache) {
    case IoOptions::WriteCache::kOn:
      options.strategy = Strategy::kAssemble;
      break;
    case IoOptions::WriteCache::kOff:
      options.strategy = Strategy::kWriteThrough;
      break;
    case IoOptions::WriteCache::kAuto:
      // Dropping written data from the page cache costs a sync per write: assembled, that
      // is one per finished run of host clusters, not one per compressed cluster.
      options.strategy = file.direct_io() || io.drop_page_cache ? Strategy::kAssemble
                                                                : Strategy::kWriteThrough;
      break;
  }
  options.max_clusters = std::max<size_t>(1, io.write_cache_bytes / cluster_size);
  options.drop_page_cache = io.drop_page_cache;
  return options;
}

std::unique_ptr<ClusterStore> ClusterStore::Create(io::File* file, uint32_t cluster_size,
                                                   const Options& options) {
  assert(file != nullptr);
  assert(cluster_size >= kMinClusterSize && cluster_size <= kMaxClusterSize &&
         (cluster_size & (cluster_size - 1)) == 0);
  (void)kMinClusterSize;
  (void)kMaxClusterSize;
  // A direct write can never be smaller than the file's alignment: a cluster smaller than
  // that cannot be assembled on its own (the image never opens such a file O_DIRECT).
  if (options.strategy == Strategy::kAssemble && file->alignment() <= cluster_size) {
    return std::make_unique<AssemblingStore>(file, cluster_size, options);
  }
  return MakeWriteThroughStore(file, cluster_size, options);
}

}  // namespace zqcow::qcow2
