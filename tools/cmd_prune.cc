// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow prune DIR --keep N`: keeps the newest N restore points of the backup chains in
// DIR, merging the oldest kept point's chain into a full image and removing older images.

#include <fmt/format.h>

#include <memory>
#include <string>

#include "cli_common.h"
#include "commands.h"
#include "zqcow/backup.h"

namespace zqcow::cli {
namespace {

// The pipeline's limit (src/convert/convert.cc clamps there).
constexpr unsigned kMaxWorkers = 256;

struct PruneArgs {
  std::string dir;
  unsigned keep = 0;
  bool dry_run = false;
  unsigned workers = 0;
  std::string output = "human";
};

void PrintHuman(const PruneResult& result, const std::string& dir, unsigned keep) {
  const char* would = result.dry_run ? "would be " : "";
  for (const std::string& note : result.notes) fmt::print("note: {}\n", note);
  if (!result.merged.empty()) {
    fmt::print("{}/{}: {}merged with the {} image(s) below it into a compressed full image\n", dir,
               result.merged, would, result.merged_from.size() - 1);
  }
  for (const std::string& chain : result.dropped_chains) {
    fmt::print("chain {}: {}removed whole\n", chain, would);
  }
  for (const std::string& file : result.removed) fmt::print("{}/{}: {}removed\n", dir, file, would);
  if (result.points_before <= keep) {
    fmt::print("{} holds {} restore point(s), no more than --keep {}: nothing to prune\n", dir,
               result.points_before, keep);
    return;
  }
  fmt::print("{}: {} restore point(s){} {}\n", dir, result.points_before,
             result.dry_run ? ", a prune would keep" : ", kept", result.points_after);
}

nlohmann::json ResultJson(const PruneResult& result, const std::string& dir, unsigned keep) {
  return {{"directory", dir},
          {"keep", keep},
          {"dry_run", result.dry_run},
          {"points_before", result.points_before},
          {"points_after", result.points_after},
          {"merged", result.merged},
          {"merged_from", result.merged_from},
          {"dropped_chains", result.dropped_chains},
          {"removed", result.removed},
          {"notes", result.notes}};
}

int RunPrune(const PruneArgs& args) {
  Result<OutputFormat> output = ParseOutputFormat(args.output);
  if (!output.ok()) return ReportError(output.status());
  if (args.keep == 0) {
    return ReportError(Status::InvalidArgument(
        "--keep 0: a prune keeps at least one restore point (use --keep 1 or more)"));
  }
  CancelSignals::Install();
  PruneOptions options{.keep = args.keep,
                       .dry_run = args.dry_run,
                       .workers = args.workers,
                       .cancel = CancelSignals::cancel_flag()};
  Result<PruneResult> result = Prune(args.dir, options);
  if (!result.ok()) {
    const int signal_number = CancelSignals::received_signal();
    if (result.status().code() == Status::Code::kInterrupted && signal_number != 0) {
      PrintError(fmt::format("interrupted by {}: {} still holds every restore point",
                             CancelSignals::SignalName(signal_number), args.dir));
      return kExitSignalBase + signal_number;
    }
    return ReportError(result.status());
  }
  if (*output == OutputFormat::kJson) {
    PrintJson(ResultJson(*result, args.dir, args.keep));
  } else {
    PrintHuman(*result, args.dir, args.keep);
  }
  return kExitOk;
}

}  // namespace

Subcommand AddPruneCommand(CLI::App& parent) {
  auto args = std::make_shared<PruneArgs>();
  CLI::App* app = parent.add_subcommand(
      "prune",
      "Keep the newest N restore points of the backup chains in DIR: merge the oldest kept "
      "point into a full image, remove older images (crash safe)");
  app->add_option("--keep", args->keep, "Restore points to keep (1 or more)")->required();
  app->add_flag("--dry-run,-n", args->dry_run, "Print what would be done, change nothing");
  app->add_option("-m", args->workers, "Worker threads of the merge (default: one per CPU)")
      ->check(CLI::Range(1u, kMaxWorkers));
  app->add_option("--output", args->output, "human (default) or json");
  app->add_option("DIR", args->dir, "The backup directory")->required();
  return {app, [args] { return RunPrune(*args); }};
}

}  // namespace zqcow::cli
