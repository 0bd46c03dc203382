// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Parsing of `convert -o key=value,...` (qemu-img's creation options, the subset zqcow
// writes) and of the -t/-T cache modes.

#ifndef ZQCOW_TOOLS_CREATE_OPTIONS_H_
#define ZQCOW_TOOLS_CREATE_OPTIONS_H_

#include <string>
#include <string_view>
#include <vector>

#include "zqcow/convert.h"
#include "zqcow/status.h"

namespace zqcow::cli {

// The -o keys, for `-o help` and error messages.
inline constexpr const char* kCreateOptionsHelp =
    "Supported -o options (comma-separated key=value, may be repeated):\n"
    "  compression_type=zlib|zstd   codec of compressed clusters (default zlib)\n"
    "  compression_level=N          zlib 1..9 (default 3), zstd -5..-1 or 1..19 (default 3)\n"
    "  cluster_size=SIZE            power of two, 512 .. 2M (default 64k)\n"
    "  refcount_bits=N              power of two, 1 .. 64 (default 16)\n"
    "  compat=1.1|0.10              image version 3 (default) or 2 (zlib only)\n"
    "  lazy_refcounts=off, preallocation=off, extended_l2=off   accepted (what zqcow writes)\n";

// Applies every `-o` argument (each "k=v[,k=v...]") to `options`. Unknown keys, malformed
// pairs and out-of-range values are kInvalidArgument naming the key and the value.
Status ApplyCreateOptions(const std::vector<std::string>& option_args, ConvertOptions& options);

// -l as qemu-img parses it: "snapshot.id=ID[,snapshot.name=NAME]" (either key, any order)
// sets options.source_snapshot_id/_name; anything else is an id or a name, as -s, and sets
// options.source_snapshot. A malformed key=value is kInvalidArgument naming it.
Status ApplySnapshotParam(const std::string& text, ConvertOptions& options);

// Whether a -t/-T cache mode means O_DIRECT: "none"/"directsync" => true, "writeback",
// "writethrough" and "unsafe" => false (docs/CLI.md says what else each means); anything
// else is kInvalidArgument. `flag` ("-t"/"-T") names it in the error.
Result<bool> ParseCacheMode(std::string_view mode, std::string_view flag);

}  // namespace zqcow::cli

#endif  // ZQCOW_TOOLS_CREATE_OPTIONS_H_
