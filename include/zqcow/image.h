// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A qcow2 image (version 3; version 2 readable and writable as is). Create, open, read any
// guest range, write normal or pre-compressed clusters, discard, flush, close. Opened
// read-only, an image reads through its backing chain (qcow2 and raw backing files) and
// may have internal snapshots (the active state is read, or one snapshot: see
// OpenOptions::snapshot); opened writable, it may have a
// backing chain (an overlay: partial writes copy the rest of the cluster from the backing
// data, zeroed clusters become zero clusters so the backing data stays hidden) but no
// internal snapshots.
//
// Threading: every method may be called from several threads at once; metadata updates are
// serialised inside, data I/O runs in parallel. WriteCompressed is built for many workers
// that compress on their own threads and hand in finished clusters in any order.
//
// Consistency: while an image is open for writing its header carries the dirty bit
// (incompatible feature bit 0). Flush() writes data, syncs, then refcount blocks, syncs,
// then L2 tables and L1, syncs; so the image on disk never references data that is not
// there, and refcounts on disk are never lower than the references (crash = leaks only).
// Close() flushes and clears the dirty bit as its last, synced write. An image whose dirty
// bit is set was not closed cleanly ("incomplete"): Info() and Check() say so.

#ifndef ZQCOW_IMAGE_H_
#define ZQCOW_IMAGE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "zqcow/export.h"
#include "zqcow/status.h"

namespace zqcow {

enum class Compression : uint8_t { kZlib = 0, kZstd = 1 };  // = header byte 104

struct CreateOptions {
  uint64_t virtual_size = 0;            // bytes; need not be a multiple of cluster_size
  uint32_t cluster_size = 65536;        // power of two, 512 .. 2 MiB
  Compression compression = Compression::kZlib;
  uint32_t refcount_bits = 16;          // power of two, 1 .. 64
  bool overwrite = false;               // replace an existing file (else kAlreadyExists)
  // 3 (qemu-img's compat=1.1) or 2 (compat=0.10: no feature bits, so no dirty bit, zlib
  // only, refcount_bits 16; zero ranges stay unallocated).
  uint32_t version = 3;
  // An overlay: the image's unallocated clusters read from this file. Stored in the header
  // as given; a relative name is relative to the new image's directory (as QEMU resolves
  // it). It must open (kNotFound otherwise) as `backing_format` ("qcow2" or "raw").
  std::string backing_file;             // "" = none
  std::string backing_format = "qcow2";
};

struct IoOptions {
  bool direct_io = false;               // O_DIRECT on the image file
  // Writable images: every write is durable when it completes (O_DSYNC), as QEMU's
  // writethrough and directsync cache modes flush after each write.
  bool sync_writes = false;
  bool use_io_uring = true;             // when the kernel allows it
  // Compressed write cache (the cluster store, src/qcow2/cluster_store.h; kOff = the
  // write-through store, one write per compressed cluster as QEMU does). kAuto = on for
  // O_DIRECT files and with drop_page_cache, off for other buffered ones.
  enum class WriteCache : uint8_t { kAuto, kOn, kOff } write_cache = WriteCache::kAuto;
  size_t write_cache_bytes = 64ull * 65536;  // rounded to whole clusters (at least 1)
  bool drop_page_cache = false;         // buffered + fadvise(DONTNEED) after each write
  size_t metadata_cache_bytes = 8u << 20;  // L2 tables + refcount blocks held in memory
  // Read-only opens: read even while another process writes the image (qemu-img's -U).
  // Without it, zqcow takes QEMU's image locks (src/io/image_lock.h) on every file it opens:
  // a reader refuses an image (and backing file) that another process writes, a writer one
  // that another process reads or writes. A writable image refuses force_share.
  bool force_share = false;
};

struct OpenOptions {
  bool writable = false;
  IoOptions io;
  // Read-only opens of a qcow2 image: read this internal snapshot (its L1 table and its
  // virtual size) instead of the active state, as qemu-img convert -s / -l do. Unallocated
  // clusters still read from the backing chain. `snapshot`: an id or a name, the id tried
  // first (qemu-img's -s); else `snapshot_id` and/or `snapshot_name`, each one given must
  // match (-l snapshot.id=ID,snapshot.name=NAME). kNotFound naming the image when no
  // snapshot matches; kNotSupported with `writable`.
  std::string snapshot;
  std::string snapshot_id;
  std::string snapshot_name;
};

// What a guest range is, as qemu-img map would say. An image with a backing file maps the
// ranges it leaves unallocated through its backing chain: `depth` says which file of the
// chain the extent comes from (0 = the image itself, 1 = its backing file, ...), and
// host_offset is an offset in that file. kUnallocated at depth d: no file down to d has
// the range (depth 0 also beyond the backing file's size); it reads as zeros.
struct MapExtent {
  uint64_t guest_offset = 0;
  uint64_t length = 0;
  enum class Kind : uint8_t { kUnallocated, kZero, kData, kCompressed } kind = Kind::kUnallocated;
  uint64_t host_offset = 0;  // kData: host offset of guest_offset; kCompressed: descriptor's
  uint32_t depth = 0;
};

// An internal snapshot, as `qemu-img info` lists it.
struct SnapshotInfo {
  std::string id;
  std::string name;
  uint64_t vm_state_size = 0;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t icount = 0;  // 0 when the entry does not record it
};

// A persistent dirty bitmap, as `qemu-img info` lists it.
struct BitmapSummary {
  std::string name;
  uint64_t granularity = 0;  // bytes
  bool in_use = false;       // flag "in-use": not stored consistently (its writer did not close)
  bool auto_enabled = false; // flag "auto": tracks writes
};

struct ImageInfo {
  std::string path;
  uint32_t version = 3;
  uint64_t virtual_size = 0;
  uint32_t cluster_size = 0;
  uint32_t refcount_bits = 0;
  Compression compression = Compression::kZlib;
  uint64_t file_size = 0;
  bool dirty = false;        // not closed cleanly: an interrupted write, "incomplete"
  bool corrupt = false;      // the corrupt bit (incompatible feature bit 1) is set
  std::string backing_file;    // empty when none
  std::string backing_format;  // the backing format header extension; empty when none
  std::vector<SnapshotInfo> snapshots;  // ReadImageInfo only (Image::Info leaves it empty)
  bool lazy_refcounts = false;          // compatible feature bit 0
  bool extended_l2 = false;             // incompatible feature bit 4 (subclusters)
  std::vector<BitmapSummary> bitmaps;   // ReadImageInfo only
  // Image::Info of an open image: the files of its backing chain as opened (the backing
  // file first, then its own, ...); empty without one.
  std::vector<std::string> backing_chain;
};

// One guest cluster for Image::WriteCompressedBatch.
struct CompressedCluster {
  uint64_t guest_offset = 0;      // cluster-aligned, inside the virtual size
  std::span<const uint8_t> data;  // as for WriteCompressed: 1 .. cluster size - 1 bytes
};

struct CheckResult {
  uint64_t corruptions = 0;  // refcount lower than references, overlaps, out-of-file
  uint64_t leaks = 0;        // clusters with a refcount that nothing references
  uint64_t allocated_clusters = 0;
  uint64_t compressed_clusters = 0;
  // Allocated clusters not right after the previous one of their L2 table in the file,
  // and every compressed cluster (as qemu-img check counts them).
  uint64_t fragmented_clusters = 0;
  uint64_t image_end_offset = 0;
  uint64_t total_clusters = 0;  // guest clusters of the virtual size
  bool incomplete = false;   // the dirty bit: the last writer did not close the image
  bool corrupt_flag = false; // the corrupt bit (incompatible feature bit 1) is set
  std::vector<std::string> messages;  // one line each, like qemu-img check's
};

class ZQCOW_EXPORT Image {
 public:
  static Result<std::unique_ptr<Image>> Create(const std::string& path,
                                               const CreateOptions& options,
                                               const IoOptions& io = IoOptions());
  static Result<std::unique_ptr<Image>> Open(const std::string& path, const OpenOptions& options);

  // Destroying an open image closes it; errors are lost then, so call Close().
  virtual ~Image() = default;

  virtual ImageInfo Info() const = 0;
  virtual uint64_t virtual_size() const = 0;
  virtual uint32_t cluster_size() const = 0;
  virtual Compression compression() const = 0;

  // Any guest range inside the virtual size.
  virtual Status Read(uint64_t guest_offset, std::span<uint8_t> out) = 0;
  // Any guest range; partial clusters are read-modify-written. Allocates normal clusters.
  virtual Status Write(uint64_t guest_offset, std::span<const uint8_t> data) = 0;
  // Stores one guest cluster (guest_offset cluster-aligned) from its compressed bytes
  // (a stream of the image's compression type, shorter than one cluster). The cluster's old
  // content, if any, is released. Many threads may call this at once.
  virtual Status WriteCompressed(uint64_t guest_offset, std::span<const uint8_t> compressed) = 0;
  // Stores several guest clusters, each exactly as WriteCompressed would, but at the cost of
  // about one call: the image allocates them together (back to back in the file, in the
  // order given) and updates its metadata once for all of them. For workers that compress
  // a run of clusters at a time. An invalid argument (misaligned, beyond the virtual size,
  // empty or too long data) fails the call as WriteCompressed would; the qcow2 engine checks
  // them all before it writes anything. Other errors (I/O, no space) may leave some of the
  // clusters written and fail the image, exactly as a failed WriteCompressed does.
  // REQUIRES: the guest clusters are distinct (a cluster listed twice ends up with one of its
  // contents; harmless, but pointless). The data need not stay valid after the call.
  // Many threads may call this at once. An empty batch does nothing and returns OK.
  // The default implementation calls WriteCompressed for each cluster in turn.
  virtual Status WriteCompressedBatch(std::span<const CompressedCluster> clusters);
  // Makes the range read as zeros: whole clusters become zero clusters (v3) or unallocated
  // (v2 without a backing file; a v2 overlay writes zeros), their host clusters are
  // released; partial clusters are written with zeros.
  virtual Status WriteZeroes(uint64_t guest_offset, uint64_t length) = 0;
  // Releases whole clusters in the range (they then read as zeros without a backing file;
  // in an overlay they become zero clusters (v3) so the backing data stays hidden, and a v2
  // overlay keeps them as they are).
  virtual Status Discard(uint64_t guest_offset, uint64_t length) = 0;

  // Extents covering [guest_offset, guest_offset + length), adjacent equal kinds merged.
  virtual Result<std::vector<MapExtent>> Map(uint64_t guest_offset, uint64_t length) = 0;

  virtual Status Flush() = 0;
  // Flushes, clears the dirty bit, syncs and closes the file. Idempotent.
  virtual Status Close() = 0;
  // Flushes (so the image on disk is consistent) and closes, but leaves the dirty bit set:
  // the image is marked incomplete. For interrupted conversions.
  virtual Status CloseIncomplete() = 0;
};

// Reads the header (and nothing else worth mentioning) of an image. Fails on malformed
// headers with a clear error.
// force_share: read without refusing an image another process writes (-U).
ZQCOW_EXPORT Result<ImageInfo> ReadImageInfo(const std::string& path, bool force_share = false);

// Checks an image file the way `qemu-img check` does, by reading its metadata from disk.
// Returns the findings; a non-OK Status only when the check itself could not run (the file
// cannot be opened, the header is unreadable).
// force_share as for ReadImageInfo.
ZQCOW_EXPORT Result<CheckResult> CheckImage(const std::string& path, bool force_share = false);

// `qemu-img check -r leaks`: opens the image for writing (taking QEMU's write lock, so it
// fails while another process has the image open), checks it, and lowers the refcount of
// every leaked cluster to its references; the refcount blocks are written and synced. A
// crash during the repair leaves leaks at most. Refuses (kCorruption, nothing written) an
// image with any finding other than leaks. Returns the number of leaked clusters repaired.
ZQCOW_EXPORT Result<uint64_t> RepairImageLeaks(const std::string& path);

}  // namespace zqcow

#endif  // ZQCOW_IMAGE_H_
