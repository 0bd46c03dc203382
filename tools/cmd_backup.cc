// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow backup SOURCE DIR`: adds a compressed image of SOURCE to the backup chain in DIR
// (a full image or an incremental overlay of the last one) and lists it in DIR's manifest.

#include <fmt/format.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "create_options.h"
#include "zqcow/backup.h"

namespace zqcow::cli {
namespace {

// The pipeline's limit (src/convert/convert.cc clamps there).
constexpr unsigned kMaxWorkers = 256;

struct BackupArgs {
  std::string source;
  std::string dir;
  std::string level = "auto";
  std::string bitmap;
  std::string name;
  unsigned max_incrementals = BackupOptions().max_incrementals;
  unsigned keep = 0;
  std::string source_format;
  bool compress = true;  // -c: accepted, always on
  std::vector<std::string> create_options;
  std::string target_cache = "writeback";
  std::string source_cache = "writeback";
  unsigned workers = 0;
  bool force_share = false;
  bool progress = false;
  std::string output = "human";
};

Result<BackupOptions> BuildOptions(const BackupArgs& args) {
  BackupOptions options;
  if (args.level == "auto") {
    options.level = BackupLevel::kAuto;
  } else if (args.level == "full") {
    options.level = BackupLevel::kFull;
  } else if (args.level == "inc" || args.level == "incremental") {
    options.level = BackupLevel::kIncremental;
  } else {
    return Status::InvalidArgument(
        fmt::format("--level: unknown level '{}' (expected full, inc or auto)", args.level));
  }
  options.bitmap = args.bitmap;
  options.disk_name = args.name;
  options.max_incrementals = args.max_incrementals;
  options.keep = args.keep;
  ConvertOptions& convert = options.convert;
  if (!args.source_format.empty() && args.source_format != kFormatRaw &&
      args.source_format != kFormatQcow2) {
    return Status::InvalidArgument(
        fmt::format("-f: unknown format '{}' (expected raw or qcow2)", args.source_format));
  }
  convert.source_format = args.source_format;
  ZQ_RETURN_IF_ERROR(ApplyCreateOptions(args.create_options, convert));
  ZQ_ASSIGN_OR_RETURN(convert.target_io.direct_io, ParseCacheMode(args.target_cache, "-t"));
  ZQ_ASSIGN_OR_RETURN(convert.source_direct_io, ParseCacheMode(args.source_cache, "-T"));
  convert.workers = args.workers;
  convert.force_share = args.force_share;
  return options;
}

void PrintHuman(const BackupResult& result, const std::string& dir) {
  const BackupImage& image = result.image;
  fmt::print("{}/{}: {} backup of {} ({}), chain {}{}\n", dir, image.file, image.level,
             image.source, HumanSize(image.virtual_size), image.chain_id,
             image.backing_file.empty() ? "" : ", on top of " + image.backing_file);
  fmt::print("Read {}, wrote {} in {:.2f} s; content digest {}\n", HumanSize(image.bytes_read),
             HumanSize(image.file_size), result.stats.wall_seconds, image.content_digest);
}

int RunBackup(const BackupArgs& args) {
  Result<BackupOptions> options_or = BuildOptions(args);
  if (!options_or.ok()) return ReportError(options_or.status());
  BackupOptions options = std::move(options_or).value();
  Result<OutputFormat> output = ParseOutputFormat(args.output);
  if (!output.ok()) return ReportError(output.status());

  ProgressBar bar(args.progress);
  if (args.progress) {
    options.convert.progress = [&bar](const ConvertProgress& progress) { bar.Update(progress); };
  }
  CancelSignals::Install();
  options.convert.cancel = CancelSignals::cancel_flag();

  Result<BackupResult> result = Backup(args.source, args.dir, options);
  bar.Finish();
  if (!result.ok()) {
    const int signal_number = CancelSignals::received_signal();
    if (result.status().code() == Status::Code::kInterrupted && signal_number != 0) {
      PrintError(fmt::format("interrupted by {}: no image was added to {}",
                             CancelSignals::SignalName(signal_number), args.dir));
      return kExitSignalBase + signal_number;
    }
    return ReportError(result.status());
  }
  for (const std::string& note : result->notes) fmt::print(stderr, "zqcow: {}\n", note);
  if (*output == OutputFormat::kJson) {
    fmt::print("{}\n", BackupImageToJson(result->image));
  } else {
    PrintHuman(*result, args.dir);
  }
  if (!result->prune_status.ok()) {
    PrintError(fmt::format("the backup {}/{} is complete, but the --keep {} prune failed: {}",
                           args.dir, result->image.file, args.keep,
                           result->prune_status.message()));
    return kExitError;
  }
  return kExitOk;
}

}  // namespace

Subcommand AddBackupCommand(CLI::App& parent) {
  auto args = std::make_shared<BackupArgs>();
  CLI::App* app = parent.add_subcommand(
      "backup",
      "Back SOURCE up into the chain in DIR: a full image or an incremental overlay of the "
      "last one, listed in DIR's manifest only once complete");
  app->add_option("--level", args->level,
                  "full, inc, or auto (default): full when DIR has no usable chain");
  app->add_option("--bitmap", args->bitmap,
                  "Dirty bitmap of the source marking what changed since the last backup");
  app->add_option("--name", args->name,
                  "Disk name the image files start with (default: from SOURCE)");
  app->add_option("--max-incrementals", args->max_incrementals,
                  "Take a full backup once the chain has this many incrementals (default 30)")
      ->check(CLI::Range(1u, 30u));
  app->add_option("--keep", args->keep,
                  "Then keep only the newest N restore points of DIR, as `zqcow prune --keep N`")
      ->check(CLI::Range(1u, 1000000u));
  app->add_option("-f", args->source_format, "Source format: raw or qcow2 (default: detect)");
  app->add_flag("-c", args->compress, "Compress (always on; accepted for convert's habits)");
  app->add_option("-o", args->create_options,
                  "Creation options key=value[,...]: compression_type=zlib|zstd, "
                  "compression_level=N, cluster_size=SIZE, refcount_bits=N")
      ->allow_extra_args(false);
  app->add_option("-t", args->target_cache,
                  "Target cache mode: none/directsync (O_DIRECT) or writeback (default)");
  app->add_option("-T", args->source_cache,
                  "Source cache mode: none/directsync (O_DIRECT) or writeback (default)");
  app->add_option("-m", args->workers, "Worker threads (default: one per CPU)")
      ->check(CLI::Range(1u, kMaxWorkers));
  app->add_flag("-U", args->force_share, "Open the source without QEMU's image locks");
  app->add_flag("-p", args->progress, "Show progress on stderr");
  app->add_option("--output", args->output,
                  "human (default) or json (the new image's manifest entry)");
  app->add_option("SOURCE", args->source, "The disk: raw file, block device or qcow2 image")
      ->required();
  app->add_option("DIR", args->dir, "The backup directory (created if missing)")->required();
  return {app, [args] { return RunBackup(*args); }};
}

}  // namespace zqcow::cli
