// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow restore DIR DST [--point N|TIME]`: writes a restore point of the backup chain in
// DIR to DST, raw by default (a file, a block device or an NBD export), or with -O qcow2 as
// a standalone compressed image.

#include <fmt/format.h>

#include <memory>
#include <optional>
#include <string>

#include "cli_common.h"
#include "commands.h"
#include "create_options.h"
#include "zqcow/backup.h"

namespace zqcow::cli {
namespace {

// The pipeline's limit (src/convert/convert.cc clamps there).
constexpr unsigned kMaxWorkers = 256;

struct RestoreArgs {
  std::string dir;
  std::string target;
  std::string point;
  std::string output_format = std::string(kFormatRaw);
  std::string target_cache = "writeback";
  std::string source_cache = "writeback";
  unsigned workers = 0;
  bool no_create = false;
  bool target_is_zero = false;
  bool force = false;
  bool progress = false;
  std::string output;  // "", "human" or "json"
};

int RunRestore(const RestoreArgs& args) {
  RestoreOptions options;
  ConvertOptions& convert = options.convert;
  if (args.output_format != kFormatRaw && args.output_format != kFormatQcow2) {
    return ReportError(Status::InvalidArgument(
        fmt::format("-O: output format '{}' is not supported (raw or qcow2)", args.output_format)));
  }
  if (args.target_is_zero && !args.no_create) {
    return ReportError(Status::InvalidArgument("--target-is-zero: needs -n"));
  }
  convert.output_format = args.output_format;
  convert.no_create = args.no_create;
  convert.target_is_zero = args.target_is_zero;
  convert.overwrite = args.force;
  convert.workers = args.workers;
  auto direct = ParseCacheMode(args.target_cache, "-t");
  if (!direct.ok()) return ReportError(direct.status());
  convert.target_io.direct_io = *direct;
  direct = ParseCacheMode(args.source_cache, "-T");
  if (!direct.ok()) return ReportError(direct.status());
  convert.source_direct_io = *direct;
  options.point = args.point;
  std::optional<OutputFormat> output;
  if (!args.output.empty()) {
    auto format = ParseOutputFormat(args.output);
    if (!format.ok()) return ReportError(format.status());
    output = *format;
  }
  ProgressBar bar(args.progress);
  if (args.progress) {
    convert.progress = [&bar](const ConvertProgress& progress) { bar.Update(progress); };
  }
  CancelSignals::Install();
  convert.cancel = CancelSignals::cancel_flag();

  Result<RestoreResult> result = Restore(args.dir, args.target, options);
  bar.Finish();
  if (!result.ok()) {
    const int signal_number = CancelSignals::received_signal();
    if (result.status().code() == Status::Code::kInterrupted && signal_number != 0) {
      PrintError(fmt::format("interrupted by {}: {} is not complete",
                             CancelSignals::SignalName(signal_number), args.target));
      return kExitSignalBase + signal_number;
    }
    return ReportError(result.status());
  }
  const ConvertStats& stats = result->stats;
  if (output == OutputFormat::kJson) {
    PrintJson({{"directory", args.dir},
               {"target", args.target},
               {"format", args.output_format},
               {"image", result->image.file},
               {"sequence", result->image.sequence},
               {"end_time", result->image.end_time},
               {"digest_checked", result->digest_checked},
               {"virtual_size", stats.virtual_size},
               {"bytes_read", stats.bytes_read},
               {"zero_bytes_skipped", stats.zero_bytes_skipped},
               {"output_file_size", stats.output_file_size},
               {"wall_seconds", stats.wall_seconds},
               {"peak_rss_bytes", stats.peak_rss_bytes}});
  } else if (output == OutputFormat::kHuman || args.progress) {
    fmt::print("Restored {} (sequence {}, {}) to {}: {} in {:.2f} s, {} read, {} zero; "
               "content matches the backup's digest\n",
               result->image.file, result->image.sequence, result->image.end_time, args.target,
               HumanSize(stats.virtual_size), stats.wall_seconds, HumanSize(stats.bytes_read),
               HumanSize(stats.zero_bytes_skipped));
  }
  return kExitOk;
}

}  // namespace

Subcommand AddRestoreCommand(CLI::App& parent) {
  auto args = std::make_shared<RestoreArgs>();
  CLI::App* app = parent.add_subcommand(
      "restore",
      "Restore a point of the backup chain in DIR to DST: raw (a file, block device or NBD "
      "export) or a standalone qcow2 image");
  app->add_option("--point", args->point,
                  "Sequence number, or UTC time (YYYY-MM-DD[THH:MM[:SS]]): the latest backup "
                  "finished by then (default: the last backup)");
  app->add_option("-O", args->output_format,
                  "Output format: raw (default) or qcow2 (compressed, standalone)");
  app->add_option("-t", args->target_cache,
                  "Target cache mode: none/directsync (O_DIRECT) or writeback (default)");
  app->add_option("-T", args->source_cache,
                  "Source cache mode: none/directsync (O_DIRECT) or writeback (default)");
  app->add_option("-m", args->workers, "Worker threads (default: two per CPU)")
      ->check(CLI::Range(1u, kMaxWorkers));
  app->add_flag("-n", args->no_create,
                "Raw output: DST exists (file, block device, NBD export) and is used as is");
  app->add_flag("--target-is-zero", args->target_is_zero,
                "With -n: DST reads as zeros already, zero ranges are not written");
  app->add_flag("--force", args->force, "Replace DST if it is an existing file");
  app->add_flag("-p", args->progress, "Show progress on stderr and a summary at the end");
  app->add_option("--output", args->output, "Print a final summary: human or json");
  app->add_option("DIR", args->dir, "The backup directory")->required();
  app->add_option("DST", args->target,
                  "Target: a new file, or with raw output a block device or an NBD URI "
                  "(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)")
      ->required();
  return {app, [args] { return RunRestore(*args); }};
}

}  // namespace zqcow::cli
