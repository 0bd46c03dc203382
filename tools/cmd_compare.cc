// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow compare A B`: like qemu-img compare: exit 0 when the guest contents are equal, 1
// with the first differing byte offset when not, 2 on error. When the sizes differ, the part
// past the smaller size must read as zeros. -s (strict): the sizes must be equal and every
// range must have the same block status as qemu-img computes it (data, zero, allocated,
// offset valid: see StatusOf), so e.g. a zero cluster differs from an unallocated one and
// a compressed cluster from a normal one. -q prints nothing, -p shows progress as qemu-img.

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "guest_source.h"

namespace zqcow::cli {
namespace {

// Guest bytes whose zero ranges are looked up at once, and the largest single read.
constexpr uint64_t kMapWindow = 1ull << 30;
constexpr uint64_t kReadChunk = 4ull << 20;

struct CompareArgs {
  std::string a_path;
  std::string b_path;
  std::string a_format;
  std::string b_format;
  bool force_share = false;  // -U
  bool strict = false;       // -s
  bool quiet = false;        // -q
  bool progress = false;     // -p
};

// qemu's block status flags (include/block/block-common.h), as bdrv_block_status_above
// returns them for the whole backing chain.
constexpr unsigned kStatusData = 0x01;
constexpr unsigned kStatusZero = 0x02;
constexpr unsigned kStatusOffsetValid = 0x04;
constexpr unsigned kStatusAllocated = 0x10;

unsigned StatusOf(const MapExtent& extent, bool raw) {
  switch (extent.kind) {
    case MapExtent::Kind::kUnallocated:
      return kStatusZero;
    case MapExtent::Kind::kZero:
      return kStatusZero | kStatusAllocated | (raw ? kStatusOffsetValid : 0);
    case MapExtent::Kind::kData:
      return kStatusData | kStatusOffsetValid | kStatusAllocated;
    case MapExtent::Kind::kCompressed:
      return kStatusData | kStatusAllocated;
  }
  return 0;
}

// The first offset where the block status of `a` and `b` (of equal size) differ.
Result<std::optional<uint64_t>> FirstStatusDifference(GuestSource& a, GuestSource& b) {
  const bool a_raw = a.format() == kFormatRaw;
  const bool b_raw = b.format() == kFormatRaw;
  for (uint64_t chunk = 0; chunk < a.size(); chunk += kMapWindow) {
    const uint64_t length = std::min(kMapWindow, a.size() - chunk);
    ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> a_map, a.Map(chunk, length));
    ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> b_map, b.Map(chunk, length));
    size_t ai = 0, bi = 0;
    uint64_t pos = chunk;
    while (pos < chunk + length && ai < a_map.size() && bi < b_map.size()) {
      const MapExtent& ae = a_map[ai];
      const MapExtent& be = b_map[bi];
      if (StatusOf(ae, a_raw) != StatusOf(be, b_raw)) return std::optional<uint64_t>(pos);
      const uint64_t a_end = ae.guest_offset + ae.length;
      const uint64_t b_end = be.guest_offset + be.length;
      pos = std::min(a_end, b_end);
      if (a_end == pos) ++ai;
      if (b_end == pos) ++bi;
    }
  }
  return std::optional<uint64_t>();
}

// qemu-img's progress line for -p: "    (P/100%)" redrawn with a carriage return.
void ShowProgress(bool enabled, double percent) {
  if (!enabled) return;
  fmt::print("    ({:.2f}/100%)\r", percent);
  std::fflush(stdout);
}

// Where `pos` stands relative to sorted `ranges`: whether it is inside one, and where that
// state ends (capped at `end`). `index` moves forward only.
struct RangeState {
  bool zero;
  uint64_t until;
};
RangeState StateAt(const std::vector<ByteRange>& ranges, size_t& index, uint64_t pos,
                   uint64_t end) {
  while (index < ranges.size() && ranges[index].end() <= pos) ++index;
  if (index < ranges.size() && ranges[index].offset <= pos) {
    return {true, std::min(ranges[index].end(), end)};
  }
  return {false, index < ranges.size() ? std::min(ranges[index].offset, end) : end};
}

std::optional<uint64_t> FirstNonZero(std::span<const uint8_t> data) {
  auto it = std::find_if(data.begin(), data.end(), [](uint8_t b) { return b != 0; });
  if (it == data.end()) return std::nullopt;
  return static_cast<uint64_t>(it - data.begin());
}

// Returns the offset of the first differing byte, or nullopt when equal.
Result<std::optional<uint64_t>> FindFirstDifference(GuestSource& a, GuestSource& b,
                                                    bool progress) {
  uint64_t total = std::max(a.size(), b.size());
  std::vector<uint8_t> a_buf(kReadChunk), b_buf(kReadChunk);
  for (uint64_t chunk = 0; chunk < total; chunk += kMapWindow) {
    uint64_t chunk_end = std::min(total, chunk + kMapWindow);
    ZQ_ASSIGN_OR_RETURN(std::vector<ByteRange> a_zero, a.ZeroRanges(chunk, chunk_end - chunk));
    ZQ_ASSIGN_OR_RETURN(std::vector<ByteRange> b_zero, b.ZeroRanges(chunk, chunk_end - chunk));
    size_t ai = 0, bi = 0;
    uint64_t pos = chunk;
    while (pos < chunk_end) {
      RangeState as = StateAt(a_zero, ai, pos, chunk_end);
      RangeState bs = StateAt(b_zero, bi, pos, chunk_end);
      uint64_t seg_end = std::min(as.until, bs.until);
      if (!(as.zero && bs.zero)) seg_end = std::min(seg_end, pos + kReadChunk);
      size_t len = static_cast<size_t>(seg_end - pos);
      std::span<uint8_t> a_seg(a_buf.data(), len), b_seg(b_buf.data(), len);
      std::optional<uint64_t> diff;
      if (as.zero && bs.zero) {
        // Both read as zeros: nothing to read.
      } else if (as.zero) {
        ZQ_RETURN_IF_ERROR(b.ReadPadded(pos, b_seg));
        diff = FirstNonZero(b_seg);
      } else if (bs.zero) {
        ZQ_RETURN_IF_ERROR(a.ReadPadded(pos, a_seg));
        diff = FirstNonZero(a_seg);
      } else {
        ZQ_RETURN_IF_ERROR(a.ReadPadded(pos, a_seg));
        ZQ_RETURN_IF_ERROR(b.ReadPadded(pos, b_seg));
        auto [ait, bit] = std::mismatch(a_seg.begin(), a_seg.end(), b_seg.begin());
        if (ait != a_seg.end()) diff = static_cast<uint64_t>(ait - a_seg.begin());
      }
      if (diff) return std::optional<uint64_t>(pos + *diff);
      pos = seg_end;
    }
    ShowProgress(progress, 100.0 * static_cast<double>(chunk_end) / static_cast<double>(total));
  }
  return std::optional<uint64_t>();
}

int RunCompare(const CompareArgs& args) {
  auto a = GuestSource::Open(args.a_path, args.a_format, args.force_share);
  if (!a.ok()) return ReportError(a.status(), kExitCompareError);
  auto b = GuestSource::Open(args.b_path, args.b_format, args.force_share);
  if (!b.ok()) return ReportError(b.status(), kExitCompareError);
  auto say = [&args](std::string_view line) {
    if (!args.quiet) fmt::print("{}\n", line);
  };
  const bool progress = args.progress && !args.quiet;
  auto result = [&](std::string_view line, int code) {
    say(line);
    if (progress) fmt::print("\n");
    return code;
  };
  ShowProgress(progress, 0.0);
  if ((*a)->size() != (*b)->size()) {
    if (args.strict) return result("Strict mode: Image size mismatch!", kExitCompareDifferent);
    say("Warning: Image size mismatch!");
  }
  std::optional<uint64_t> status_diff;
  if (args.strict) {
    auto found = FirstStatusDifference(**a, **b);
    if (!found.ok()) return ReportError(found.status(), kExitCompareError);
    status_diff = *found;
  }
  auto diff = FindFirstDifference(**a, **b, progress && !status_diff);
  if (!diff.ok()) return ReportError(diff.status(), kExitCompareError);
  // qemu-img walks the images once and stops at the first difference of either kind; the
  // status is checked before the contents of a range.
  if (status_diff && (!diff->has_value() || *status_diff <= **diff)) {
    return result(fmt::format("Strict mode: Offset {} block status mismatch!", *status_diff),
                  kExitCompareDifferent);
  }
  if (diff->has_value()) {
    return result(fmt::format("Content mismatch at offset {}!", **diff), kExitCompareDifferent);
  }
  return result("Images are identical.", kExitOk);
}

}  // namespace

Subcommand AddCompareCommand(CLI::App& parent) {
  auto args = std::make_shared<CompareArgs>();
  CLI::App* app = parent.add_subcommand(
      "compare",
      "Compare the guest contents of two images (raw, qcow2 or NBD URIs), like qemu-img compare");
  app->add_option("-f", args->a_format, "Format of A: raw or qcow2 (default: detect)");
  app->add_option("-F", args->b_format, "Format of B: raw or qcow2 (default: detect)");
  app->add_flag("-U,--force-share", args->force_share, "Read even if another process writes the image (qemu-img's -U); the result may be inconsistent");
  app->add_flag("-s", args->strict,
                "Strict: the sizes and the allocation status of every range must match too");
  app->add_flag("-q", args->quiet, "Print nothing; the exit code tells");
  app->add_flag("-p", args->progress, "Show progress (on stdout, as qemu-img)");
  app->add_option("A", args->a_path, "First image")->required();
  app->add_option("B", args->b_path, "Second image")->required();
  return {app, [args] { return RunCompare(*args); }, kExitCompareError};
}

}  // namespace zqcow::cli
