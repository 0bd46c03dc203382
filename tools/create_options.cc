// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "create_options.h"

#include <fmt/format.h>

#include <bit>

#include "cli_common.h"

namespace zqcow::cli {
namespace {

// Ranges accepted by the codecs (see src/codec/codec.h); checked here so a typo is reported
// before the target is created.
constexpr int64_t kMinZlibLevel = 1;
constexpr int64_t kMaxZlibLevel = 9;
constexpr int64_t kMinZstdLevel = -5;
constexpr int64_t kMaxZstdLevel = 19;
constexpr uint64_t kMinClusterSize = 512;
constexpr uint64_t kMaxClusterSize = 2u << 20;
constexpr int64_t kMaxRefcountBits = 64;

std::vector<std::string_view> Split(std::string_view text, char separator) {
  std::vector<std::string_view> parts;
  size_t start = 0;
  while (true) {
    size_t pos = text.find(separator, start);
    parts.push_back(text.substr(start, pos == std::string_view::npos ? pos : pos - start));
    if (pos == std::string_view::npos) break;
    start = pos + 1;
  }
  return parts;
}

// qemu-img's qcow2 creation options that zqcow does not write (accepted ones are handled
// in ApplyOne).
bool IsUnsupportedQemuKey(std::string_view key) {
  static constexpr std::string_view kKeys[] = {
      "backing_file", "backing_fmt", "encryption", "encrypt.format", "encrypt.key-secret",
      "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
      "encrypt.hash-alg", "encrypt.iter-time", "data_file", "data_file_raw", "size"};
  for (std::string_view known : kKeys) {
    if (key == known) return true;
  }
  return false;
}

Status ApplyOne(std::string_view key, std::string_view value, ConvertOptions& options,
                bool& level_given) {
  std::string what = fmt::format("-o {}", key);
  if (key == "compression_type") {
    if (value == "zlib" || value == "deflate") {
      options.compression = Compression::kZlib;
    } else if (value == "zstd") {
      options.compression = Compression::kZstd;
    } else {
      return Status::InvalidArgument(
          fmt::format("{}: unknown compression type '{}' (expected zlib or zstd)", what, value));
    }
  } else if (key == "compression_level") {
    ZQ_ASSIGN_OR_RETURN(int64_t level, ParseInteger(value, what));
    options.compression_level = static_cast<int>(level);
    level_given = true;
  } else if (key == "cluster_size") {
    ZQ_ASSIGN_OR_RETURN(uint64_t size, ParseSize(value, what));
    if (size < kMinClusterSize || size > kMaxClusterSize || !std::has_single_bit(size)) {
      return Status::InvalidArgument(
          fmt::format("{}: {} is not a power of two between 512 and 2M", what, value));
    }
    options.cluster_size = static_cast<uint32_t>(size);
  } else if (key == "refcount_bits") {
    ZQ_ASSIGN_OR_RETURN(int64_t bits, ParseInteger(value, what));
    if (bits < 1 || bits > kMaxRefcountBits || !std::has_single_bit(static_cast<uint64_t>(bits))) {
      return Status::InvalidArgument(
          fmt::format("{}: {} is not a power of two between 1 and 64", what, value));
    }
    options.refcount_bits = static_cast<uint32_t>(bits);
  } else if (key == "compat") {
    if (value == "1.1" || value == "v3") {
      options.version = 3;
    } else if (value == "0.10" || value == "v2") {
      options.version = 2;
    } else {
      return Status::InvalidArgument(
          fmt::format("{}: unknown compat level '{}' (expected 1.1 or 0.10)", what, value));
    }
  } else if (key == "lazy_refcounts" || key == "extended_l2") {
    // Off is what zqcow writes; on would change the image.
    if (value != "off" && value != "false") {
      return Status::InvalidArgument(fmt::format("{}={}: not supported (only off)", what, value));
    }
  } else if (key == "preallocation") {
    if (value != "off") {
      return Status::InvalidArgument(fmt::format("{}={}: not supported (only off)", what, value));
    }
  } else if (IsUnsupportedQemuKey(key)) {
    return Status::InvalidArgument(fmt::format(
        "{}: not supported by zqcow (a qemu-img qcow2 option; '-o help' lists zqcow's)", what));
  } else {
    return Status::InvalidArgument(fmt::format(
        "-o: unknown option '{}' (known: compression_type, compression_level, cluster_size, "
        "refcount_bits, compat, lazy_refcounts, preallocation, extended_l2; '-o help' lists "
        "them)",
        key));
  }
  return Status::OK();
}

}  // namespace

Status ApplyCreateOptions(const std::vector<std::string>& option_args, ConvertOptions& options) {
  bool level_given = false;
  for (const std::string& arg : option_args) {
    for (std::string_view pair : Split(arg, ',')) {
      if (pair.empty()) continue;
      size_t eq = pair.find('=');
      if (eq == std::string_view::npos || eq == 0) {
        return Status::InvalidArgument(fmt::format("-o: '{}' is not of the form key=value", pair));
      }
      ZQ_RETURN_IF_ERROR(ApplyOne(pair.substr(0, eq), pair.substr(eq + 1), options, level_given));
    }
  }
  if (options.version == 2 && options.compression != Compression::kZlib) {
    return Status::InvalidArgument(
        "-o compat=0.10: a version 2 image cannot use compression_type=zstd (zlib only)");
  }
  if (options.version == 2 && options.refcount_bits != 16) {
    return Status::InvalidArgument("-o compat=0.10: a version 2 image needs refcount_bits=16");
  }
  if (level_given) {
    int level = options.compression_level;
    bool zstd = options.compression == Compression::kZstd;
    bool valid = zstd ? (level >= kMinZstdLevel && level <= kMaxZstdLevel && level != 0)
                      : (level >= kMinZlibLevel && level <= kMaxZlibLevel);
    if (!valid) {
      return Status::InvalidArgument(
          fmt::format("-o compression_level: {} is out of range for {} ({})", level,
                      zstd ? "zstd" : "zlib", zstd ? "-5..-1 or 1..19" : "1..9"));
    }
  }
  return Status::OK();
}

Status ApplySnapshotParam(const std::string& text, ConvertOptions& options) {
  if (text.rfind("snapshot.", 0) != 0) {
    options.source_snapshot = text;
    return Status::OK();
  }
  size_t start = 0;
  while (start <= text.size()) {
    size_t comma = text.find(',', start);
    if (comma == std::string::npos) comma = text.size();
    const std::string pair = text.substr(start, comma - start);
    const size_t eq = pair.find('=');
    const std::string key = pair.substr(0, eq);
    const std::string value = eq == std::string::npos ? "" : pair.substr(eq + 1);
    if (key == "snapshot.id" && !value.empty()) {
      options.source_snapshot_id = value;
    } else if (key == "snapshot.name" && !value.empty()) {
      options.source_snapshot_name = value;
    } else {
      return Status::InvalidArgument(fmt::format(
          "-l: '{}' is not snapshot.id=ID or snapshot.name=NAME (in '{}')", pair, text));
    }
    start = comma + 1;
  }
  return Status::OK();
}

Result<bool> ParseCacheMode(std::string_view mode, std::string_view flag) {
  if (mode == "none" || mode == "directsync") return true;
  if (mode == "writeback" || mode == "writethrough" || mode == "unsafe") return false;
  return Status::InvalidArgument(fmt::format(
      "{}: unknown cache mode '{}' (expected none, directsync, writeback, writethrough or "
      "unsafe)",
      flag, mode));
}

}  // namespace zqcow::cli
