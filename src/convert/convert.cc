// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// zqcow::Convert: checks the options, opens the source (and, for an incremental backup, the
// backing image), creates the partial target image (or reopens it to resume), runs the
// pipeline, then closes the image as complete and renames it onto the target (success) or
// leaves it incomplete (failure/cancel).

#include "zqcow/convert.h"

#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <array>
#include <cerrno>
#include <chrono>
#include <fstream>
#include <thread>
#include <utility>
#include <vector>

#include "codec/codec.h"
#include "convert/pipeline.h"
#include "convert/process_stats.h"
#include "convert/raw_target.h"
#include "convert/resume.h"
#include "convert/source.h"
#include "convert/target.h"
#include "format/endian.h"
#include "format/header.h"
#include "io/aligned_buffer.h"
#include "qcow2/backing.h"

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
// source), so one worker's read overlaps another's compression (docs/BENCHMARKS.md,
// "Design measurements").
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

// The file of `files` that is `target` itself (same device and inode), or "".
std::string SameFileAs(const std::vector<std::string>& files, const std::string& target) {
  struct stat target_stat {};
  if (stat(target.c_str(), &target_stat) != 0) return "";
  for (const std::string& file : files) {
    struct stat file_stat {};
    if (stat(file.c_str(), &file_stat) != 0) continue;
    if (file_stat.st_dev == target_stat.st_dev && file_stat.st_ino == target_stat.st_ino) {
      return file;
    }
  }
  return "";
}

// Refuses to write the target over a file the source reads (which --force would
// truncate): the source itself or a file of its backing chain.
Status CheckNotSameFile(const convert::Source& source, const std::string& target) {
  const std::string same = SameFileAs(source.files(), target);
  if (same.empty()) return Status::OK();
  return Status::InvalidArgument(
      target + (same == source.path()
                    ? ": target is the source file"
                    : ": target is a backing file of the source " + source.path()));
}

bool HasQcow2Magic(const std::string& path) {
  std::array<uint8_t, 4> magic{};
  std::ifstream file(path, std::ios::binary);
  return file.read(reinterpret_cast<char*>(magic.data()), magic.size()) &&
         format::LoadBE32(magic.data()) == format::kQcowMagic;
}

// Incremental backups: opens the backing image PREVIOUS read-only (once; the pipeline
// compares with it and maps it), after the checks that give a clear error: a format other
// than qcow2, a missing file, a file that is not qcow2, an incomplete one (dirty bit), the
// target being PREVIOUS or a file of its chain, a source smaller than PREVIOUS.
Result<std::unique_ptr<Image>> OpenPrevious(const std::string& target,
                                            const ConvertOptions& options, uint64_t virtual_size) {
  const std::string what = target + ": backing file '" + options.backing_file + "'";
  if (options.backing_format != "qcow2") {
    return Status::NotSupported(what + ": backing format '" + options.backing_format +
                                "' is not supported (-F: only qcow2)");
  }
  const std::string path = qcow2::ResolveBackingName(target, options.backing_file);
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    return Status::NotFound(what + " (" + path + ") does not exist");
  }
  if (!HasQcow2Magic(path)) {
    return Status::InvalidArgument(what + " (" + path + ") is not a qcow2 image");
  }
  OpenOptions open;
  open.writable = false;
  Result<std::unique_ptr<Image>> previous = Image::Open(path, open);
  if (!previous.ok()) return previous.status().WithPrefix(what);
  const ImageInfo info = (*previous)->Info();
  if (info.dirty) {
    // An interrupted backup is no base: its chain does not read as the disk did.
    return Status::InvalidArgument(what +
                                   " is incomplete (its dirty bit is set: the backup "
                                   "that wrote it was interrupted)");
  }
  std::vector<std::string> chain = info.backing_chain;
  chain.insert(chain.begin(), path);
  const std::string same = SameFileAs(chain, target);
  if (!same.empty()) {
    return Status::InvalidArgument(target + ": target is " +
                                   (same == path ? "the backing file" : "in the backing chain") +
                                   " " + same);
  }
  if (virtual_size < (*previous)->virtual_size()) {
    return Status::InvalidArgument(target + ": source is smaller (" + std::to_string(virtual_size) +
                                   ") than the backing image " + options.backing_file + " (" +
                                   std::to_string((*previous)->virtual_size()) +
                                   "); a shrunk disk needs a full backup");
  }
  return previous;
}

uint64_t FileSize(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

// The options raw output refuses (usage mistakes, named as the CLI names them).
Status CheckRawOptions(const std::string& target, const ConvertOptions& options) {
  auto refuse = [&](const char* what) {
    return Status::InvalidArgument(target + ": " + what + " does not apply to raw output");
  };
  if (options.compress) return refuse("compression (-c)");
  if (!options.backing_file.empty()) return refuse("a backing file (-B)");
  if (!options.bitmap.empty()) return refuse("a dirty bitmap (--bitmap)");
  if (options.resume) return refuse("--resume");
  if (options.sparse_size % kSectorSize != 0) {
    return Status::InvalidArgument(target + ": -S " + std::to_string(options.sparse_size) +
                                   ": the minimum zero run must be a multiple of 512 (0: none)");
  }
  return Status::OK();
}

void FinishStats(const convert::PipelineTotals& totals, uint64_t virtual_size,
                 std::chrono::steady_clock::time_point start_time, double start_cpu,
                 ConvertStats& stats) {
  stats.virtual_size = virtual_size;
  stats.bytes_read = totals.bytes_read;
  stats.compressed_bytes = totals.compressed_bytes;
  stats.clusters_compressed = totals.clusters_compressed;
  stats.clusters_uncompressed = totals.clusters_uncompressed;
  stats.clusters_unchanged = totals.clusters_unchanged;
  stats.content_digest = totals.content_digest.ToString();
  stats.ranges_digest = totals.ranges_digest.ToString();
  stats.wall_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  stats.cpu_seconds = convert::ProcessCpuSeconds() - start_cpu;
  stats.throughput_mib_s =
      stats.wall_seconds > 0 ? static_cast<double>(virtual_size) / kBytesPerMiB / stats.wall_seconds
                             : 0;
  stats.peak_rss_bytes = convert::PeakRssBytes();
}

// ConvertOptions::expected_ranges_digest: kCorruption when the ranges read otherwise.
Status CheckRangesDigest(const std::string& source, const std::string& target,
                         const ConvertOptions& options, const convert::PipelineTotals& totals) {
  if (options.expected_ranges_digest.empty()) return Status::OK();
  const std::string found = totals.ranges_digest.ToString();
  if (found == options.expected_ranges_digest) return Status::OK();
  return Status::Corruption(target + ": the content read from " + source +
                            " does not match its recorded digest (" + found + ", expected " +
                            options.expected_ranges_digest + ")");
}

// What both outputs give the pipeline from the options.
convert::PipelineOptions BasePipelineOptions(const ConvertOptions& options, uint64_t virtual_size,
                                             const std::string& target_path, bool parallel_reads,
                                             std::chrono::steady_clock::time_point start_time) {
  convert::PipelineOptions pipeline;
  pipeline.cluster_size = options.cluster_size;
  pipeline.virtual_size = virtual_size;
  pipeline.out_of_order = options.out_of_order;
  pipeline.target_path = target_path;
  pipeline.cancel = options.cancel;
  pipeline.progress = options.progress;
  pipeline.workers = WorkerCount(options.workers, parallel_reads);
  pipeline.start_time = start_time;
  for (const auto& [offset, length] : options.digest_ranges) {
    pipeline.digest_ranges.push_back({offset, length});
  }
  return pipeline;
}

// The source as both outputs read it: the snapshot asked for, then --salvage and -r
// wrapped around it.
Result<std::unique_ptr<convert::Source>> OpenInput(const std::string& source,
                                                   const ConvertOptions& options,
                                                   const std::string& bitmap,
                                                   convert::SalvageCounters* salvaged) {
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<convert::Source> input,
                      convert::OpenSource(source, {.format = options.source_format,
                                                   .direct_io = options.source_direct_io,
                                                   .force_share = options.force_share,
                                                   .bitmap = bitmap,
                                                   .snapshot = options.source_snapshot,
                                                   .snapshot_id = options.source_snapshot_id,
                                                   .snapshot_name = options.source_snapshot_name}));
  if (options.salvage) input = convert::SalvageReadErrors(std::move(input), salvaged);
  if (options.read_rate_limit != 0) {
    input = convert::LimitReadRate(std::move(input), options.read_rate_limit, options.cancel);
  }
  return input;
}

// -O raw: the pipeline without compressors, writing a RawTarget.
Result<ConvertStats> ConvertRaw(const std::string& source, const std::string& target,
                                const ConvertOptions& options,
                                std::chrono::steady_clock::time_point start_time,
                                double start_cpu) {
  ZQ_RETURN_IF_ERROR(CheckRawOptions(target, options));
  convert::SalvageCounters salvaged;
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<convert::Source> input,
                      OpenInput(source, options, /*bitmap=*/"", &salvaged));
  if (!convert::IsNbdUri(target)) ZQ_RETURN_IF_ERROR(CheckNotSameFile(*input, target));
  const uint64_t virtual_size = io::AlignUp(input->size(), kSectorSize);
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<convert::RawTarget> output,
                      convert::OpenRawTarget(target, options, virtual_size));

  convert::PipelineOptions pipeline_options = BasePipelineOptions(
      options, virtual_size, target, input->parallel_reads(), start_time);
  pipeline_options.raw_output = true;
  pipeline_options.sparse_size = options.sparse_size;
  // Zero runs are looked for in blocks of the largest power of two within -S (as qemu-img
  // does), at least the target's write alignment: data stretches then start and end on
  // such blocks. Finer stretches (512 bytes around every 4 KiB zero block of a file system
  // image) made O_DIRECT writes the file system serialises, each a read-modify-write.
  pipeline_options.sparse_step = std::max<uint64_t>(kSectorSize, output->write_alignment());
  if (options.sparse_size > 0) {
    pipeline_options.sparse_step =
        std::max<uint64_t>(pipeline_options.sparse_step, std::bit_floor(options.sparse_size));
  }
  std::vector<std::unique_ptr<codec::Compressor>> no_compressors(pipeline_options.workers);
  convert::PipelineTotals totals;
  Status status = convert::RunPipeline(*input, *output, pipeline_options,
                                       std::move(no_compressors), &totals);
  (void)input->Close();
  if (status.ok()) status = CheckRangesDigest(source, target, options, totals);
  if (!status.ok()) {
    (void)output->CloseIncomplete();
    return status;
  }
  ZQ_RETURN_IF_ERROR(output->Close());
  ConvertStats stats;
  FinishStats(totals, virtual_size, start_time, start_cpu, stats);
  stats.zero_bytes_skipped = totals.zero_bytes_skipped;
  stats.clusters_zero = totals.clusters_zero;
  stats.read_errors = salvaged.errors;
  stats.unreadable_bytes = salvaged.bytes;
  if (!convert::IsNbdUri(target)) stats.output_file_size = FileSize(target);
  return stats;
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
  if (options.output_format == "raw") {
    return ConvertRaw(source, target, options, start_time, start_cpu);
  }
  if (options.output_format != "qcow2") {
    return Status::InvalidArgument(target + ": output format '" + options.output_format +
                                   "' is not supported (raw or qcow2)");
  }
  if (options.no_create || options.target_is_zero) {
    return Status::InvalidArgument(target + ": -n and --target-is-zero need raw output (-O raw)");
  }
  // -m beyond the CPUs: the extra workers overlap I/O, but they share one compressor per
  // CPU (a context each would evict each other's tables from the caches at every switch;
  // docs/BENCHMARKS.md, "Design measurements").
  const unsigned compressors_wanted = std::min(WorkerCount(options.workers, false), UsableCpus());
  if (!options.bitmap.empty() && options.backing_file.empty()) {
    return Status::InvalidArgument(target + ": a dirty bitmap (" + options.bitmap +
                                   ") needs the backing file it is relative to (-B)");
  }
  ZQ_ASSIGN_OR_RETURN(auto compressors, MakeCompressors(target, options, compressors_wanted));
  convert::SalvageCounters salvaged;
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<convert::Source> input,
                      OpenInput(source, options, options.bitmap, &salvaged));
  ZQ_RETURN_IF_ERROR(CheckNotSameFile(*input, target));
  ZQ_ASSIGN_OR_RETURN(convert::TargetPaths paths, convert::PlanTarget(target, options));
  ZQ_RETURN_IF_ERROR(CheckNotSameFile(*input, paths.partial));

  const uint64_t virtual_size = io::AlignUp(input->size(), kSectorSize);
  std::unique_ptr<Image> previous;
  if (!options.backing_file.empty()) {
    ZQ_ASSIGN_OR_RETURN(previous, OpenPrevious(target, options, virtual_size));
  }
  if (!options.bitmap.empty() && input->size() > 0) {
    // Fails now, before the target exists, when the source cannot serve the bitmap.
    ZQ_RETURN_IF_ERROR(
        input->DirtyRanges(0, std::min<uint64_t>(input->size(), options.cluster_size)).status());
  }
  ZQ_ASSIGN_OR_RETURN(convert::ResumeRecord record,
                      convert::DescribeConversion(*input, options, virtual_size));
  ZQ_ASSIGN_OR_RETURN(convert::PartialTarget partial,
                      convert::OpenPartialTarget(paths, options, record, virtual_size));
  std::unique_ptr<Image> image = std::move(partial.image);
  // A resumed image: the pipeline reads and writes only what it does not hold yet (so
  // every cluster it writes is still unallocated, as for a new image).
  uint64_t resumed_bytes = 0;
  uint64_t resumed_clusters = 0;
  for (const convert::ByteRange& range : partial.present) {
    resumed_bytes += range.length;
    resumed_clusters += (range.length + options.cluster_size - 1) / options.cluster_size;
  }
  if (!partial.present.empty()) {
    input = convert::SkipPresentRanges(std::move(input), std::move(partial.present));
  }

  convert::PipelineOptions pipeline_options = BasePipelineOptions(
      options, virtual_size, paths.partial, input->parallel_reads(), start_time);
  pipeline_options.checkpoint_seconds = options.checkpoint_seconds;
  pipeline_options.previous = previous.get();
  pipeline_options.dirty_bitmap = !options.bitmap.empty();
  convert::PipelineTotals totals;
  Status status =
      convert::RunPipeline(*input, *image, pipeline_options, std::move(compressors), &totals);
  (void)input->Close();  // read-only: nothing to lose
  if (previous) (void)previous->Close();
  if (status.ok()) {
    status = CheckRangesDigest(source, target, options, totals);
    if (!status.ok()) {
      (void)image->CloseIncomplete();
      (void)DiscardPartialTarget(target);
      return status;
    }
  }
  if (!status.ok()) {
    // The partial image stays, consistent on disk but marked incomplete (for --resume);
    // the pipeline's error is the one to report.
    (void)image->CloseIncomplete();
    return status;
  }
  // Close clears the dirty bit as its last write: if it fails, the image stays incomplete
  // (and is not renamed).
  ZQ_RETURN_IF_ERROR(image->Close());
  image.reset();
  ZQ_RETURN_IF_ERROR(convert::CommitTarget(paths));

  ConvertStats stats;
  FinishStats(totals, virtual_size, start_time, start_cpu, stats);
  // The pipeline counted the ranges it was told to skip as left unallocated.
  stats.zero_bytes_skipped =
      totals.zero_bytes_skipped - std::min(totals.zero_bytes_skipped, resumed_bytes);
  stats.clusters_zero = totals.clusters_zero - std::min(totals.clusters_zero, resumed_clusters);
  stats.resumed_bytes = resumed_bytes;
  stats.read_errors = salvaged.errors;
  stats.unreadable_bytes = salvaged.bytes;
  stats.output_file_size = FileSize(paths.target);
  return stats;
}

std::string PartialTargetPath(const std::string& target) {
  return convert::TargetFiles(target).partial;
}

Status DiscardPartialTarget(const std::string& target) {
  const convert::TargetPaths paths = convert::TargetFiles(target);
  for (const std::string& path : {paths.partial, paths.record}) {
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, path + ": cannot remove");
    }
  }
  return Status::OK();
}

}  // namespace zqcow
