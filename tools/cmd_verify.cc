// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow verify DIR`: proves the backup chains in DIR, reading only. Exit codes like
// check's: 0 every image is sound, 1 verification could not run, 2 an image is damaged,
// missing or not the one the manifest lists, 3 incomplete or leaking images only.

#include <fmt/format.h>

#include <memory>
#include <string>

#include "cli_common.h"
#include "commands.h"
#include "zqcow/backup.h"

namespace zqcow::cli {
namespace {

struct VerifyArgs {
  std::string dir;
  std::string output = "human";
};

using Verdict = VerifiedImage::Verdict;

const char* VerdictName(Verdict verdict) {
  switch (verdict) {
    case Verdict::kOk:
      return "ok";
    case Verdict::kIncomplete:
      return "incomplete";
    case Verdict::kBad:
      return "bad";
  }
  return "bad";
}

int ExitCodeFor(Verdict verdict) {
  switch (verdict) {
    case Verdict::kOk:
      return kExitOk;
    case Verdict::kIncomplete:
      return kExitCheckLeaksOrIncomplete;
    case Verdict::kBad:
      return kExitCheckCorruption;
  }
  return kExitCheckCorruption;
}

void PrintHuman(const VerifyReport& report) {
  for (const VerifiedImage& image : report.images) {
    const BackupImage& entry = image.image;
    fmt::print("{}: {} ({}, chain {}{})\n", entry.file, VerdictName(image.verdict), entry.level,
               entry.chain_id,
               entry.backing_file.empty() ? "" : ", backed by " + entry.backing_file);
    for (const std::string& problem : image.problems) fmt::print("  {}\n", problem);
  }
  for (const std::string& problem : report.problems) fmt::print("{}\n", problem);
  for (const std::string& note : report.notes) fmt::print("note: {}\n", note);
  const Verdict verdict = report.verdict();
  if (verdict == Verdict::kOk) {
    fmt::print("Backup chain in {} verified: {} image(s), all sound and matching the backup.\n",
               report.dir, report.images.size());
  } else {
    fmt::print("Backup chain in {} FAILED verification ({}).\n", report.dir, VerdictName(verdict));
  }
}

nlohmann::json ReportJson(const VerifyReport& report) {
  nlohmann::json images = nlohmann::json::array();
  for (const VerifiedImage& image : report.images) {
    images.push_back({{"file", image.image.file},
                      {"level", image.image.level},
                      {"chain_id", image.image.chain_id},
                      {"backing_file", image.image.backing_file},
                      {"verdict", VerdictName(image.verdict)},
                      {"recorded_digest", image.image.content_digest},
                      {"computed_digest", image.content_digest},
                      {"problems", image.problems}});
  }
  return {{"directory", report.dir},
          {"verdict", VerdictName(report.verdict())},
          {"images", std::move(images)},
          {"problems", report.problems},
          {"notes", report.notes}};
}

int RunVerify(const VerifyArgs& args) {
  Result<OutputFormat> output = ParseOutputFormat(args.output);
  if (!output.ok()) return ReportError(output.status());
  Result<VerifyReport> report = VerifyChain(args.dir);
  if (!report.ok()) return ReportError(report.status());
  if (*output == OutputFormat::kJson) {
    PrintJson(ReportJson(*report));
  } else {
    PrintHuman(*report);
  }
  return ExitCodeFor(report->verdict());
}

}  // namespace

Subcommand AddVerifyCommand(CLI::App& parent) {
  auto args = std::make_shared<VerifyArgs>();
  CLI::App* app = parent.add_subcommand(
      "verify",
      "Prove the backup chains in DIR without writing: every image checks clean, links as "
      "the manifest says and holds the content the backup read");
  app->add_option("--output", args->output, "human (default) or json");
  app->add_option("DIR", args->dir, "The backup directory")->required();
  return {app, [args] { return RunVerify(*args); }};
}

}  // namespace zqcow::cli
