// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "backup/image_digest.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "zqcow/image.h"

namespace zqcow::backup {
namespace {

// Guest bytes mapped per Map call and read per Read call: bounds verify's memory (one read
// buffer per thread, and the read list of one map window).
constexpr uint64_t kMapWindowBytes = uint64_t{1} << 30;
constexpr uint64_t kReadBytes = uint64_t{1} << 20;
constexpr unsigned kMaxThreads = 8;

struct ReadPiece {
  uint64_t first_cluster;
  uint64_t count;
};

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};

// Reads and hashes `pieces` on several threads (Image reads are thread safe; the digest is
// a sum over clusters, so the order does not matter). The first error wins.
Status HashPieces(Image& image, const std::vector<ReadPiece>& pieces, uint64_t cluster_size,
                  uint64_t read_clusters, digest::ContentDigest& result) {
  const uint64_t virtual_size = image.virtual_size();
  const unsigned threads = static_cast<unsigned>(std::min<uint64_t>(
      pieces.size(), std::clamp(std::thread::hardware_concurrency(), 1u, kMaxThreads)));
  std::atomic<size_t> next{0};
  std::mutex mutex;
  Status first_error;
  auto work = [&] {
    // Aligned for O_DIRECT images.
    std::unique_ptr<uint8_t, FreeDeleter> buffer(
        static_cast<uint8_t*>(std::aligned_alloc(4096, read_clusters * cluster_size)));
    digest::ContentDigest local;
    Status status = buffer ? Status::OK() : Status::NoSpace("out of memory for a read buffer");
    for (size_t i = next++; status.ok() && i < pieces.size(); i = next++) {
      const ReadPiece& piece = pieces[i];
      const uint64_t offset = piece.first_cluster * cluster_size;
      const uint64_t bytes = std::min(piece.count * cluster_size, virtual_size - offset);
      status = image.Read(offset, {buffer.get(), bytes});
      if (!status.ok()) break;
      std::memset(buffer.get() + bytes, 0, piece.count * cluster_size - bytes);  // pad the last
      for (uint64_t c = 0; c < piece.count; ++c) {
        local.Add(digest::ClusterHash(piece.first_cluster + c,
                                      {buffer.get() + c * cluster_size,
                                       static_cast<size_t>(cluster_size)}));
      }
    }
    std::lock_guard lock(mutex);
    if (!status.ok()) {
      if (first_error.ok()) first_error = status;
      next = pieces.size();
    }
    result.Merge(local);
  };
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < threads; ++t) pool.emplace_back(work);
  if (threads > 0) work();
  for (std::thread& thread : pool) thread.join();
  return first_error;
}

}  // namespace

Result<digest::ContentDigest> DigestImageClusters(const std::string& path, ClustersToHash which) {
  // O_DIRECT where the file system allows it: verifying a backup must not fill the page
  // cache with it.
  OpenOptions direct;
  direct.io.direct_io = true;
  Result<std::unique_ptr<Image>> opened = Image::Open(path, direct);
  if (!opened.ok()) opened = Image::Open(path, OpenOptions{});
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Image> image, std::move(opened));
  const uint64_t virtual_size = image->virtual_size();
  const uint64_t cluster_size = image->cluster_size();
  const uint64_t read_clusters = std::max<uint64_t>(1, kReadBytes / cluster_size);
  digest::ContentDigest result;
  std::vector<ReadPiece> pieces;
  for (uint64_t window = 0; window < virtual_size; window += kMapWindowBytes) {
    const uint64_t length = std::min(kMapWindowBytes, virtual_size - window);
    ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> extents, image->Map(window, length));
    pieces.clear();
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
        pieces.push_back({cluster, std::min(read_clusters, end - cluster)});
      }
    }
    ZQ_RETURN_IF_ERROR(HashPieces(*image, pieces, cluster_size, read_clusters, result));
  }
  ZQ_RETURN_IF_ERROR(image->Close());
  return result;
}

}  // namespace zqcow::backup
