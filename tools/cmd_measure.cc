// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow measure`: qemu-img measure for a qcow2 output, plus (-c) an estimate of the
// compressed image's size, sampled.

#include <fmt/format.h>

#include <memory>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "create_options.h"
#include "measure.h"

namespace zqcow::cli {
namespace {

// Clusters compressed for the estimate by default: 32 MiB at 64 KiB, a fraction of a
// second with the default codecs, and an interval of a few percent on mixed data.
constexpr uint64_t kDefaultSampleClusters = 512;

struct MeasureArgs {
  std::string source;
  std::string source_format;
  std::string output_format = std::string(kFormatQcow2);
  std::vector<std::string> create_options;
  bool compress = false;
  std::string size;
  std::string snapshot_param;  // -l
  std::string output = "human";
  bool force_share = false;
  uint64_t samples = kDefaultSampleClusters;
};

nlohmann::json ToJson(const Measurement& m, const ConvertOptions& options) {
  nlohmann::json j;
  j["required"] = m.required;
  j["fully-allocated"] = m.fully_allocated;
  if (m.compressed) {
    nlohmann::json c;
    c["estimate"] = m.compressed->estimate;
    c["low"] = m.compressed->low;
    c["high"] = m.compressed->high;
    c["confidence"] = 0.95;
    c["sampled-clusters"] = m.compressed->sampled_clusters;
    c["data-clusters"] = m.data_clusters;
    c["compression-type"] = options.compression == Compression::kZstd ? "zstd" : "zlib";
    j["compressed"] = c;
  }
  return j;
}

int RunMeasure(const MeasureArgs& args) {
  ConvertOptions options;
  if (args.output_format != kFormatQcow2) {
    PrintError(fmt::format("-O: output format '{}' is not supported (measure: qcow2 only)",
                           args.output_format));
    return kExitError;
  }
  Status applied = ApplyCreateOptions(args.create_options, options);
  if (applied.ok() && !args.snapshot_param.empty()) {
    applied = ApplySnapshotParam(args.snapshot_param, options);
  }
  if (!applied.ok()) return ReportError(applied);
  options.compress = args.compress;
  auto format = ParseOutputFormat(args.output);
  if (!format.ok()) return ReportError(format.status());
  if (args.source.empty() == args.size.empty()) {
    PrintError("measure: give either SRC or --size (see zqcow measure --help)");
    return kExitError;
  }

  std::unique_ptr<convert::Source> source;
  uint64_t virtual_size = 0;
  if (!args.size.empty()) {
    auto size = ParseSize(args.size, "--size");
    if (!size.ok()) return ReportError(size.status());
    virtual_size = *size;
  } else {
    convert::SourceOptions source_options;
    source_options.format = args.source_format;
    source_options.force_share = args.force_share;
    source_options.snapshot = options.source_snapshot;
    source_options.snapshot_id = options.source_snapshot_id;
    source_options.snapshot_name = options.source_snapshot_name;
    auto opened = convert::OpenSource(args.source, source_options);
    if (!opened.ok()) return ReportError(opened.status());
    source = std::move(opened).value();
    // As qemu-img sees a raw file's size: whole 512-byte sectors.
    virtual_size = (source->size() + 511) / 512 * 512;
  }
  auto measured = Measure(source.get(), virtual_size, options, args.samples);
  if (source) (void)source->Close();
  if (!measured.ok()) return ReportError(measured.status());
  const Measurement& m = *measured;
  if (*format == OutputFormat::kJson) {
    PrintJson(ToJson(m, options));
    return kExitOk;
  }
  fmt::print("required size: {}\nfully allocated size: {}\n", m.required, m.fully_allocated);
  if (m.compressed) {
    fmt::print(
        "compressed size: {} (estimate, {}: 95% interval {} .. {}; {} of {} data clusters "
        "sampled)\n",
        m.compressed->estimate, options.compression == Compression::kZstd ? "zstd" : "zlib",
        m.compressed->low, m.compressed->high, m.compressed->sampled_clusters, m.data_clusters);
  }
  return kExitOk;
}

}  // namespace

Subcommand AddMeasureCommand(CLI::App& parent) {
  auto args = std::make_shared<MeasureArgs>();
  CLI::App* app = parent.add_subcommand(
      "measure",
      "Sizes of a qcow2 image converted from SRC, like qemu-img measure; -c adds an estimate "
      "of the compressed size");
  app->add_option("-f", args->source_format, "Source format: raw or qcow2 (default: detect)");
  app->add_option("-O", args->output_format, "Output format (only qcow2)");
  app->add_option("-o", args->create_options,
                  "Creation options as for convert (cluster_size, refcount_bits, "
                  "compression_type, compression_level, compat, ...)")
      ->allow_extra_args(false);
  app->add_flag("-c", args->compress,
                "Also estimate the compressed image's size (a sample of the data clusters, "
                "compressed with the chosen codec)");
  app->add_option("--samples", args->samples,
                  "Clusters compressed for the -c estimate (default 512; more: narrower "
                  "interval)")
      ->check(CLI::Range(uint64_t{1}, uint64_t{1} << 40));
  app->add_option("--size", args->size, "Measure an empty image of this size instead of SRC");
  app->add_option("-l", args->snapshot_param,
                  "Measure an internal snapshot: snapshot.id=ID[,snapshot.name=NAME] or ID/NAME");
  app->add_flag("-U,--force-share", args->force_share, "Read SRC even if another process writes it");
  app->add_option("--output", args->output, "human (default) or json");
  app->add_option("SRC", args->source, "Source image (raw, qcow2, or an NBD URI)");
  return {app, [args] { return RunMeasure(*args); }};
}

}  // namespace zqcow::cli
