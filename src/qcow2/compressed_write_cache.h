// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The compressed write cache: assembles host clusters in memory from compressed pieces that
// parallel workers deliver in any order, and writes each host cluster to the file once,
// aligned, when it is complete (or at flush). This is what makes O_DIRECT compressed writes
// fast: no read-modify-write per compressed cluster. The image also hands it whole normal
// (uncompressed) clusters, each one piece covering its fresh host cluster, so that the
// workers never wait for the disk: the writer thread writes them joined with their
// neighbours like any finished cluster.
//
// Model. The image's compressed-data allocator hands out byte ranges one after another
// (a bump pointer). A host cluster therefore receives a set of non-overlapping pieces that
// start at the cluster's first byte and run up to its *data end*: the cluster end, or less
// when the allocator moved on to a non-contiguous cluster and said so with SetClusterEnd().
// A cluster is *finished* when all bytes in [0, data end) have arrived. It is then written
// out with one aligned write (tail padded with zeros up to the file's alignment, never
// beyond the cluster) and dropped from memory: by the cache's writer thread (the default),
// which takes every finished cluster that is waiting and writes each run of adjacent ones
// with one write (up to 2 MiB), so compression workers never wait for the disk; or, with
// Options::background_writer off, by the caller whose piece (or cluster end) finished it, before
// that call returns.
//
// REQUIRES of the caller (the image's allocator):
// - Every host cluster that receives pieces is fresh: nothing else is ever written to it,
//   and its first piece starts at offset 0 of the cluster, or pieces cover it from 0 up.
//   (The allocator never continues a host cluster that a previous session half filled.)
//   Rewrite is the one exception: it replaces a whole normal cluster in place.
// - Pieces never overlap and never lie beyond a data end given by SetClusterEnd().
//
// Memory: at most max_clusters clusters are held (finished ones count until their write
// ends), except that a writer whose cluster lies below every cached cluster is always
// admitted (so the oldest allocation can always finish and progress is guaranteed, even with
// one worker), a piece that fills a whole cluster (a normal cluster) is admitted while
// fewer than max_clusters finished clusters wait for their write (the allocator's open
// compressed cluster may stay unfinished until after it), and SetClusterEnd never waits for
// room; the bound is therefore 2 * max_clusters + number of concurrent writers (+ clusters
// that only received a SetClusterEnd). A writer
// that finds the cache full writes the finished clusters that wait for the writer thread
// itself, if there are any, and otherwise blocks on a condition variable; nobody
// busy-loops. The guarantee assumes what the image's workers do: each thread delivers its
// own pieces in host-offset order (one Write per run of pieces, allocated just before),
// and SetClusterEnd for a cluster comes before any piece of a later allocation.
//
// Clusters smaller than the file's alignment (e.g. 512-byte clusters on a 4096-byte O_DIRECT
// device): the cache then works in alignment-sized blocks of several clusters. A block is
// written when every cluster of it that received pieces (or a cluster end) is finished;
// clusters of the block the cache never touched are read from the file first and written
// back unchanged (read-modify-write), so the caller must not write those bytes (metadata)
// concurrently with compressed data of the same block.
//
// Disabled mode (Options::enabled = false) writes every piece immediately: with pwrite on a
// buffered file, or by an aligned read-modify-write (serialised per block) on an O_DIRECT
// file — the slow path QEMU takes, kept so the difference can be measured.
//
// Threading: every method may be called from any thread at once. File I/O never runs under
// the cache's lock; a cluster being written stays readable from memory.
// Errors: the first failed write is sticky: every later Write/SetClusterEnd/Flush/Read
// returns it, and writers waiting for room are woken and return it. A failed write of the
// writer thread is therefore reported by the next call (by Flush at the latest). Caller
// bugs (a piece beyond a cluster's data end, overlapping pieces as far as they can be seen)
// assert in debug builds and return kInvalidArgument otherwise, without making the error
// sticky.
// Destroying the cache stops its writer thread and drops whatever is cached: call Flush()
// first.

#ifndef ZQCOW_QCOW2_COMPRESSED_WRITE_CACHE_H_
#define ZQCOW_QCOW2_COMPRESSED_WRITE_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "io/file.h"
#include "zqcow/status.h"

namespace zqcow::qcow2 {

class CompressedWriteCache {
 public:
  struct Options {
    bool enabled = true;
    // Upper bound of cached host clusters (see the class comment for the exact bound).
    size_t max_clusters = 64;
    // After a host cluster (or, disabled, a piece) is written, push it to disk and drop it
    // from the page cache (sync_file_range + posix_fadvise DONTNEED): the "buffered +
    // fadvise" alternative to O_DIRECT, for benchmarks. Off by default.
    bool drop_page_cache = false;
    // Finished clusters are written by a thread of the cache, in batches (see the class
    // comment). Off: the caller that finishes a cluster writes it before returning.
    bool background_writer = true;
  };

  struct Stats {
    uint64_t clusters_written_whole = 0;    // finished clusters written with one write
    uint64_t clusters_written_partial = 0;  // unfinished clusters written by Flush
    uint64_t pieces = 0;                    // Write() calls' pieces
    uint64_t waits = 0;                     // times a writer blocked on a full cache
    uint64_t peak_clusters = 0;             // most clusters held at once
    uint64_t write_batches = 0;             // batches of finished clusters submitted
  };

  // `file` must outlive the cache. cluster_size is the image's (512 B .. 2 MiB).
  static std::unique_ptr<CompressedWriteCache> Create(io::File* file, uint32_t cluster_size,
                                                      const Options& options);
  virtual ~CompressedWriteCache() = default;

  // Stores `data` at host byte offset `host_offset`. The range may cross into following
  // host clusters; it is split into one piece per host cluster. May block while the cache
  // is full, or while Flush writes the same cluster. When the piece finishes its cluster,
  // the cluster is queued for the writer thread (or, without one, written by this call
  // before it returns). Returns the sticky error if one happened (also for empty `data`).
  virtual Status Write(uint64_t host_offset, std::span<const uint8_t> data) = 0;

  // The allocator's word that host cluster `host_cluster_offset` (cluster-aligned) holds no
  // compressed data at or beyond `data_end` (1 .. cluster_size): no piece will arrive there.
  // The cluster may then finish (and be queued or written) before it is full. May come
  // before or after the pieces; never waits for room. With data_end == cluster_size and
  // nothing cached for the cluster it is a no-op.
  virtual Status SetClusterEnd(uint64_t host_cluster_offset, uint32_t data_end) = 0;

  // Writes every cluster cached when it is called (finished ones whole; unfinished ones up
  // to their received end rounded up to the alignment, and they stay cached so later pieces
  // can complete them) and waits for their writes in flight. Does NOT fdatasync: the caller syncs
  // the file after Flush and before writing metadata that points at this data.
  virtual Status Flush() = 0;

  // Fills `out` with the bytes at host offset [host_offset, host_offset + out.size()): from
  // the cache where the cluster is cached or being written, from the file elsewhere (with a
  // bounce buffer when the file is O_DIRECT, so any offset and length work). Bytes of a
  // cached cluster that have not arrived read as zeros. Returns the sticky error if any.
  virtual Status Read(uint64_t host_offset, std::span<uint8_t> out) = 0;

  // Replaces the bytes of host cluster `host_cluster_offset` (cluster-aligned) with
  // `cluster` (exactly one cluster): a normal cluster rewritten in place, which the cache
  // may still hold, be writing, or have written. Atomic for every other thread: a Read sees
  // the old bytes or the new ones and a Flush writes one of them, never neither (the old
  // bytes stay cached until the new ones overwrite them under the cache's lock), and a write
  // of the old bytes in flight ends before the new ones are taken, so it never lands after
  // them. Otherwise as Write (the exception to "every host cluster is fresh").
  virtual Status Rewrite(uint64_t host_cluster_offset, std::span<const uint8_t> cluster) = 0;

  // Host cluster was freed (refcount reached 0): drop its cached bytes without writing
  // them, and wait until a write of it that is in flight has finished (so a stale write
  // never lands after the cluster is reused). No-op when disabled.
  virtual void Discard(uint64_t host_cluster_offset) = 0;

  // The sticky error, OK if none.
  virtual Status error() const = 0;
  // Options::enabled: false when every piece is written on its own, at once.
  virtual bool enabled() const = 0;
  virtual Stats stats() const = 0;
};

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_COMPRESSED_WRITE_CACHE_H_
