// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The conversion pipeline proper: one reader thread -> N worker threads -> the image.
//
//   reader   asks the source which ranges hold data (holes, unallocated and zero ranges
//            are skipped unread), reads several chunks per batch into pooled aligned
//            buffers, splits them into guest clusters, drops all-zero clusters (left
//            unallocated), queues the rest as runs of consecutive clusters (a few per
//            chunk, bounded so every worker has some) with sequence numbers in guest order.
//            (A source with parallel_reads(), i.e. qcow2, is read by the workers
//            instead, one run each, so decompression runs in parallel too.)
//   workers  each own a Compressor; compress a run's clusters back to back into one buffer
//            (each into at most cluster_size - 1 bytes) and hand the compressed ones to the
//            image with one WriteCompressedBatch (one lock round trip per run, not per
//            cluster), and Write the ones that did not fit (or all, without compression).
//            With in-order writing a run's writes pass an OrderGate in one turn, in guest
//            order (the batch is split around clusters written as is).
//            With more workers than compressors (convert gives one compressor per CPU),
//            a worker takes a free compressor for each run and gives it back before it
//            writes: the extra workers overlap reads and writes, but no more runs are
//            compressed at once than there are compressors, and few codec contexts (each
//            with its tables) take turns in the CPU caches.
//   caller   (the coordinating thread) reports progress every ~100 ms, watches the cancel
//            flag, joins everything.
//
// Incremental mode (PipelineOptions::previous, an overlay target): the reader reads only
// the ranges to consider (dirty per the source's bitmap, or all) and skips the rest as
// unchanged; where it skips zeros inside them it makes zero clusters over the backing
// chain's data (mapping the backing image). Workers classify each cluster they get:
// zeros become zero clusters (without a bitmap only where the chain is not zero too), and
// without a bitmap a cluster equal to what the chain reads is skipped, compared there so
// the backing image is read and decompressed in parallel.
//
// The first error from any thread stops all of them: every blocking wait (free buffer,
// next task, write turn) wakes up on stop, so nothing deadlocks on a full or empty queue.

#ifndef ZQCOW_CONVERT_PIPELINE_H_
#define ZQCOW_CONVERT_PIPELINE_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "codec/codec.h"
#include "convert/source.h"
#include "digest/content_digest.h"
#include "zqcow/convert.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::convert {

struct PipelineOptions {
  uint32_t cluster_size = 65536;  // the target's
  uint64_t virtual_size = 0;      // the target's; >= source.size(), the rest reads as zeros
  bool out_of_order = true;       // false: clusters reach the image in guest order
  std::string target_path;        // for error messages
  const std::atomic<bool>* cancel = nullptr;
  std::function<void(const ConvertProgress&)> progress;
  double checkpoint_seconds = 0;  // > 0: image.Flush() that often (ConvertOptions)
  // Worker threads; 0: one per compressor. With more workers than compressors the workers
  // share the compressors (see RunPipeline).
  size_t workers = 0;
  std::chrono::steady_clock::time_point start_time = std::chrono::steady_clock::now();
  // Incremental mode: the image is a fresh overlay of `previous` (the backing image, opened
  // read-only here as well: what the backing chain reads), and only what changed is
  // written. The ranges considered are, with `dirty_bitmap`, those Source::DirtyRanges
  // marks (aligned out to whole clusters) and everything beyond previous's virtual size;
  // without, everything. In them, a cluster the source reads as zeros (or a range
  // Source::DataRanges leaves out) becomes a zero cluster where the chain holds data; a
  // non-zero cluster is written, except without `dirty_bitmap` when the chain reads the
  // same there (compared by the workers). Everything else stays unallocated (unchanged).
  // REQUIRES: previous->virtual_size() <= virtual_size.
  Image* previous = nullptr;
  bool dirty_bitmap = false;
  // Raw output (the image is a RawTarget, compressors all null): every guest range reaches
  // the image, data with Write and zeros with WriteZeroes (the target decides what zeroing
  // costs: nothing on a fresh file). Inside data clusters, zero stretches of at least
  // `sparse_size` bytes (checked in steps of `sparse_step`, the target's write alignment)
  // become WriteZeroes too; sparse_size 0 = no detection (the target writes zeros then).
  bool raw_output = false;
  uint64_t sparse_size = 4096;
  uint64_t sparse_step = 512;
  // Restore's check: the clusters inside these guest ranges (sorted, disjoint,
  // cluster-aligned) are hashed into PipelineTotals::ranges_digest, zero ones included.
  // REQUIRES when not empty: source.parallel_reads() (the workers see every cluster read).
  std::vector<ByteRange> digest_ranges;
};

// What the pipeline counted (see ConvertStats for each field's meaning). Every guest
// cluster is counted exactly once: clusters_zero + clusters_compressed +
// clusters_uncompressed + clusters_unchanged = clusters in the virtual size.
struct PipelineTotals {
  uint64_t bytes_read = 0;
  uint64_t zero_bytes_skipped = 0;
  uint64_t compressed_bytes = 0;
  uint64_t clusters_compressed = 0;
  uint64_t clusters_uncompressed = 0;
  uint64_t clusters_zero = 0;
  uint64_t clusters_unchanged = 0;  // incremental: clean or equal to the backing chain
  digest::ContentDigest content_digest;  // of the clusters written (compressed or stored)
  digest::ContentDigest ranges_digest;   // PipelineOptions::digest_ranges
};

// Converts all of `source` into `image`, on 1 + options.workers threads (one per
// compressor when 0) plus the calling one (which reports progress). `compressors`: all
// non-null to compress, all null to store clusters uncompressed; with more workers than
// compressors, at most compressors.size() runs are compressed at a time.
// REQUIRES: !compressors.empty(); image is freshly created (every cluster unallocated) with
// options.cluster_size and options.virtual_size (an overlay of options.previous in
// incremental mode).
// Returns the first error (source, codec or image), kInterrupted when *options.cancel
// became true, else OK. `totals` is filled either way. The image is not closed.
Status RunPipeline(Source& source, Image& image, const PipelineOptions& options,
                   std::vector<std::unique_ptr<codec::Compressor>> compressors,
                   PipelineTotals* totals);

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_PIPELINE_H_
