// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow map IMG`: like qemu-img map. JSON: a list of {start, length, depth, present, zero,
// data, compressed[, offset]}; "offset" is given for uncompressed data (and raw files), not
// for compressed clusters, whose data is not a linear mapping (qemu-img omits it too).
// --start-offset / --max-length limit the range mapped, as in qemu-img. The human form names
// the file of the backing chain that holds each extent, as qemu-img does.

#include <fmt/format.h>

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

// Guest bytes mapped per Map() call, to bound memory on huge images.
constexpr uint64_t kMapWindow = 1ull << 30;

struct MapArgs {
  std::string path;
  std::string format;
  std::string output = "human";
  bool force_share = false;  // -U
  std::string bitmap;  // --bitmap: list the ranges this dirty bitmap marks instead
  std::string start_offset;  // --start-offset
  std::string max_length;    // --max-length
};

struct MapEntry {
  uint64_t start = 0;
  uint64_t length = 0;
  uint32_t depth = 0;
  bool present = false;
  bool zero = false;
  bool data = false;
  bool compressed = false;
  std::optional<uint64_t> offset;

  uint64_t end() const { return start + length; }
  // Whether `next` (which starts at end()) continues this entry.
  bool Continues(const MapEntry& next) const {
    if (next.start != end() || depth != next.depth || present != next.present ||
        zero != next.zero || data != next.data || compressed != next.compressed ||
        offset.has_value() != next.offset.has_value()) {
      return false;
    }
    return !offset || *offset + length == *next.offset;
  }
};

MapEntry ToEntry(const MapExtent& extent, bool raw) {
  MapEntry entry;
  entry.start = extent.guest_offset;
  entry.length = extent.length;
  entry.depth = extent.depth;
  switch (extent.kind) {
    case MapExtent::Kind::kUnallocated:
      entry.zero = true;
      break;
    case MapExtent::Kind::kZero:
      entry.present = true;
      entry.zero = true;
      if (raw) entry.offset = extent.host_offset;
      break;
    case MapExtent::Kind::kData:
      entry.present = true;
      entry.data = true;
      entry.offset = extent.host_offset;
      break;
    case MapExtent::Kind::kCompressed:
      entry.present = true;
      entry.data = true;
      entry.compressed = true;
      break;
  }
  return entry;
}

Result<std::vector<MapEntry>> BuildMap(GuestSource& source, uint64_t start, uint64_t end) {
  std::vector<MapEntry> entries;
  bool raw = source.format() == kFormatRaw;
  for (uint64_t pos = start; pos < end; pos += kMapWindow) {
    uint64_t length = std::min(kMapWindow, end - pos);
    ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> extents, source.Map(pos, length));
    for (const MapExtent& extent : extents) {
      if (extent.length == 0) continue;
      MapEntry entry = ToEntry(extent, raw);
      if (!entries.empty() && entries.back().Continues(entry)) {
        entries.back().length += entry.length;
      } else {
        entries.push_back(entry);
      }
    }
  }
  return entries;
}

nlohmann::json MapJson(const std::vector<MapEntry>& entries) {
  nlohmann::json list = nlohmann::json::array();
  for (const MapEntry& e : entries) {
    nlohmann::json j;
    j["start"] = e.start;
    j["length"] = e.length;
    j["depth"] = e.depth;
    j["present"] = e.present;
    j["zero"] = e.zero;
    j["data"] = e.data;
    j["compressed"] = e.compressed;
    if (e.offset) j["offset"] = *e.offset;
    list.push_back(std::move(j));
  }
  return list;
}

// The files of the chain, as qemu-img names them: the image as given, then each backing
// file as its overlay names it, resolved against the overlay's directory. Files zqcow
// cannot read the header of end the list (their extents then say "depth N").
std::vector<std::string> ChainNames(const std::string& path, const std::string& format) {
  std::vector<std::string> names{path};
  if (format != kFormatQcow2) return names;
  for (size_t depth = 0; depth < 64; ++depth) {
    auto info = ReadImageInfo(names.back(), /*force_share=*/true);
    if (!info.ok() || info->backing_file.empty()) break;
    names.push_back(FullBackingName(names.back(), info->backing_file));
  }
  return names;
}

// qemu-img prints 0 as "0", other numbers as 0x...
std::string Hex(uint64_t value) { return value == 0 ? "0" : fmt::format("{:#x}", value); }

void PrintHuman(const std::vector<std::string>& chain, const std::vector<MapEntry>& entries) {
  fmt::print("{:<16}{:<16}{:<16}{}\n", "Offset", "Length", "Mapped to", "File");
  for (const MapEntry& e : entries) {
    if (!e.data) continue;
    std::string mapped = e.offset ? Hex(*e.offset) : "compressed";
    std::string file = e.depth < chain.size()
                           ? chain[e.depth]
                           : fmt::format("{} (backing file at depth {})", chain[0], e.depth);
    fmt::print("{:<16}{:<16}{:<16}{}\n", Hex(e.start), Hex(e.length), mapped, file);
  }
}

// --bitmap: every range of the source with whether the bitmap marks it dirty, like
// `nbdinfo --map=qemu:dirty-bitmap:NAME` (a debugging aid for incremental backups).
Result<nlohmann::json> DirtyMap(GuestSource& source) {
  nlohmann::json list = nlohmann::json::array();
  auto add = [&list](uint64_t start, uint64_t stop, bool dirty) {
    if (start < stop)
      list.push_back({{"start", start}, {"length", stop - start}, {"dirty", dirty}});
  };
  for (uint64_t pos = 0; pos < source.size(); pos += kMapWindow) {
    const uint64_t end = std::min(source.size(), pos + kMapWindow);
    ZQ_ASSIGN_OR_RETURN(std::vector<ByteRange> dirty, source.source().DirtyRanges(pos, end - pos));
    uint64_t cursor = pos;
    for (const ByteRange& range : dirty) {
      add(cursor, range.offset, false);
      add(range.offset, range.end(), true);
      cursor = range.end();
    }
    add(cursor, end, false);
  }
  // Merge neighbours of the same state (window boundaries split them).
  nlohmann::json merged = nlohmann::json::array();
  for (auto& entry : list) {
    if (!merged.empty() && merged.back()["dirty"] == entry["dirty"]) {
      merged.back()["length"] =
          merged.back()["length"].get<uint64_t>() + entry["length"].get<uint64_t>();
    } else {
      merged.push_back(std::move(entry));
    }
  }
  return merged;
}

void PrintHumanDirty(const nlohmann::json& ranges) {
  fmt::print("{:<16}{:<16}{}\n", "Offset", "Length", "State");
  for (const auto& range : ranges) {
    fmt::print("{:<#16x}{:<#16x}{}\n", range["start"].get<uint64_t>(),
               range["length"].get<uint64_t>(), range["dirty"].get<bool>() ? "dirty" : "clean");
  }
}

int RunMap(const MapArgs& args) {
  auto output = ParseOutputFormat(args.output);
  if (!output.ok()) return ReportError(output.status());
  auto source = GuestSource::Open(args.path, args.format, args.force_share, args.bitmap);
  if (!source.ok()) return ReportError(source.status());
  if (!args.bitmap.empty()) {
    auto dirty = DirtyMap(**source);
    if (!dirty.ok()) return ReportError(dirty.status());
    if (*output == OutputFormat::kJson) {
      PrintJson(*dirty);
    } else {
      PrintHumanDirty(*dirty);
    }
    return kExitOk;
  }
  const uint64_t size = (*source)->size();
  uint64_t start = 0;
  uint64_t end = size;
  if (!args.start_offset.empty()) {
    auto parsed = ParseSize(args.start_offset, "--start-offset");
    if (!parsed.ok()) return ReportError(parsed.status());
    start = *parsed;
  }
  if (!args.max_length.empty()) {
    auto parsed = ParseSize(args.max_length, "--max-length");
    if (!parsed.ok()) return ReportError(parsed.status());
    end = start >= size ? start : start + std::min(*parsed, size - start);
  }
  auto entries = BuildMap(**source, start, end);
  if (!entries.ok()) return ReportError(entries.status());
  if (entries->empty() && start >= size && !args.start_offset.empty()) {
    // qemu-img lists one empty extent at a start offset at or past the end.
    MapEntry empty;
    empty.start = start;
    entries->push_back(empty);
  }
  if (*output == OutputFormat::kJson) {
    PrintJson(MapJson(*entries));
  } else {
    PrintHuman(ChainNames(args.path, (*source)->format()), *entries);
  }
  return kExitOk;
}

}  // namespace

Subcommand AddMapCommand(CLI::App& parent) {
  auto args = std::make_shared<MapArgs>();
  CLI::App* app = parent.add_subcommand("map", "Show how an image's guest ranges are stored");
  app->add_option("-f", args->format, "Format: raw or qcow2 (default: detect)");
  app->add_option("--output", args->output, "human (default) or json");
  app->add_flag("-U,--force-share", args->force_share, "Read even if another process writes the image (qemu-img's -U); the result may be inconsistent");
  app->add_option("--start-offset", args->start_offset,
                  "Map from this guest offset (bytes, k/M/G suffixes; default 0)");
  app->add_option("--max-length", args->max_length,
                  "Map at most this many bytes (default: to the end)");
  app->add_option("--bitmap", args->bitmap,
                  "NBD source: list the ranges the dirty bitmap NAME marks (dirty/clean)");
  app->add_option("IMG", args->path,
                  "The image (a file, or an NBD URI: nbd://HOST[:PORT]/EXPORT, "
                  "nbd+unix:///EXPORT?socket=PATH)")
      ->required();
  return {app, [args] { return RunMap(*args); }};
}

}  // namespace zqcow::cli
