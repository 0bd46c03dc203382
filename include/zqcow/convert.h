// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The conversion pipeline: source (raw file, block device or qcow2 image) -> N compression
// workers -> qcow2 image. What `zqcow convert` runs.

#ifndef ZQCOW_CONVERT_H_
#define ZQCOW_CONVERT_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "zqcow/export.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow {

namespace io {
class File;
}

struct ConvertProgress {
  uint64_t bytes_done = 0;   // guest bytes handled (read, skipped as zero or hole)
  uint64_t bytes_total = 0;  // source virtual size
  double elapsed_seconds = 0;
};

struct ConvertStats {
  uint64_t virtual_size = 0;
  uint64_t bytes_read = 0;            // bytes read from the source
  uint64_t zero_bytes_skipped = 0;    // holes, unallocated/zero ranges, all-zero clusters
  uint64_t compressed_bytes = 0;      // total size of the compressed streams written
  uint64_t clusters_compressed = 0;
  uint64_t clusters_uncompressed = 0; // did not compress below one cluster, stored as is
  uint64_t clusters_zero = 0;         // read as zeros: unallocated (or zero clusters)
  uint64_t clusters_unchanged = 0;    // incremental: clean or equal to the backing chain
  uint64_t output_file_size = 0;
  // --resume: guest bytes the interrupted conversion's partial image already held, kept
  // as they were (neither read again nor counted above).
  uint64_t resumed_bytes = 0;
  // salvage: unreadable ranges of the source (adjacent failed 512-byte pieces count once)
  // and the bytes in them, written as zeros.
  uint64_t read_errors = 0;
  uint64_t unreadable_bytes = 0;
  double wall_seconds = 0;
  double cpu_seconds = 0;             // user + system of the whole process
  double throughput_mib_s = 0;        // virtual size / wall time
  uint64_t peak_rss_bytes = 0;
  // Digest of the clusters the target holds with data (compressed or stored), computed
  // from the data read off the source (src/digest/content_digest.h defines it; an
  // integrity check, not a cryptographic hash). Zero clusters are not in it.
  std::string content_digest;
  // ConvertOptions::digest_ranges: digest of the clusters inside them, zero ones included.
  std::string ranges_digest;
};

struct ConvertOptions {
  std::string source_format;  // "raw", "qcow2", or "" to detect (qcow2 magic, else raw)
  // "qcow2" or "raw" (-O). Raw output writes a regular file (created whole, like a qcow2
  // target), a block device or an NBD export (nbd://..., nbd+unix://..., written in place);
  // compression, cluster_size, refcount_bits, backing_file, bitmap and resume do not apply.
  std::string output_format = "qcow2";
  // Raw output, as qemu-img's -n: the target exists and is used as is (not created); it
  // must hold at least the source's virtual size. Ranges reading as zeros are zeroed in it
  // (holes punched, BLKZEROOUT, NBD write-zeroes) unless `target_is_zero` says it reads as
  // zeros already (--target-is-zero, needs no_create).
  bool no_create = false;
  bool target_is_zero = false;
  // Raw output, as qemu-img's -S: zero runs of at least this many bytes (a multiple of 512)
  // are left as holes / zeroed rather than written; 0 writes every byte (fully allocated).
  uint64_t sparse_size = 4096;
  bool compress = true;       // -c; without it clusters are stored uncompressed
  Compression compression = Compression::kZlib;
  int compression_level = 0;   // 0: the codec's default (0 is no valid level of either codec)
  uint32_t cluster_size = 65536;
  uint32_t refcount_bits = 16;
  uint32_t version = 3;  // -o compat: 3 (1.1) or 2 (0.10; zlib and refcount_bits 16 only)
  bool source_direct_io = false;  // -T none
  bool force_share = false;       // -U: open the source without QEMU's image locks
  // A qcow2 source's internal snapshot to convert instead of its active state (see
  // OpenOptions::snapshot): `source_snapshot` an id or a name (-s), else the id and/or
  // name that must both match (-l snapshot.id=,snapshot.name=).
  std::string source_snapshot;
  std::string source_snapshot_id;
  std::string source_snapshot_name;
  // -r: at most this many bytes per second read from the source (0 = no limit).
  uint64_t read_rate_limit = 0;
  // --salvage: source read errors do not stop the conversion; what cannot be read (in
  // 512-byte pieces) is written as zeros and counted in ConvertStats::read_errors.
  bool salvage = false;
  // Incremental backups (-B, --bitmap): the target becomes an overlay of `backing_file`
  // (named in its header as given, format `backing_format`) holding only what changed:
  // with `bitmap`, the clusters the source's dirty bitmap marks; without, the clusters
  // whose content differs from what the backing chain reads.
  std::string backing_file;
  std::string backing_format = "qcow2";
  std::string bitmap;
  IoOptions target_io;            // -t none => target_io.direct_io
  unsigned workers = 0;           // -m; 0 = one per online core
  bool out_of_order = true;       // -W; false = clusters reach the image in guest order
  // Replace an existing target (only once the new image is complete: see Convert), and
  // without `resume` discard the partial image an interrupted conversion left.
  bool overwrite = false;
  // Continue the conversion whose partial image (PartialTargetPath) an interruption left,
  // from its last checkpoint, if there is one (else start a new one): only for the same
  // options and a source that did not change since (see `source_unchanged`); anything
  // else is refused with kInvalidArgument, never continued silently.
  bool resume = false;
  // The user's word that a block device source did not change since the interrupted
  // conversion (zqcow can tell for regular files only, by their size and times).
  bool source_unchanged = false;
  // Checkpoint: every this many seconds the target is flushed (data, refcounts, L2/L1,
  // each synced), so a crash keeps everything converted before the last checkpoint as
  // valid, allocated data in an image that still says "incomplete". 0 = only at the end.
  double checkpoint_seconds = 5.0;
  // Called from the pipeline's coordinating thread every ~100 ms and at the end.
  std::function<void(const ConvertProgress&)> progress;
  // When set and true, the conversion stops soon, leaves the partial image flushed
  // (consistent) but marked incomplete (dirty bit), and returns kInterrupted.
  const std::atomic<bool>* cancel = nullptr;
  // Test hook: wraps the target's File (e.g. in a fault injector) before the image uses it
  // (a newly created image only, not one reopened by `resume`).
  std::function<std::unique_ptr<io::File>(std::unique_ptr<io::File>)> wrap_target_file;
  // Restore's check: guest ranges (offset, length; sorted, disjoint, whole clusters of
  // `cluster_size`) whose clusters are hashed into ConvertStats::ranges_digest. Only for a
  // qcow2 source.
  std::vector<std::pair<uint64_t, uint64_t>> digest_ranges;
  // When set (and digest_ranges given): the ranges' digest must equal this, else the
  // conversion fails with kCorruption before a new target file is put in place.
  std::string expected_ranges_digest;
};

// Converts `source` into a new qcow2 image at `target`, which only ever appears whole: the
// image is written to PartialTargetPath(target) (beside it, with a resume record at that
// path + ".info") and renamed onto `target` once it is closed clean and synced (then the
// directory is synced). On failure, interruption or crash, `target` is absent (or, with
// `overwrite`, the old file, untouched) and the partial image is left consistent but
// marked incomplete (dirty bit), for `resume`; it never looks complete at `target`.
ZQCOW_EXPORT Result<ConvertStats> Convert(const std::string& source, const std::string& target,
                                          const ConvertOptions& options);

// Where Convert writes the image for `target` until it is complete: "<target>.zqcow-partial"
// in the same directory (beside the file a symbolic link `target` names).
ZQCOW_EXPORT std::string PartialTargetPath(const std::string& target);

// Removes what an interrupted Convert to `target` left (the partial image and its resume
// record); absent files are fine. For callers that will not resume, e.g. a failed backup.
ZQCOW_EXPORT Status DiscardPartialTarget(const std::string& target);

}  // namespace zqcow

#endif  // ZQCOW_CONVERT_H_
