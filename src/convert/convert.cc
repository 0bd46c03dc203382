// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// zqcow::Convert: checks the options, opens the source, creates the target, runs the
// pipeline, then closes the target as complete (success) or incomplete (failure/cancel).

#include "zqcow/convert.h"

#include <sched.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <utility>
#include <vector>

#include "codec/codec.h"
#include "convert/pipeline.h"
#include "convert/process_stats.h"
#include "convert/source.h"
#include "convert/target.h"
#include "io/aligned_buffer.h"

namespace zqcow {

namespace {

constexpr uint32_t kMinClusterSize = 512;
constexpr uint32_t kMaxClusterSize = uint32_t{2} << 20;
// The virtual size is the source size rounded up to whole sectors, as qemu-img does.
constexpr uint64_t kSectorSize = 512;
constexpr int kCodecDefaultLevel = 0;
constexpr unsigned kMaxWorkers = 256;
constexpr double kBytesPerMiB = 1024.0 * 1024.0;

bool IsPowerOfTwo(uint64_t value) { return value != 0 && (value & (value - 1)) == 0; }

codec::CompressionType CodecType(Compression compression) {
  return compression == Compression::kZstd ? codec::CompressionType::kZstd
                                           : codec::CompressionType::kDeflate;
}

// The CPUs this process may run on (its affinity mask, which a container or taskset may
// narrow), else the online ones.
unsigned UsableCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) {
    return static_cast<unsigned>(CPU_COUNT(&set));
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// Default: one worker per CPU; two when the workers read the source themselves (a qcow2
// source), so one worker's read overlaps another's compression (zstd qcow2 -> zstd, 2 CPUs:
// 1.9 s with 2 workers, 1.6 s with 4).
unsigned WorkerCount(unsigned requested, bool workers_read) {
  unsigned workers = requested != 0 ? requested : UsableCpus() * (workers_read ? 2 : 1);
  return std::clamp(workers, 1u, kMaxWorkers);
}

// One compressor per worker (all null without compression).
Result<std::vector<std::unique_ptr<codec::Compressor>>> MakeCompressors(
    const std::string& target, const ConvertOptions& options, unsigned workers) {
  std::vector<std::unique_ptr<codec::Compressor>> compressors(workers);
  if (!options.compress) return compressors;
  const codec::CompressionType type = CodecType(options.compression);
  const int level = options.compression_level == kCodecDefaultLevel ? codec::DefaultLevel(type)
                                                                    : options.compression_level;
  Status valid = codec::ValidateLevel(type, level);
  if (!valid.ok()) return valid.WithPrefix(target);
  for (auto& compressor : compressors) {
    Result<std::unique_ptr<codec::Compressor>> made = codec::MakeCompressor(type, level);
    if (!made.ok()) return made.status().WithPrefix(target);
    compressor = std::move(made).value();
  }
  return compressors;
}

// Refuses to write the target over a file the source reads (which --force would
// truncate): the source itself or a file of its backing chain.
Status CheckNotSameFile(const convert::Source& source, const std::string& target) {
  struct stat target_stat {};
  if (stat(target.c_str(), &target_stat) != 0) return Status::OK();
  for (const std::string& file : source.files()) {
    struct stat file_stat {};
    if (stat(file.c_str(), &file_stat) != 0) continue;
    if (file_stat.st_dev == target_stat.st_dev && file_stat.st_ino == target_stat.st_ino) {
      return Status::InvalidArgument(
          target + (file == source.path()
                        ? ": target is the source file"
                        : ": target is a backing file of the source " + source.path()));
    }
  }
  return Status::OK();
}

uint64_t FileSize(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

}  // namespace

Result<ConvertStats> Convert(const std::string& source, const std::string& target,
                             const ConvertOptions& options) {
  const auto start_time = std::chrono::steady_clock::now();
  const double start_cpu = convert::ProcessCpuSeconds();

  if (!IsPowerOfTwo(options.cluster_size) || options.cluster_size < kMinClusterSize ||
      options.cluster_size > kMaxClusterSize) {
    return Status::InvalidArgument(target + ": cluster size " +
                                   std::to_string(options.cluster_size) +
                                   " is not a power of two between 512 and 2 MiB");
  }
  // -m beyond the CPUs: the extra workers overlap I/O, but they share one compressor per
  // CPU (16 zstd workers with a context each took 1.7 s on 2 CPUs instead of 1.1 s: their
  // tables evicted each other from the caches at every switch).
  const unsigned compressors_wanted = std::min(WorkerCount(options.workers, false), UsableCpus());
  ZQ_ASSIGN_OR_RETURN(auto compressors, MakeCompressors(target, options, compressors_wanted));
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<convert::Source> input,
                      convert::OpenSource(source, {.format = options.source_format,
                                                   .direct_io = options.source_direct_io,
                                                   .force_share = options.force_share,
                                                   .bitmap = options.bitmap}));
  ZQ_RETURN_IF_ERROR(CheckNotSameFile(*input, target));

  const uint64_t virtual_size = io::AlignUp(input->size(), kSectorSize);
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Image> image,
                      convert::CreateTarget(target, options, virtual_size));

  convert::PipelineOptions pipeline_options;
  pipeline_options.cluster_size = options.cluster_size;
  pipeline_options.virtual_size = virtual_size;
  pipeline_options.out_of_order = options.out_of_order;
  pipeline_options.target_path = target;
  pipeline_options.cancel = options.cancel;
  pipeline_options.progress = options.progress;
  pipeline_options.checkpoint_seconds = options.checkpoint_seconds;
  pipeline_options.workers = WorkerCount(options.workers, input->parallel_reads());
  pipeline_options.start_time = start_time;
  convert::PipelineTotals totals;
  Status status =
      convert::RunPipeline(*input, *image, pipeline_options, std::move(compressors), &totals);
  (void)input->Close();  // read-only: nothing to lose
  if (!status.ok()) {
    // Consistent on disk but marked incomplete; the pipeline's error is the one to report.
    (void)image->CloseIncomplete();
    return status;
  }
  // Close clears the dirty bit as its last write: if it fails, the image stays incomplete.
  ZQ_RETURN_IF_ERROR(image->Close());
  image.reset();

  ConvertStats stats;
  stats.virtual_size = virtual_size;
  stats.bytes_read = totals.bytes_read;
  stats.zero_bytes_skipped = totals.zero_bytes_skipped;
  stats.compressed_bytes = totals.compressed_bytes;
  stats.clusters_compressed = totals.clusters_compressed;
  stats.clusters_uncompressed = totals.clusters_uncompressed;
  stats.clusters_zero = totals.clusters_zero;
  stats.content_digest = totals.content_digest.ToString();
  stats.output_file_size = FileSize(target);
  stats.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  stats.cpu_seconds = convert::ProcessCpuSeconds() - start_cpu;
  stats.throughput_mib_s =
      stats.wall_seconds > 0 ? static_cast<double>(virtual_size) / kBytesPerMiB / stats.wall_seconds
                             : 0;
  stats.peak_rss_bytes = convert::PeakRssBytes();
  return stats;
}

}  // namespace zqcow
