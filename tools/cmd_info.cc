// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow info IMG`: like qemu-img info. JSON keys follow qemu-img info --output=json
// ("virtual-size", "cluster-size", "format-specific"...), plus "file-size" and "incomplete".

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>
#include <memory>
#include <string>

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
  if (!info->backing_file.empty()) j["backing-filename"] = info->backing_file;
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
  data["corrupt"] = info->corrupt;
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
  fmt::print("    refcount bits: {}\n", info->refcount_bits);
  fmt::print("    corrupt: {}\n", info->corrupt);
  if (info->dirty) {
    fmt::print("dirty flag: true (incomplete: the last write to the image was interrupted)\n");
  } else {
    fmt::print("dirty flag: false\n");
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

int RunInfo(const InfoArgs& args) {
  auto output = ParseOutputFormat(args.output);
  if (!output.ok()) return ReportError(output.status());
  if (convert::IsNbdUri(args.path)) return RunNbdInfo(args, *output);
  auto format = ResolveFormat(args.path, args.format);
  if (!format.ok()) return ReportError(format.status());
  auto sizes = StatFile(args.path);
  if (!sizes.ok()) return ReportError(sizes.status());
  std::optional<ImageInfo> info;
  if (*format == kFormatQcow2) {
    auto read = ReadImageInfo(args.path, args.force_share);
    if (!read.ok()) return ReportError(read.status());
    info = std::move(read).value();
  }
  const ImageInfo* info_ptr = info ? &*info : nullptr;
  if (*output == OutputFormat::kJson) {
    PrintJson(InfoJson(args.path, *format, *sizes, info_ptr));
  } else {
    PrintHuman(args.path, *format, *sizes, info_ptr);
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
  app->add_option("IMG", args->path, "The image (a file or an NBD URI)")->required();
  return {app, [args] { return RunInfo(*args); }};
}

}  // namespace zqcow::cli
