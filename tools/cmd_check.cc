// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow check IMG`: like qemu-img check. Exit codes: 0 clean and complete, 1 the check
// could not run, 2 corruption, 3 leaks only or incomplete (dirty) without corruption.
// `-r leaks` repairs leaked clusters (RepairImageLeaks) and checks again; `-r all` is
// refused. Findings ("Leaked cluster ...", "ERROR ...") go to stderr, as qemu-img prints
// them; -q prints nothing on stdout.

#include <fmt/format.h>

#include <cstdio>
#include <memory>
#include <string>

#include "cli_common.h"
#include "commands.h"
#include "zqcow/image.h"

namespace zqcow::cli {
namespace {

constexpr const char* kIncompleteMessage =
    "The image is incomplete: its dirty bit is set, so the last write to it (e.g. a "
    "conversion) was interrupted before it finished.";

struct CheckArgs {
  std::string path;
  std::string format;
  std::string output = "human";
  std::string repair;        // -r: "", "leaks" or "all"
  bool quiet = false;        // -q
  bool force_share = false;  // -U
};

int ExitCodeFor(const CheckResult& result) {
  if (result.corruptions > 0 || result.corrupt_flag) return kExitCheckCorruption;
  if (result.leaks > 0 || result.incomplete) return kExitCheckLeaksOrIncomplete;
  return kExitOk;
}

// qemu-img's "%.2f" of a percentage (printf rounding, which fmt does not share exactly).
std::string Percent(uint64_t part, uint64_t whole) {
  char text[32];
  snprintf(text, sizeof(text), "%.2f",
           whole == 0 ? 0.0 : 100.0 * static_cast<double>(part) / static_cast<double>(whole));
  return text;
}

void PrintHuman(const CheckResult& result) {
  for (const std::string& message : result.messages) fmt::print(stderr, "{}\n", message);
  std::fflush(stderr);
  if (result.corruptions == 0 && result.leaks == 0) {
    fmt::print("No errors were found on the image.\n");
  }
  if (result.corruptions > 0) {
    fmt::print(
        "\n{} errors were found on the image.\n"
        "Data may be corrupted, or further writes to the image may corrupt it.\n",
        result.corruptions);
  }
  if (result.leaks > 0) {
    fmt::print(
        "\n{} leaked clusters were found on the image.\n"
        "This means waste of disk space, but no harm to data.\n",
        result.leaks);
  }
  if (result.corrupt_flag) fmt::print("The image is marked corrupt (its corrupt bit is set).\n");
  if (result.incomplete) fmt::print("{}\n", kIncompleteMessage);
  const uint64_t total = result.total_clusters;
  if (total != 0 && result.allocated_clusters != 0) {
    fmt::print("{}/{} = {}% allocated, {}% fragmented, {}% compressed clusters\n",
               result.allocated_clusters, total, Percent(result.allocated_clusters, total),
               Percent(result.fragmented_clusters, result.allocated_clusters),
               Percent(result.compressed_clusters, result.allocated_clusters));
  }
  if (result.image_end_offset != 0) {
    fmt::print("Image end offset: {}\n", result.image_end_offset);
  }
}

// qemu-img check --output=json's keys, each present when qemu-img prints it (counters only
// when not 0), plus zqcow's own: "incomplete", "corrupt-flag" and "messages".
nlohmann::json CheckJson(const std::string& path, const CheckResult& result,
                         uint64_t leaks_fixed) {
  nlohmann::json j;
  j["filename"] = path;
  j["format"] = kFormatQcow2;
  j["check-errors"] = 0;
  auto counter = [&j](const char* key, uint64_t value) {
    if (value != 0) j[key] = value;
  };
  counter("corruptions", result.corruptions);
  counter("leaks", result.leaks);
  counter("leaks-fixed", leaks_fixed);
  counter("image-end-offset", result.image_end_offset);
  counter("total-clusters", result.total_clusters);
  counter("allocated-clusters", result.allocated_clusters);
  counter("fragmented-clusters", result.fragmented_clusters);
  counter("compressed-clusters", result.compressed_clusters);
  j["incomplete"] = result.incomplete;
  j["corrupt-flag"] = result.corrupt_flag;
  j["messages"] = result.messages;
  return j;
}

void PrintRepaired(uint64_t leaks_fixed) {
  fmt::print(
      "The following inconsistencies were found and repaired:\n\n"
      "    {} leaked clusters\n"
      "    0 corruptions\n\n"
      "Double checking the fixed image now...\n",
      leaks_fixed);
}

int RunCheck(const CheckArgs& args) {
  auto output = ParseOutputFormat(args.output);
  if (!output.ok()) return ReportError(output.status());
  if (!args.repair.empty() && args.repair != "leaks") {
    if (args.repair == "all") {
      PrintError(
          "check -r all: repairing corruptions is not supported (only -r leaks); use "
          "qemu-img check -r all");
    } else {
      PrintError(fmt::format("check -r: unknown option value '{}' (leaks or all)", args.repair));
    }
    return kExitError;
  }
  if (!args.repair.empty() && args.force_share) {
    PrintError("check: -U cannot be combined with -r (a repair writes the image)");
    return kExitError;
  }
  auto format = ResolveFormat(args.path, args.format);
  if (!format.ok()) return ReportError(format.status());
  if (*format != kFormatQcow2) {
    PrintError(fmt::format("{}: raw images have no metadata to check", args.path));
    return kExitError;
  }
  auto result = CheckImage(args.path, args.force_share);
  if (!result.ok()) return ReportError(result.status());
  uint64_t leaks_fixed = 0;
  if (!args.repair.empty() && result->leaks > 0) {
    if (result->corruptions > 0) {
      if (!args.quiet) {
        if (*output == OutputFormat::kJson) {
          PrintJson(CheckJson(args.path, *result, 0));
        } else {
          PrintHuman(*result);
        }
      }
      PrintError(fmt::format(
          "{}: {} corruption(s) found; -r leaks repairs leaks only on an image without "
          "other errors (nothing was written)",
          args.path, result->corruptions));
      return kExitCheckCorruption;
    }
    if (*output == OutputFormat::kHuman) {
      for (const std::string& message : result->messages) fmt::print(stderr, "{}\n", message);
    }
    auto repaired = RepairImageLeaks(args.path);
    if (!repaired.ok()) return ReportError(repaired.status());
    leaks_fixed = *repaired;
    if (!args.quiet && *output == OutputFormat::kHuman) PrintRepaired(leaks_fixed);
    result = CheckImage(args.path);
    if (!result.ok()) return ReportError(result.status());
  }
  if (!args.quiet) {
    if (*output == OutputFormat::kJson) {
      PrintJson(CheckJson(args.path, *result, leaks_fixed));
    } else {
      PrintHuman(*result);
    }
  }
  return ExitCodeFor(*result);
}

}  // namespace

Subcommand AddCheckCommand(CLI::App& parent) {
  auto args = std::make_shared<CheckArgs>();
  CLI::App* app = parent.add_subcommand(
      "check", "Check a qcow2 image's metadata for corruption, leaks and incompleteness");
  app->add_option("-f", args->format, "Format: qcow2 (default: detect)");
  app->add_option("--output", args->output, "human (default) or json");
  app->add_option("-r", args->repair,
                  "leaks: repair leaked clusters (qemu-img's -r leaks); -r all is not supported");
  app->add_flag("-q,--quiet", args->quiet, "Print nothing on stdout; the exit code tells");
  app->add_flag("-U,--force-share", args->force_share, "Read even if another process writes the image (qemu-img's -U); the result may be inconsistent");
  app->add_option("IMG", args->path, "The image")->required();
  return {app, [args] { return RunCheck(*args); }};
}

}  // namespace zqcow::cli
