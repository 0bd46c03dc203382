// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "backup/image_digest.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "zqcow/image.h"

namespace zqcow::backup {
namespace {

// Guest bytes mapped per Map call and read per Read call: bounds verify's memory.
constexpr uint64_t kMapWindowBytes = uint64_t{1} << 30;
constexpr uint64_t kReadBytes = uint64_t{1} << 20;

}  // namespace

Result<digest::ContentDigest> DigestImageClusters(const std::string& path, ClustersToHash which) {
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Image> image, Image::Open(path, OpenOptions{}));
  const uint64_t virtual_size = image->virtual_size();
  const uint64_t cluster_size = image->cluster_size();
  const uint64_t read_clusters = std::max<uint64_t>(1, kReadBytes / cluster_size);
  std::vector<uint8_t> buffer(read_clusters * cluster_size);
  digest::ContentDigest result;
  for (uint64_t window = 0; window < virtual_size; window += kMapWindowBytes) {
    const uint64_t length = std::min(kMapWindowBytes, virtual_size - window);
    ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> extents, image->Map(window, length));
    for (const MapExtent& extent : extents) {
      if (extent.depth != 0 || extent.kind == MapExtent::Kind::kUnallocated) continue;
      // Allocation is per cluster: an extent of the image's own starts on a cluster and
      // ends on one or at the virtual size.
      const uint64_t first = extent.guest_offset / cluster_size;
      const uint64_t end = (extent.guest_offset + extent.length + cluster_size - 1) / cluster_size;
      if (extent.kind == MapExtent::Kind::kZero) {
        for (uint64_t cluster = first; cluster < end; ++cluster) {
          result.Add(digest::ZeroClusterHash(cluster, static_cast<uint32_t>(cluster_size)));
        }
        continue;
      }
      if (which == ClustersToHash::kZeroOnly) continue;
      for (uint64_t cluster = first; cluster < end; cluster += read_clusters) {
        const uint64_t count = std::min(read_clusters, end - cluster);
        const uint64_t offset = cluster * cluster_size;
        const uint64_t bytes = std::min(count * cluster_size, virtual_size - offset);
        ZQ_RETURN_IF_ERROR(image->Read(offset, {buffer.data(), bytes}));
        std::memset(buffer.data() + bytes, 0, count * cluster_size - bytes);  // pad the last
        for (uint64_t i = 0; i < count; ++i) {
          result.Add(digest::ClusterHash(
              cluster + i, {buffer.data() + i * cluster_size, static_cast<size_t>(cluster_size)}));
        }
      }
    }
  }
  ZQ_RETURN_IF_ERROR(image->Close());
  return result;
}

}  // namespace zqcow::backup
