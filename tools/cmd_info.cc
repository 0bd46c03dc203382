// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow info IMG`: like qemu-img info. JSON keys follow qemu-img info --output=json
// ("virtual-size", "cluster-size", "format-specific"...), plus "file-size" and "incomplete".
// --backing-chain: every image of the chain, the image first (JSON: an array).

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "guest_source.h"
#include "zqcow/image.h"

namespace zqcow::cli {
namespace {

constexpr uint64_t kStatBlockSize = 512;  // unit of st_blocks

struct InfoArgs {
  std::string path;
  std::string format;
  std::string output = "human";
  bool force_share = false;  // -U
  bool backing_chain = false;
};

struct FileSizes {
  uint64_t length = 0;     // bytes (also for block devices)
  uint64_t allocated = 0;  // bytes the file occupies on disk
};

Result<FileSizes> StatFile(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, path);
  struct stat st {};
  off_t end = -1;
  int err = 0;
  if (fstat(fd, &st) != 0 || (end = lseek(fd, 0, SEEK_END)) < 0) err = errno;
  close(fd);
  if (err != 0) return Status::FromErrno(err, path);
  return FileSizes{static_cast<uint64_t>(end),
                   static_cast<uint64_t>(st.st_blocks) * kStatBlockSize};
}

const char* CompressionName(Compression compression) {
  return compression == Compression::kZstd ? "zstd" : "zlib";
}

// A raw file's virtual size as qemu-img reports it: whole 512-byte sectors.
uint64_t RawVirtualSize(uint64_t length) { return (length + 511) / 512 * 512; }
std::vector<std::string> BitmapFlags(const BitmapSummary& bitmap) {
  std::vector<std::string> flags;
  if (bitmap.in_use) flags.push_back("in-use");
  if (bitmap.auto_enabled) flags.push_back("auto");
  return flags;
}

nlohmann::json InfoJson(const std::string& path, const std::string& format, const FileSizes& sizes,
                        const ImageInfo* info) {
  nlohmann::json j;
  j["filename"] = path;
  j["format"] = format;
  j["actual-size"] = sizes.allocated;
  j["file-size"] = sizes.length;
  if (info == nullptr) {
    j["virtual-size"] = RawVirtualSize(sizes.length);
    j["dirty-flag"] = false;
    return j;
  }
  j["virtual-size"] = info->virtual_size;
  j["cluster-size"] = info->cluster_size;
  j["dirty-flag"] = info->dirty;
  j["incomplete"] = info->dirty;
  if (!info->backing_file.empty()) {
    j["backing-filename"] = info->backing_file;
    j["full-backing-filename"] = FullBackingName(path, info->backing_file);
  }
  if (!info->backing_format.empty()) j["backing-filename-format"] = info->backing_format;
  if (!info->snapshots.empty()) {
    nlohmann::json list = nlohmann::json::array();
    for (const SnapshotInfo& snapshot : info->snapshots) {
      list.push_back({{"id", snapshot.id},
                      {"name", snapshot.name},
                      {"vm-state-size", snapshot.vm_state_size},
                      {"date-sec", snapshot.date_sec},
                      {"date-nsec", snapshot.date_nsec},
                      {"vm-clock-sec", snapshot.vm_clock_nsec / 1000000000},
                      {"vm-clock-nsec", snapshot.vm_clock_nsec % 1000000000},
                      {"icount", snapshot.icount}});
    }
    j["snapshots"] = std::move(list);
  }
  nlohmann::json data;
  data["compat"] = info->version >= 3 ? "1.1" : "0.10";
  data["compression-type"] = CompressionName(info->compression);
  data["refcount-bits"] = info->refcount_bits;
  if (info->version >= 3) {  // as qemu-img: version 2 images have none of these
    data["lazy-refcounts"] = info->lazy_refcounts;
    if (!info->bitmaps.empty()) {
      nlohmann::json bitmaps = nlohmann::json::array();
      for (const BitmapSummary& bitmap : info->bitmaps) {
        bitmaps.push_back({{"name", bitmap.name},
                           {"granularity", bitmap.granularity},
                           {"flags", BitmapFlags(bitmap)}});
      }
      data["bitmaps"] = std::move(bitmaps);
    }
    data["corrupt"] = info->corrupt;
    data["extended-l2"] = info->extended_l2;
  }
  j["format-specific"] = {{"type", "qcow2"}, {"data", data}};
  return j;
}

void PrintHuman(const std::string& path, const std::string& format, const FileSizes& sizes,
                const ImageInfo* info) {
  uint64_t virtual_size = info ? info->virtual_size : RawVirtualSize(sizes.length);
  fmt::print("image: {}\n", path);
  fmt::print("file format: {}\n", format);
  fmt::print("virtual size: {} ({} bytes)\n", HumanSize(virtual_size), virtual_size);
  fmt::print("disk size: {}\n", HumanSize(sizes.allocated));
  if (info == nullptr) return;
  fmt::print("cluster_size: {}\n", info->cluster_size);
  if (!info->backing_file.empty()) fmt::print("backing file: {}\n", info->backing_file);
  if (!info->backing_format.empty()) {
    fmt::print("backing file format: {}\n", info->backing_format);
  }
  if (!info->snapshots.empty()) {
    fmt::print("Snapshot list:\n");
    fmt::print("{:<10}{:<18}{:>7}{:>20}{:>13}{:>11}\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
               "ICOUNT");
    for (const SnapshotInfo& snapshot : info->snapshots) {
      const time_t date = snapshot.date_sec;
      struct tm tm_date;
      localtime_r(&date, &tm_date);
      char date_text[32];
      strftime(date_text, sizeof(date_text), "%Y-%m-%d %H:%M:%S", &tm_date);
      const uint64_t clock_ms = snapshot.vm_clock_nsec / 1000000;
      const std::string clock =
          fmt::format("{:02}:{:02}:{:02}.{:03}", clock_ms / 3600000, clock_ms / 60000 % 60,
                      clock_ms / 1000 % 60, clock_ms % 1000);
      fmt::print("{:<10}{:<18}{:>7}{:>20}{:>13}{:>11}\n", snapshot.id, snapshot.name,
                 HumanSize(snapshot.vm_state_size), date_text, clock, snapshot.icount);
    }
  }
  fmt::print("Format specific information:\n");
  fmt::print("    compat: {}\n", info->version >= 3 ? "1.1" : "0.10");
  fmt::print("    compression type: {}\n", CompressionName(info->compression));
  if (info->version >= 3) fmt::print("    lazy refcounts: {}\n", info->lazy_refcounts);
  if (!info->bitmaps.empty()) {
    fmt::print("    bitmaps:\n");
    for (size_t i = 0; i < info->bitmaps.size(); ++i) {
      const BitmapSummary& bitmap = info->bitmaps[i];
      fmt::print("        [{}]:\n            flags:\n", i);
      const std::vector<std::string> flags = BitmapFlags(bitmap);
      for (size_t f = 0; f < flags.size(); ++f) {
        fmt::print("                [{}]: {}\n", f, flags[f]);
      }
      fmt::print("            name: {}\n            granularity: {}\n", bitmap.name,
                 bitmap.granularity);
    }
  }
  fmt::print("    refcount bits: {}\n", info->refcount_bits);
  if (info->version >= 3) {
    fmt::print("    corrupt: {}\n", info->corrupt);
    fmt::print("    extended l2: {}\n", info->extended_l2);
  }
  // qemu-img prints no dirty flag line; zqcow adds one when the image is incomplete.
  if (info->dirty) {
    fmt::print("dirty flag: true (incomplete: the last write to the image was interrupted)\n");
  }
}

// An NBD export: what qemu-img info says of one (raw, its size; no file to measure).
int RunNbdInfo(const InfoArgs& args, OutputFormat output) {
  auto source = GuestSource::Open(args.path, args.format);
  if (!source.ok()) return ReportError(source.status());
  const uint64_t virtual_size = (*source)->size();
  const std::string format = (*source)->format();
  if (output == OutputFormat::kJson) {
    PrintJson({{"virtual-size", virtual_size}, {"filename", args.path}, {"format", format}});
  } else {
    fmt::print("image: {}\n", args.path);
    fmt::print("file format: {}\n", format);
    fmt::print("virtual size: {} ({} bytes)\n", HumanSize(virtual_size), virtual_size);
    fmt::print("disk size: unavailable\n");
  }
  return kExitOk;
}

// One image of the output: its name, format, sizes and (qcow2) header information.
struct ImageReport {
  std::string path;
  std::string format;
  FileSizes sizes;
  std::optional<ImageInfo> info;
};

Result<ImageReport> ReadReport(const std::string& path, const std::string& requested_format,
                               bool force_share) {
  ImageReport report;
  report.path = path;
  ZQ_ASSIGN_OR_RETURN(report.format, ResolveFormat(path, requested_format));
  ZQ_ASSIGN_OR_RETURN(report.sizes, StatFile(path));
  if (report.format == kFormatQcow2) {
    ZQ_ASSIGN_OR_RETURN(report.info, ReadImageInfo(path, force_share));
  }
  return report;
}

// The image and, with --backing-chain, its backing files down the chain (at most
// kMaxChainLength, a loop is an error).
constexpr size_t kMaxChainLength = 64;
Result<std::vector<ImageReport>> ReadChain(const InfoArgs& args) {
  std::vector<ImageReport> chain;
  std::string path = args.path;
  std::string format = args.format;
  while (true) {
    ZQ_ASSIGN_OR_RETURN(ImageReport report, ReadReport(path, format, args.force_share));
    chain.push_back(std::move(report));
    const ImageReport& last = chain.back();
    if (!args.backing_chain || !last.info || last.info->backing_file.empty()) break;
    if (chain.size() >= kMaxChainLength) {
      return Status::InvalidArgument(args.path + ": backing chain longer than " +
                                     std::to_string(kMaxChainLength) + " images (a loop?)");
    }
    path = FullBackingName(last.path, last.info->backing_file);
    format = last.info->backing_format;
  }
  return chain;
}

int RunInfo(const InfoArgs& args) {
  auto output = ParseOutputFormat(args.output);
  if (!output.ok()) return ReportError(output.status());
  if (convert::IsNbdUri(args.path)) return RunNbdInfo(args, *output);
  auto chain = ReadChain(args);
  if (!chain.ok()) return ReportError(chain.status());
  auto info_of = [](const ImageReport& r) { return r.info ? &*r.info : nullptr; };
  if (*output == OutputFormat::kJson) {
    if (!args.backing_chain) {
      const ImageReport& r = chain->front();
      PrintJson(InfoJson(r.path, r.format, r.sizes, info_of(r)));
    } else {
      nlohmann::json list = nlohmann::json::array();
      for (const ImageReport& r : *chain) {
        list.push_back(InfoJson(r.path, r.format, r.sizes, info_of(r)));
      }
      PrintJson(list);
    }
  } else {
    for (size_t i = 0; i < chain->size(); ++i) {
      const ImageReport& r = (*chain)[i];
      if (i > 0) fmt::print("\n");
      PrintHuman(r.path, r.format, r.sizes, info_of(r));
    }
  }
  return kExitOk;
}

}  // namespace

Subcommand AddInfoCommand(CLI::App& parent) {
  auto args = std::make_shared<InfoArgs>();
  CLI::App* app = parent.add_subcommand("info", "Show an image's format and properties");
  app->add_option("-f", args->format, "Format: raw or qcow2 (default: detect)");
  app->add_option("--output", args->output, "human (default) or json");
  app->add_flag("-U,--force-share", args->force_share, "Read even if another process writes the image (qemu-img's -U); the result may be inconsistent");
  app->add_flag("--backing-chain", args->backing_chain,
                "Show the image and every image of its backing chain");
  app->add_option("IMG", args->path, "The image (a file or an NBD URI)")->required();
  return {app, [args] { return RunInfo(*args); }};
}

}  // namespace zqcow::cli
