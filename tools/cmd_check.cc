// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow check IMG`: like qemu-img check (no repair). Exit codes: 0 clean and complete,
// 1 the check could not run, 2 corruption, 3 leaks only or incomplete (dirty) without
// corruption.

#include <fmt/format.h>

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
  bool force_share = false;  // -U
};

int ExitCodeFor(const CheckResult& result, const ImageInfo& info) {
  if (result.corruptions > 0 || info.corrupt) return kExitCheckCorruption;
  if (result.leaks > 0 || result.incomplete || info.dirty) return kExitCheckLeaksOrIncomplete;
  return kExitOk;
}

uint64_t TotalClusters(const ImageInfo& info) {
  if (info.cluster_size == 0) return 0;
  return (info.virtual_size + info.cluster_size - 1) / info.cluster_size;
}

double Percent(uint64_t part, uint64_t whole) {
  return whole == 0 ? 0.0 : 100.0 * static_cast<double>(part) / static_cast<double>(whole);
}

void PrintHuman(const CheckResult& result, const ImageInfo& info) {
  for (const std::string& message : result.messages) fmt::print("{}\n", message);
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
  if (info.corrupt) fmt::print("The image is marked corrupt (its corrupt bit is set).\n");
  if (result.incomplete || info.dirty) fmt::print("{}\n", kIncompleteMessage);
  uint64_t total = TotalClusters(info);
  fmt::print("{}/{} = {:.2f}% allocated, {:.2f}% compressed clusters\n", result.allocated_clusters,
             total, Percent(result.allocated_clusters, total),
             Percent(result.compressed_clusters, result.allocated_clusters));
  fmt::print("Image end offset: {}\n", result.image_end_offset);
}

nlohmann::json CheckJson(const std::string& path, const CheckResult& result,
                         const ImageInfo& info) {
  nlohmann::json j;
  j["filename"] = path;
  j["format"] = kFormatQcow2;
  j["check-errors"] = 0;
  j["corruptions"] = result.corruptions;
  j["leaks"] = result.leaks;
  j["image-end-offset"] = result.image_end_offset;
  j["total-clusters"] = TotalClusters(info);
  j["allocated-clusters"] = result.allocated_clusters;
  j["compressed-clusters"] = result.compressed_clusters;
  j["incomplete"] = result.incomplete || info.dirty;
  j["corrupt-flag"] = info.corrupt;
  j["messages"] = result.messages;
  return j;
}

int RunCheck(const CheckArgs& args) {
  auto output = ParseOutputFormat(args.output);
  if (!output.ok()) return ReportError(output.status());
  auto format = ResolveFormat(args.path, args.format);
  if (!format.ok()) return ReportError(format.status());
  if (*format != kFormatQcow2) {
    PrintError(fmt::format("{}: raw images have no metadata to check", args.path));
    return kExitError;
  }
  auto info = ReadImageInfo(args.path, args.force_share);
  if (!info.ok()) return ReportError(info.status());
  auto result = CheckImage(args.path, args.force_share);
  if (!result.ok()) return ReportError(result.status());
  if (*output == OutputFormat::kJson) {
    PrintJson(CheckJson(args.path, *result, *info));
  } else {
    PrintHuman(*result, *info);
  }
  return ExitCodeFor(*result, *info);
}

}  // namespace

Subcommand AddCheckCommand(CLI::App& parent) {
  auto args = std::make_shared<CheckArgs>();
  CLI::App* app = parent.add_subcommand(
      "check", "Check a qcow2 image's metadata for corruption, leaks and incompleteness");
  app->add_option("-f", args->format, "Format: qcow2 (default: detect)");
  app->add_option("--output", args->output, "human (default) or json");
  app->add_flag("-U,--force-share", args->force_share, "Read even if another process writes the image (qemu-img's -U); the result may be inconsistent");
  app->add_option("IMG", args->path, "The image")->required();
  return {app, [args] { return RunCheck(*args); }};
}

}  // namespace zqcow::cli
