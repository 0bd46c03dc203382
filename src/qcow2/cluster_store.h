// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The cluster store: how a writable image's data clusters reach the file. One contract for
// the whole compressed write path, in two steps that the image runs for every batch
// (Image::WriteCompressedBatch; WriteCompressed is a batch of one):
//
//   1. Placement, under the image's metadata lock (CompressedPlacement::PlaceBatch): each
//      compressed cluster gets a host byte range from a bump pointer; every host cluster a
//      range touches gets refcount +1; where a host cluster's compressed data ends is told
//      to the store (ClusterStore::SetClusterEnd) before the lock is released.
//   2. Storing, outside the lock (ClusterStore::WriteBatch): the bytes go to the store, which
//      writes them to the file (how depends on the strategy, below). Only then does the image
//      set the L2 entries, so an entry in memory always points at data the store has.
//   Flush (Image::Flush): ClusterStore::Flush writes what the store still holds; the image
//   then syncs the file and only after that writes metadata pointing at the data.
//
// Normal (uncompressed) clusters go through the store too (Write of a whole fresh cluster,
// Rewrite of one in place) when holds_normal_clusters(): the workers never wait for the disk.
//
// PLACEMENT (CompressedPlacement). Compressed clusters are packed back to back; data
// continues into the next host cluster only when that cluster is the next free one,
// otherwise the current cluster is closed (SetClusterEnd) and a fresh one is started. A host
// cluster whose refcount would exceed the maximum (refcount_bits 1!) is closed the same way.
// A new session always starts at a fresh cluster, so every host cluster that receives
// pieces is fresh. Inside one batch, a cluster left behind because the next piece did not
// fit and its neighbour was taken stays open as a *hole*; later pieces of the same batch
// that fit go there (the fullest hole that fits). Holes are closed when the batch ends:
// they never outlive a batch, so every cluster's data end is known to the store before any
// later batch's piece arrives. Not thread-safe: the image calls it under its lock.
//
// STORE STRATEGIES (ClusterStore::Create, Strategy):
// - kAssemble (the default): assembles host clusters in memory from the pieces that parallel
//   workers deliver in any order, and writes each host cluster once, aligned, when it is
//   complete (or at Flush): no read-modify-write per compressed cluster, which is what makes
//   O_DIRECT compressed writes fast. A host cluster receives non-overlapping pieces from its
//   first byte up to its *data end* (the cluster end, or less as SetClusterEnd says); it is
//   *finished* when all bytes in [0, data end) arrived. Then it is written with one aligned
//   write (tail padded with zeros up to the file's alignment, never beyond the cluster) and
//   dropped from memory: by the store's writer thread (the default), which writes each run of
//   adjacent finished clusters with one write (up to 2 MiB), or, with
//   Options::background_writer off, by the caller whose piece finished it, before returning.
//   Needs the file's alignment <= the cluster size (the image guarantees it: O_DIRECT images
//   with smaller clusters are refused or opened buffered); on any other file Create returns
//   the kWriteThrough store.
// - kWriteThrough: every piece is written to the file at once (pwrite on a buffered file, an
//   aligned read-modify-write serialised per store on an O_DIRECT file): the way QEMU writes
//   compressed clusters, kept as the baseline benchmarks compare with (--no-write-cache).
//   Holds nothing, so normal clusters do not go through it.
//
// REQUIRES of the caller (the image; what the kAssemble store relies on):
// - Every host cluster that receives pieces is fresh: nothing else is ever written to it,
//   and its pieces cover it from offset 0 up. Rewrite is the one exception: it replaces a
//   whole normal cluster in place.
// - Pieces never overlap and never lie beyond a data end given by SetClusterEnd().
// - Each thread delivers its own pieces in host-offset order, and SetClusterEnd for a
//   cluster comes before any piece of a later placement. WriteBatch sorts a batch's pieces
//   by host offset itself (a piece placed in a hole lies below pieces placed before it).
//
// Memory and progress (kAssemble): at most max_clusters clusters are held (finished ones
// count until their write ends), except that a writer whose cluster lies below every cached
// cluster is always admitted (so the oldest placement can always finish, even with one
// worker), a piece that fills a whole cluster (a normal cluster) is admitted while fewer
// than max_clusters finished clusters wait for their write (the placement's open compressed
// cluster may stay unfinished until after it: waiting for it could wait forever), and
// SetClusterEnd never waits for room; the bound is therefore 2 * max_clusters + number of
// concurrent writers (+ clusters that only received a SetClusterEnd). A writer that finds
// the store full writes the finished clusters waiting for the writer thread itself, if
// there are any, and otherwise blocks on a condition variable; nobody busy-loops.
//
// Threading: every ClusterStore method may be called from any thread at once. File I/O
// never runs under the store's lock; a cluster being written stays readable from memory.
// Errors: the first failed write is sticky: every later Write/WriteBatch/SetClusterEnd/
// Flush/Read returns it, and writers waiting for room are woken and return it. A failed
// write of the writer thread is therefore reported by the next call (by Flush at the
// latest). Caller bugs (a piece beyond a cluster's data end, overlapping pieces as far as
// they can be seen) assert in debug builds and return kInvalidArgument otherwise, without
// making the error sticky. Destroying the store stops its writer thread and drops whatever
// it holds: call Flush() first.

#ifndef ZQCOW_QCOW2_CLUSTER_STORE_H_
#define ZQCOW_QCOW2_CLUSTER_STORE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "format/types.h"
#include "io/file.h"
#include "qcow2/refcounts.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::qcow2 {

class ClusterStore {
 public:
  enum class Strategy : uint8_t { kAssemble, kWriteThrough };

  struct Options {
    Strategy strategy = Strategy::kAssemble;
    // Upper bound of held host clusters (kAssemble; see the file comment for the bound).
    size_t max_clusters = 64;
    // After a host cluster (kWriteThrough: a piece) is written, push it to disk and drop it
    // from the page cache (sync_file_range + posix_fadvise DONTNEED): the "buffered +
    // fadvise" alternative to O_DIRECT. Off by default.
    bool drop_page_cache = false;
    // kAssemble: finished clusters are written by a thread of the store, in batches. Off:
    // the caller that finishes a cluster writes it before returning.
    bool background_writer = true;
  };

  // The store an image with these I/O options uses on `file` (IoOptions::write_cache:
  // kAuto assembles on O_DIRECT files and with drop_page_cache).
  static Options OptionsFor(const IoOptions& io, const io::File& file, uint32_t cluster_size);

  struct Stats {
    uint64_t clusters_written_whole = 0;    // finished clusters written with one write
    uint64_t clusters_written_partial = 0;  // unfinished clusters written by Flush
    uint64_t pieces = 0;                    // pieces received (split per host cluster)
    uint64_t waits = 0;                     // times a writer blocked on a full store
    uint64_t peak_clusters = 0;             // most clusters held at once
    uint64_t write_batches = 0;             // batches of finished clusters submitted
  };

  // `file` must outlive the store. cluster_size is the image's (512 B .. 2 MiB).
  static std::unique_ptr<ClusterStore> Create(io::File* file, uint32_t cluster_size,
                                              const Options& options);
  virtual ~ClusterStore() = default;

  // The strategy in use (kWriteThrough also when kAssemble was asked for on a file whose
  // alignment exceeds the cluster size).
  virtual Strategy strategy() const = 0;
  // The image hands whole normal clusters to the store (Write, Rewrite) instead of writing
  // them to the file itself: true for kAssemble.
  bool holds_normal_clusters() const { return strategy() == Strategy::kAssemble; }

  // Stores `data` at host byte offset `host_offset`. The range may cross into following
  // host clusters; it is split into one piece per host cluster. May block while the store
  // is full, or while Flush writes the same cluster. Returns the sticky error if one
  // happened (also for empty `data`).
  virtual Status Write(uint64_t host_offset, std::span<const uint8_t> data) = 0;

  // Step 2 of a batch: clusters[i].data at hosts[i] (as placed by PlaceBatch). kAssemble:
  // one Write per run of pieces back to back in the file, in host-offset order (copied
  // together first unless they are also back to back in memory). kWriteThrough: one write
  // per piece, as QEMU does. No lock of the image held.
  virtual Status WriteBatch(std::span<const CompressedCluster> clusters,
                            std::span<const format::HostOffset> hosts) = 0;

  // The placement's word that host cluster `host_cluster_offset` (cluster-aligned) holds no
  // compressed data at or beyond `data_end` (1 .. cluster_size). The cluster may then
  // finish before it is full. May come before or after the pieces; never waits for room.
  // With data_end == cluster_size and nothing held for the cluster it is a no-op.
  virtual Status SetClusterEnd(uint64_t host_cluster_offset, uint32_t data_end) = 0;

  // Writes every cluster held when it is called (finished ones whole; unfinished ones up to
  // their received end rounded up to the alignment, and they stay held so later pieces can
  // complete them) and waits for writes in flight. Does NOT fdatasync: the caller syncs the
  // file after Flush and before writing metadata that points at this data.
  virtual Status Flush() = 0;

  // Fills `out` with the bytes at host offset [host_offset, + out.size()): from the store
  // where it holds the cluster (or is writing it), from the file elsewhere (with a bounce
  // buffer when the file is O_DIRECT, so any offset and length work). Bytes of a held
  // cluster that have not arrived read as zeros. Returns the sticky error if any.
  virtual Status Read(uint64_t host_offset, std::span<uint8_t> out) = 0;

  // Replaces host cluster `host_cluster_offset` (cluster-aligned) with `cluster` (exactly
  // one cluster): a normal cluster rewritten in place, which the store may still hold, be
  // writing, or have written. Atomic for every other thread: a Read sees the old bytes or
  // the new ones and a Flush writes one of them, never neither, and a write of the old
  // bytes in flight ends before the new ones are taken, so it never lands after them.
  virtual Status Rewrite(uint64_t host_cluster_offset, std::span<const uint8_t> cluster) = 0;

  // Host cluster was freed (refcount reached 0): drop its held bytes without writing them,
  // and wait until a write of it in flight has finished (so a stale write never lands after
  // the cluster is reused).
  virtual void Discard(uint64_t host_cluster_offset) = 0;

  // The sticky error, OK if none.
  virtual Status error() const = 0;
  virtual Stats stats() const = 0;
};

// Step 1 of a batch (see the file comment). `refcounts` and `store` must outlive it.
class CompressedPlacement {
 public:
  CompressedPlacement(const format::Geometry& geometry, Refcounts* refcounts,
                      ClusterStore* store)
      : geometry_(geometry), refcounts_(refcounts), store_(store) {}

  // Places the batch: hosts[i] receives clusters[i].data (hosts.size() == clusters.size()).
  // The L2 tables of the batch must exist already, so no table lands between its pieces.
  // On error the holes are closed all the same.
  Status PlaceBatch(std::span<const CompressedCluster> clusters,
                    std::span<format::HostOffset> hosts);

  // The pieces of PlaceBatch, for tests: Allocate reserves `length` bytes (0 < length <
  // cluster size) and returns their host byte offset. BeginBatch/EndBatch bracket a batch;
  // EndBatch closes the holes (call it also when an allocation failed). No nesting.
  Result<format::HostOffset> Allocate(uint64_t length);
  void BeginBatch() { in_batch_ = true; }
  Status EndBatch();

  // A host cluster's refcount reached 0: if it is the one being filled, forget it (the next
  // placement starts a fresh cluster), and drop it from the store (ClusterStore::Discard).
  void OnClusterFreed(format::HostCluster cluster);

  // One past the last byte ever placed (0 if none): the file must reach at least this
  // offset rounded up to a sector.
  uint64_t high_water() const { return high_water_; }

 private:
  // Starts a fresh cluster with a piece of `length` bytes. The cluster left behind becomes
  // a hole inside a batch when `may_be_hole` (not when its refcount is at the maximum).
  Result<format::HostOffset> StartFresh(uint64_t length, bool may_be_hole = true);
  // A piece of `length` bytes in the fullest hole it fits in; nullopt when none.
  Result<std::optional<format::HostOffset>> AllocateInHole(uint64_t length);
  Status CloseCluster(format::HostCluster cluster, uint64_t end);

  struct Hole {
    format::HostCluster cluster;
    uint64_t end = 0;  // bytes used in it (1 .. cluster size - 1)
  };

  format::Geometry geometry_;
  Refcounts* refcounts_;
  ClusterStore* store_;
  std::optional<format::HostCluster> current_;  // the cluster being filled
  uint64_t current_end_ = 0;                    // bytes used in it (1 .. cluster size)
  uint64_t high_water_ = 0;
  bool in_batch_ = false;
  std::vector<Hole> holes_;  // only inside a batch
};

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_CLUSTER_STORE_H_
