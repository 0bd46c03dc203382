// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow convert`: qemu-img convert's subset, SRC (raw, qcow2 or NBD) to a new qcow2 image
// (compressed with -c) or to raw (a file, a block device or an NBD export).

#include <fmt/format.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "create_options.h"
#include "zqcow/convert.h"

namespace zqcow::cli {
namespace {

// The pipeline's limit (src/convert/convert.cc clamps there).
constexpr unsigned kMaxWorkers = 256;

struct ConvertArgs {
  std::string source;
  std::string target;
  std::string source_format;
  std::string output_format;  // -O; "" = raw, or qcow2 with -c (as qemu-img)
  bool no_create = false;       // -n
  bool target_is_zero = false;  // --target-is-zero
  std::string sparse_size;      // -S
  bool compress = false;
  std::vector<std::string> create_options;
  std::string target_cache = "writeback";
  std::string source_cache = "writeback";
  unsigned workers = 0;
  bool out_of_order_flag = false;  // -W: accepted, already the default
  bool in_order = false;
  bool progress = false;
  std::string output;  // "", "human" or "json"
  bool force = false;
  bool resume = false;
  bool source_unchanged = false;
  bool no_write_cache = false;
  double checkpoint_seconds = ConvertOptions().checkpoint_seconds;
  std::string write_cache_size;
  bool drop_page_cache = false;
  bool force_share = false;  // -U
  std::string backing_file;    // -B
  std::string backing_format;  // -F
  std::string bitmap;          // --bitmap
  bool quiet = false;          // -q
  std::string snapshot;        // -s
  std::string snapshot_param;  // -l
  std::string rate_limit;      // -r
  bool salvage = false;        // --salvage
  bool copy_offload = false;   // -C: refused
  bool bitmaps = false;        // --bitmaps: refused
};

// What qemu-img convert options zqcow cannot honour, refused by name.
Status RefuseUnsupported(const ConvertArgs& args) {
  if (args.copy_offload) {
    return Status::InvalidArgument(
        "-C: copy offloading is not supported (zqcow reads and writes every cluster itself)");
  }
  if (args.bitmaps) {
    return Status::InvalidArgument(
        "--bitmaps: copying persistent bitmaps is not supported (zqcow writes no bitmaps)");
  }
  return Status::OK();
}

nlohmann::json StatsToJson(const ConvertArgs& args, const ConvertOptions& options,
                           const ConvertStats& stats) {
  nlohmann::json j;
  j["source"] = args.source;
  j["target"] = args.target;
  j["format"] = options.output_format;
  if (options.output_format == kFormatQcow2) j["version"] = options.version;
  j["compressed"] = options.compress;
  j["compression_type"] = options.compression == Compression::kZstd ? "zstd" : "zlib";
  j["cluster_size"] = options.cluster_size;
  j["virtual_size"] = stats.virtual_size;
  j["bytes_read"] = stats.bytes_read;
  j["zero_bytes_skipped"] = stats.zero_bytes_skipped;
  j["compressed_bytes"] = stats.compressed_bytes;
  j["clusters_compressed"] = stats.clusters_compressed;
  j["clusters_uncompressed"] = stats.clusters_uncompressed;
  j["clusters_zero"] = stats.clusters_zero;
  j["clusters_unchanged"] = stats.clusters_unchanged;
  if (!options.backing_file.empty()) {
    j["backing_file"] = options.backing_file;
    j["backing_format"] = options.backing_format;
  }
  if (!options.bitmap.empty()) j["bitmap"] = options.bitmap;
  j["output_file_size"] = stats.output_file_size;
  j["resumed_bytes"] = stats.resumed_bytes;
  if (options.salvage) {
    j["read_errors"] = stats.read_errors;
    j["unreadable_bytes"] = stats.unreadable_bytes;
  }
  if (!options.source_snapshot.empty()) j["snapshot"] = options.source_snapshot;
  if (!options.source_snapshot_id.empty()) j["snapshot_id"] = options.source_snapshot_id;
  if (!options.source_snapshot_name.empty()) j["snapshot_name"] = options.source_snapshot_name;
  j["wall_seconds"] = stats.wall_seconds;
  j["cpu_seconds"] = stats.cpu_seconds;
  j["throughput_mib_s"] = stats.throughput_mib_s;
  j["peak_rss_bytes"] = stats.peak_rss_bytes;
  return j;
}

void PrintHumanSummary(const ConvertStats& stats) {
  double ratio = stats.virtual_size == 0 ? 0.0
                                         : 100.0 * static_cast<double>(stats.output_file_size) /
                                               static_cast<double>(stats.virtual_size);
  fmt::print("Converted {} in {:.2f} s ({:.1f} MiB/s, {:.2f} s CPU, peak RSS {})\n",
             HumanSize(stats.virtual_size), stats.wall_seconds, stats.throughput_mib_s,
             stats.cpu_seconds, HumanSize(stats.peak_rss_bytes));
  fmt::print(
      "Output {} ({:.1f}% of the virtual size): {} clusters compressed, {} stored "
      "uncompressed, {} zero, {} unchanged; {} read, {} skipped as zero\n",
      HumanSize(stats.output_file_size), ratio, stats.clusters_compressed,
      stats.clusters_uncompressed, stats.clusters_zero, stats.clusters_unchanged,
      HumanSize(stats.bytes_read), HumanSize(stats.zero_bytes_skipped));
}

// Builds ConvertOptions from the parsed arguments; usage mistakes are kInvalidArgument.
Result<ConvertOptions> BuildOptions(const ConvertArgs& args) {
  ConvertOptions options;
  if (!args.source_format.empty() && args.source_format != kFormatRaw &&
      args.source_format != kFormatQcow2) {
    return Status::InvalidArgument(
        fmt::format("-f: unknown format '{}' (expected raw or qcow2)", args.source_format));
  }
  ZQ_RETURN_IF_ERROR(RefuseUnsupported(args));
  options.source_format = args.source_format;
  options.force_share = args.force_share;
  if (!args.snapshot.empty() && !args.snapshot_param.empty()) {
    return Status::InvalidArgument("-s and -l: give the snapshot once");
  }
  options.source_snapshot = args.snapshot;
  if (!args.snapshot_param.empty()) {
    ZQ_RETURN_IF_ERROR(ApplySnapshotParam(args.snapshot_param, options));
  }
  if (!args.rate_limit.empty()) {
    ZQ_ASSIGN_OR_RETURN(options.read_rate_limit, ParseSize(args.rate_limit, "-r"));
    if (options.read_rate_limit == 0) {
      return Status::InvalidArgument("-r: the rate limit must be at least 1 byte per second");
    }
  }
  options.salvage = args.salvage;
  // qemu-img writes raw without -O; -c implies qcow2 (raw cannot be compressed).
  options.output_format = !args.output_format.empty() ? args.output_format
                          : args.compress             ? std::string(kFormatQcow2)
                                                      : std::string(kFormatRaw);
  if (options.output_format != kFormatQcow2 && options.output_format != kFormatRaw) {
    return Status::InvalidArgument(fmt::format(
        "-O: output format '{}' is not supported (raw or qcow2)", args.output_format));
  }
  const bool raw = options.output_format == kFormatRaw;
  if (raw && args.compress) {
    return Status::InvalidArgument("-c: raw output cannot be compressed (use -O qcow2)");
  }
  if (args.target_is_zero && !args.no_create) {
    return Status::InvalidArgument("--target-is-zero: needs -n (as qemu-img)");
  }
  if (args.no_create && !raw) {
    return Status::InvalidArgument("-n: only with raw output (zqcow creates qcow2 images itself)");
  }
  if (raw && !args.create_options.empty()) {
    return Status::InvalidArgument("-o: creation options do not apply to raw output");
  }
  options.no_create = args.no_create;
  options.target_is_zero = args.target_is_zero;
  if (!args.sparse_size.empty()) {
    ZQ_ASSIGN_OR_RETURN(options.sparse_size, ParseSize(args.sparse_size, "-S"));
    if (options.sparse_size % 512 != 0 || options.sparse_size > (uint64_t{16} << 20)) {
      return Status::InvalidArgument(
          fmt::format("-S: invalid minimum zero run '{}' (a multiple of 512 up to 16M; 0 writes "
                      "every byte)", args.sparse_size));
    }
    // qcow2 output: all-zero clusters are always left unallocated; -S is accepted as
    // qemu-img accepts it, and only -S 0 (write every cluster) cannot be honoured.
    if (!raw && options.sparse_size == 0) {
      return Status::InvalidArgument("-S 0: not supported for qcow2 output (zero clusters are "
                                     "always left unallocated)");
    }
  }
  options.compress = args.compress;
  if (!args.backing_format.empty() && args.backing_file.empty()) {
    return Status::InvalidArgument("-F: needs a backing file (-B)");
  }
  if (!args.backing_format.empty() && args.backing_format != kFormatQcow2) {
    return Status::InvalidArgument(
        fmt::format("-F: backing format '{}' is not supported (only qcow2)", args.backing_format));
  }
  if (!args.bitmap.empty() && args.backing_file.empty()) {
    return Status::InvalidArgument("--bitmap: needs the backing file it is relative to (-B)");
  }
  options.backing_file = args.backing_file;
  options.bitmap = args.bitmap;
  ZQ_RETURN_IF_ERROR(ApplyCreateOptions(args.create_options, options));
  ZQ_ASSIGN_OR_RETURN(options.target_io.direct_io, ParseCacheMode(args.target_cache, "-t"));
  ZQ_ASSIGN_OR_RETURN(options.source_direct_io, ParseCacheMode(args.source_cache, "-T"));
  // -t unsafe: qemu-img never flushes; zqcow takes no checkpoints (only the final sync
  // that makes the finished image durable before it is renamed into place).
  if (args.target_cache == "unsafe") options.checkpoint_seconds = 0;
  // writethrough, directsync: qemu-img flushes after every write; O_DSYNC does that.
  options.target_io.sync_writes =
      args.target_cache == "writethrough" || args.target_cache == "directsync";
  options.workers = args.workers;
  options.out_of_order = !args.in_order;
  options.overwrite = args.force;
  if (args.source_unchanged && !args.resume) {
    return Status::InvalidArgument("--source-unchanged: only means something with --resume");
  }
  options.resume = args.resume;
  options.source_unchanged = args.source_unchanged;
  if (args.target_cache != "unsafe") options.checkpoint_seconds = args.checkpoint_seconds;
  options.bitmap = args.bitmap;
  if (args.no_write_cache) {
    options.target_io.write_cache = IoOptions::WriteCache::kOff;
  } else if (!args.write_cache_size.empty()) {
    ZQ_ASSIGN_OR_RETURN(uint64_t bytes, ParseSize(args.write_cache_size, "--write-cache-size"));
    if (bytes == 0) {
      return Status::InvalidArgument("--write-cache-size: must be at least one cluster");
    }
    options.target_io.write_cache = IoOptions::WriteCache::kOn;
    options.target_io.write_cache_bytes = static_cast<size_t>(bytes);
  }
  if (args.drop_page_cache) {
    if (options.target_io.direct_io) {
      return Status::InvalidArgument("--drop-page-cache: needs a buffered target (not -t none)");
    }
    options.target_io.drop_page_cache = true;
  }
  return options;
}

int RunConvert(const ConvertArgs& args) {
  auto options_or = BuildOptions(args);
  if (!options_or.ok()) return ReportError(options_or.status());
  ConvertOptions options = std::move(options_or).value();
  std::optional<OutputFormat> output;
  if (!args.output.empty()) {
    auto format = ParseOutputFormat(args.output);
    if (!format.ok()) return ReportError(format.status());
    output = *format;
  }

  const bool progress = args.progress && !args.quiet;  // qemu-img: -q turns -p off
  ProgressBar bar(progress);
  if (progress) {
    options.progress = [&bar](const ConvertProgress& progress) { bar.Update(progress); };
  }
  CancelSignals::Install();
  options.cancel = CancelSignals::cancel_flag();

  Result<ConvertStats> stats = Convert(args.source, args.target, options);
  bar.Finish();
  if (!stats.ok()) {
    int signal_number = CancelSignals::received_signal();
    if (stats.status().code() == Status::Code::kInterrupted && signal_number != 0) {
      const std::string partial = PartialTargetPath(args.target);
      struct stat st {};
      const bool kept = stat(partial.c_str(), &st) == 0;
      const bool old_target = stat(args.target.c_str(), &st) == 0;
      PrintError(fmt::format(
          "interrupted by {}: {} {}{}", CancelSignals::SignalName(signal_number), args.target,
          old_target ? "is left as it was" : "was not created",
          kept ? "; the work done so far is in " + partial + " (continue with --resume)" : ""));
      return kExitSignalBase + signal_number;
    }
    return ReportError(stats.status());
  }
  if (stats->read_errors != 0) {
    // Like qemu-img's error lines, printed even with -q.
    PrintError(fmt::format("warning: {}: {} read error(s); {} could not be read and were "
                           "written as zeros (--salvage)",
                           args.source, stats->read_errors, HumanSize(stats->unreadable_bytes)));
  }
  if (output == OutputFormat::kJson) {
    PrintJson(StatsToJson(args, options, *stats));
  } else if (output == OutputFormat::kHuman || progress) {
    PrintHumanSummary(*stats);
  }
  return kExitOk;
}

}  // namespace

Subcommand AddConvertCommand(CLI::App& parent) {
  auto args = std::make_shared<ConvertArgs>();
  CLI::App* app = parent.add_subcommand(
      "convert",
      "Convert SRC (raw, qcow2 or NBD) into DST (raw, or a qcow2 image), like qemu-img convert");
  app->add_option("-f", args->source_format, "Source format: raw or qcow2 (default: detect)");
  app->add_option("-O", args->output_format,
                  "Output format: raw (the default without -c) or qcow2 (the default with -c)");
  app->add_flag("-n", args->no_create,
                "Raw output: DST exists (file, block device, NBD export) and is used as is");
  app->add_flag("--target-is-zero", args->target_is_zero,
                "With -n: DST reads as zeros already, zero ranges are not written");
  app->add_option("-S", args->sparse_size,
                  "Raw output: zero runs of at least SIZE bytes stay holes (default 4k; "
                  "0 writes every byte)");
  app->add_flag("-c", args->compress, "Compress the clusters of the target");
  app->add_option("-o", args->create_options,
                  "Creation options key=value[,...]: compression_type=zlib|zstd, "
                  "compression_level=N, cluster_size=SIZE, refcount_bits=N ('-o help' lists them)")
      ->allow_extra_args(false);
  app->add_option("-t", args->target_cache,
                  "Target cache mode: none (O_DIRECT), directsync (O_DIRECT + O_DSYNC), "
                  "writeback (default), writethrough (O_DSYNC), unsafe (no checkpoints)");
  app->add_option("-T", args->source_cache,
                  "Source cache mode: none/directsync (O_DIRECT), writeback (default), "
                  "writethrough, unsafe");
  app->add_option("-m", args->workers,
                  "Worker threads (default: one per CPU); at most one per CPU compresses at "
                  "a time, more read a qcow2 source in parallel")
      ->check(CLI::Range(1u, kMaxWorkers));
  CLI::Option* w = app->add_flag("-W", args->out_of_order_flag,
                                 "Out-of-order writes (the default; accepted for compatibility)");
  app->add_flag("--in-order", args->in_order, "Write clusters in guest order")->excludes(w);
  app->add_flag("-p", args->progress, "Show progress on stderr and a summary at the end");
  app->add_option("--output", args->output, "Print a final summary: human or json");
  app->add_flag("--force", args->force,
                "Replace DST if it exists (once the new image is complete); without --resume, "
                "also discard a partial image an interrupted conversion left");
  app->add_flag("--resume", args->resume,
                "Continue the interrupted conversion whose partial image DST.zqcow-partial "
                "is left, if the options match and SRC did not change (else start anew)");
  app->add_flag("--source-unchanged", args->source_unchanged,
                "With --resume from a block device: your word that it did not change");
  CLI::Option* no_cache =
      app->add_flag("--no-write-cache", args->no_write_cache, "Disable the compressed write cache");
  app->add_option("--write-cache-size", args->write_cache_size,
                  "Enable the compressed write cache with this size (e.g. 4M)")
      ->excludes(no_cache);
  app->add_option("--checkpoint", args->checkpoint_seconds,
                  "Flush the target every SECONDS so a crash keeps the work done so far "
                  "(default 5; 0 = only at the end)")
      ->check(CLI::Validator(
          [](std::string& text) -> std::string {
            char* end = nullptr;
            const double value = std::strtod(text.c_str(), &end);
            if (end == text.c_str() || *end != '\0' || !std::isfinite(value) || value < 0) {
              return "'" + text + "' is not a number of seconds >= 0";
            }
            return "";
          },
          "SECONDS"));
  app->add_flag("--drop-page-cache", args->drop_page_cache,
                "Buffered target: drop written data from the page cache as it goes");
  app->add_option("-B", args->backing_file,
                  "Incremental backup: DST becomes an overlay of this qcow2 image (named as "
                  "given; relative to DST's directory) holding only what changed");
  app->add_option("-F", args->backing_format, "Format of the -B image (only qcow2)");
  app->add_option("--bitmap", args->bitmap,
                  "With -B: take the changed clusters from this dirty bitmap of the source "
                  "(NBD qemu:dirty-bitmap:NAME) instead of comparing with the -B image");
  app->add_flag("-q", args->quiet, "Quiet: no progress, no summary unless --output asks");
  app->add_option("-s", args->snapshot,
                  "Convert this internal snapshot (id, else name) of a qcow2 SRC");
  app->add_option("-l", args->snapshot_param,
                  "Convert an internal snapshot: snapshot.id=ID[,snapshot.name=NAME], or "
                  "an id or name as -s");
  app->add_option("-r", args->rate_limit,
                  "Limit reads from SRC to RATE bytes per second (k, M, G suffixes)");
  app->add_flag("--salvage", args->salvage,
                "Continue past read errors of SRC, writing what cannot be read as zeros "
                "(counted in the summary and a warning)");
  app->add_flag("-C", args->copy_offload, "Copy offloading (not supported: refused)");
  app->add_flag("--bitmaps", args->bitmaps, "Copy persistent bitmaps (not supported: refused)");
  // SRC and DST are checked in `run` so that `-o help` works without them.
  app->add_flag("-U,--force-share", args->force_share,
                "Read SRC even if another process writes it (qemu-img's -U); the copy may be torn");
  app->add_option("SRC", args->source,
                  "Source image (raw file, block device, qcow2, or an NBD URI: "
                  "nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)");
  app->add_option("DST", args->target,
                  "Target: a new file (raw or qcow2), or with raw output a block device or "
                  "an NBD URI");
  return {app, [args] {
            for (const std::string& arg : args->create_options) {
              if (arg == "help" || arg == "?") {
                fmt::print("{}", kCreateOptionsHelp);
                return kExitOk;
              }
            }
            if (args->source.empty() || args->target.empty()) {
              // An option error first: `-t SRC DST` took SRC as the cache mode.
              auto options = BuildOptions(*args);
              if (!options.ok()) return ReportError(options.status());
              PrintError("convert: SRC and DST are required (see zqcow convert --help)");
              return kExitError;
            }
            return RunConvert(*args);
          }};
}

}  // namespace zqcow::cli
