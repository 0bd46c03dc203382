// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The image engine: zqcow::Image over one io::File. Created by CreateImageOnFile /
// OpenImageOnFile (qcow2_create.cc, qcow2_open.cc).
//
// Lifetime: Close()/CloseIncomplete() must not race with calls still in flight on other
// threads (join the writers first); every call after Close fails with "image is closed".
//
// O_DIRECT needs cluster size >= the file's alignment (metadata is written as whole
// clusters); Image::Create/Open fall back to buffered I/O for smaller clusters and the
// *OnFile entry points refuse such a file with kNotSupported.
//
// Locking: one metadata mutex guards the L1 table, the metadata cache (L2 tables and
// refcount blocks), the refcounts, the compressed placement, the header and the error
// state. Data I/O (normal cluster reads/writes, the cluster store's writes and reads) runs
// outside it. Flush runs entirely under it.
//
// Ordering of a write: allocate under the lock (refcount +1 first), write the data outside
// it, then set the L2 entry under the lock. So an L2 entry in memory always points at data
// that has been handed to the file (or to the cluster store). References dropped by an L2
// change are released by a DEFERRED decrement, applied only after the L2 change is on disk
// (see Flush order in qcow2_flush.cc): a crash leaves leaks, never a reference to a cluster
// whose refcount on disk is 0.

#ifndef ZQCOW_QCOW2_QCOW2_ENGINE_H_
#define ZQCOW_QCOW2_QCOW2_ENGINE_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_set>
#include <vector>

#include "format/entries.h"
#include "format/header.h"
#include "format/types.h"
#include "io/aligned_buffer.h"
#include "io/file.h"
#include "qcow2/backing.h"
#include "qcow2/cluster_map.h"
#include "qcow2/cluster_store.h"
#include "qcow2/metadata_cache.h"
#include "qcow2/refcounts.h"
#include "zqcow/image.h"

namespace zqcow::qcow2 {

// Header field offsets the engine patches in place in its copy of cluster 0 (v3 only for
// the feature fields).
inline constexpr size_t kHeaderRefcountTableOffset = 48;
inline constexpr size_t kHeaderRefcountTableClusters = 56;
inline constexpr size_t kHeaderIncompatibleFeatures = 72;
inline constexpr size_t kHeaderAutoclearFeatures = 88;

// Deferred decrements above this many force a flush (bounds their memory).
inline constexpr size_t kMaxPendingDecrements = size_t{1} << 16;
// Image::Read: whole clusters looked up at once, and the most bytes one grouped read of
// their data covers; a gap between two compressed clusters' data up to this size is read
// rather than split into two requests (cheaper than another request's latency).
inline constexpr uint64_t kReadGroupClusters = 256;
inline constexpr uint64_t kReadGroupBytes = uint64_t{256} << 10;
inline constexpr uint64_t kReadGapBytes = uint64_t{32} << 10;

// Per-read scratch (qcow2_engine.cc).
struct ReadScratch;

class Qcow2Image final : public Image {
 public:
  struct Parts {
    std::unique_ptr<io::File> file;
    format::Header header;
    io::AlignedBuffer header_cluster;  // cluster 0 as on disk (or to be written)
    bool writable = false;
    IoOptions io;
    uint64_t l1_offset = 0;
    io::AlignedBuffer l1;  // whole clusters
    uint64_t refcount_table_offset = 0;
    uint32_t refcount_table_clusters = 0;
    io::AlignedBuffer refcount_table;      // whole clusters (writable only)
    format::HostCluster next_free;         // writable only
    uint64_t file_size = 0;                // at open
    std::unique_ptr<BackingFile> backing;  // overlays (opened read-only below the image)
  };

  explicit Qcow2Image(Parts parts);
  ~Qcow2Image() override;

  // Create: the structures exist in memory only; writes header, tables, syncs.
  Status InitialFlush();
  // Open writable: sets the dirty bit (v3) and clears autoclear bits; synced.
  Status MarkOpenForWriting();
  // Refcounts (for create: referencing the clusters laid out by hand).
  Refcounts* refcounts() { return refcounts_.get(); }

  ImageInfo Info() const override;
  uint64_t virtual_size() const override { return header_.size; }
  uint32_t cluster_size() const override { return static_cast<uint32_t>(cluster_size_); }
  Compression compression() const override {
    return static_cast<Compression>(header_.compression_type);
  }

  Status Read(uint64_t guest_offset, std::span<uint8_t> out) override;
  Status Write(uint64_t guest_offset, std::span<const uint8_t> data) override;
  Status WriteCompressed(uint64_t guest_offset, std::span<const uint8_t> compressed) override;
  // Checks every argument, then one metadata-lock section EnsureL2s and places the whole
  // batch (CompressedPlacement::PlaceBatch); the data goes to the store outside the lock
  // (ClusterStore::WriteBatch); then one lock section sets every L2 entry (and flushes if a
  // bound is exceeded). WriteCompressed is a batch of one. See cluster_store.h.
  Status WriteCompressedBatch(std::span<const CompressedCluster> clusters) override;
  Status WriteZeroes(uint64_t guest_offset, uint64_t length) override;
  Status Discard(uint64_t guest_offset, uint64_t length) override;
  Result<std::vector<MapExtent>> Map(uint64_t guest_offset, uint64_t length) override;
  Status Flush() override;
  Status Close() override;
  Status CloseIncomplete() override;

 private:
  // --- qcow2_engine.cc: data paths ---
  Status CheckRange(uint64_t guest_offset, uint64_t length) const;
  Status CheckWritableLocked() const;
  // What guest range [guest_offset, + out.size()) reads as where the image leaves it
  // unallocated: the backing file's bytes (zeros beyond its size), or zeros without one.
  Status ReadUnallocated(uint64_t guest_offset, std::span<uint8_t> out);
  // Reads guest bytes [guest_offset, guest_offset + out.size()) of the one cluster that
  // `raw` describes.
  Status ReadFromEntry(uint64_t raw, uint64_t guest_offset, std::span<uint8_t> out);
  Status ReadCompressed(const format::L2Entry& entry, std::span<uint8_t> cluster);
  Status DecompressCluster(const format::L2Entry& entry, std::span<const uint8_t> compressed,
                           std::span<uint8_t> cluster) const;
  // Reads whole guest clusters (one raw L2 entry each) into `out`, consecutive clusters'
  // data that lie together in the file with one request: normal clusters on consecutive
  // host clusters, compressed clusters packed one after another (as every writer packs
  // them; gaps up to kReadGapBytes are read and skipped). The first is at `guest_offset`.
  Status ReadWholeClusters(std::span<const uint64_t> raws, uint64_t guest_offset,
                           std::span<uint8_t> out, ReadScratch& scratch);
  // What Map finds at guest `offset`: the entry of its cluster and the bytes from `offset`
  // (up to `end`) it covers: to the cluster's end, or with no L2 table (kUnallocated) to
  // the end of the L2 table's range.
  struct MapStep {
    format::L2Entry entry;
    uint64_t length = 0;
  };
  Result<MapStep> LookUpForMap(uint64_t offset, uint64_t end);
  // --- extended_l2_read.cc: images with extended L2 entries (read only) ---
  // Read() of such an image: cluster by cluster, each subcluster run as the bitmap says
  // (allocated: from the host cluster; zero; unallocated: ReadUnallocated).
  Status ReadExtended(uint64_t guest_offset, std::span<uint8_t> out);
  // LookUpForMap's step within one cluster: the run of subclusters of one kind at `offset`
  // (entry.kind that kind, entry.host_offset the cluster's).
  Result<MapStep> LookUpExtendedLocked(uint64_t offset, uint64_t end);
  // Map of [guest_offset, + length), unallocated in this image, through the backing chain,
  // handed to `add` extent by extent.
  Status MapUnallocated(uint64_t guest_offset, uint64_t length,
                        const std::function<void(const MapExtent&)>& add);
  // Writes part or all of one guest cluster. Writers of the same guest cluster are
  // serialised (ClusterWriteGuard): a partial write is a read-modify-write done outside the
  // metadata lock, and two at once would each write back the other's old bytes.
  Status WriteOneCluster(format::GuestCluster cluster, uint64_t in_cluster,
                         std::span<const uint8_t> data);
  // Argument checks of WriteCompressed / WriteCompressedBatch.
  Status CheckCompressedCluster(const CompressedCluster& cluster) const;
  class ClusterWriteGuard;
  // Sets the L2 entry of `cluster` to `raw` and releases what the old entry referenced.
  Status ReplaceEntryLocked(format::GuestCluster cluster, uint64_t raw);
  // Whole clusters [first, first+count) -> `raw` (zero or unallocated). Clusters without an
  // L2 table are skipped (they read as zeros already) unless `hide_backing`: an overlay's
  // zero clusters need their table, or the backing data would show through.
  Status ReplaceWholeClusters(uint64_t first, uint64_t count, uint64_t raw, bool hide_backing);
  uint64_t HostLimitLocked() const;
  Result<format::L2Entry> Decode(uint64_t raw) const;
  // Marks the image failed (first error wins) and returns the error.
  Status Fail(const Status& status);
  Status FailLocked(const Status& status);
  Status Error(const std::string& what) const;

  // --- qcow2_flush.cc ---
  Status FlushLocked();
  Status DoFlushLocked();
  // After an operation: flush and trim if the metadata cache or the decrement queue is
  // over its bound.
  Status MaybeFlushLocked();
  Status WriteHeaderLocked();
  Status CloseLocked(bool clear_dirty);

  const std::string path_;
  std::unique_ptr<io::File> file_;
  format::Header header_;
  format::Geometry geometry_;
  const uint64_t cluster_size_;
  const bool writable_;
  const uint64_t file_size_at_open_;
  // Where data clusters go on their way to the file (compressed ones, and normal ones when
  // it holds_normal_clusters()).
  std::unique_ptr<ClusterStore> store_;

  mutable std::mutex mutex_;
  // Guest clusters a WriteOneCluster is working on (guarded by mutex_).
  std::unordered_set<uint64_t> clusters_being_written_;
  std::condition_variable cluster_written_;
  io::AlignedBuffer header_cluster_;
  bool header_dirty_ = false;
  std::unique_ptr<MetadataCache> metadata_cache_;
  std::unique_ptr<Refcounts> refcounts_;  // writable only
  std::unique_ptr<ClusterMap> cluster_map_;
  std::unique_ptr<CompressedPlacement> placement_;  // writable only
  // The backing chain (read-only); null when none. Unallocated clusters read from it, so
  // every write path keeps them hidden where the guest wrote or zeroed (see WriteZeroes).
  std::unique_ptr<BackingFile> backing_;
  Status failed_;
  bool closed_ = false;
  Status close_status_;
};

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_QCOW2_ENGINE_H_
