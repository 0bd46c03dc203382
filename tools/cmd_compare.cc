// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow compare A B`: like qemu-img compare (without -s): exit 0 when the guest contents
// are equal, 1 with the first differing byte offset when not, 2 on error. When the sizes
// differ, the part past the smaller size must read as zeros.

#include <fmt/format.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
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
};

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
Result<std::optional<uint64_t>> FindFirstDifference(GuestSource& a, GuestSource& b) {
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
  }
  return std::optional<uint64_t>();
}

int RunCompare(const CompareArgs& args) {
  auto a = GuestSource::Open(args.a_path, args.a_format, args.force_share);
  if (!a.ok()) return ReportError(a.status(), kExitCompareError);
  auto b = GuestSource::Open(args.b_path, args.b_format, args.force_share);
  if (!b.ok()) return ReportError(b.status(), kExitCompareError);
  if ((*a)->size() != (*b)->size()) fmt::print("Warning: Image size mismatch!\n");
  auto diff = FindFirstDifference(**a, **b);
  if (!diff.ok()) return ReportError(diff.status(), kExitCompareError);
  if (diff->has_value()) {
    fmt::print("Content mismatch at offset {}!\n", **diff);
    return kExitCompareDifferent;
  }
  fmt::print("Images are identical.\n");
  return kExitOk;
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
  app->add_option("A", args->a_path, "First image")->required();
  app->add_option("B", args->b_path, "Second image")->required();
  return {app, [args] { return RunCompare(*args); }, kExitCompareError};
}

}  // namespace zqcow::cli
