// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Persistent dirty bitmaps (QEMU docs/interop/qcow2.txt, "Bitmaps extension"): the header
// extension kExtBitmaps, valid only while autoclear bit 0 is set, holds
//   0 nb_bitmaps u32   4 reserved u32   8 bitmap_directory_size u64
//  16 bitmap_directory_offset u64
// The directory: one entry per bitmap, each starting at a multiple of 8 bytes:
//   0 bitmap_table_offset u64   8 bitmap_table_size u32 (entries)   12 flags u32
//  16 type u8   17 granularity_bits u8   18 name_size u16   20 extra_data_size u32
//  24 extra data, then the name (not NUL terminated), then zero padding to 8.
// A bitmap table entry: bits 9..55 the host offset of one cluster of bitmap data, or 0
// (then bit 0 says whether the whole cluster's range is dirty).
//
// zqcow reads bitmaps to report them (info) and to count their clusters as referenced
// (check); it never writes them.

#ifndef ZQCOW_FORMAT_BITMAPS_H_
#define ZQCOW_FORMAT_BITMAPS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "format/header.h"
#include "format/snapshot.h"  // ReadAtFunction
#include "zqcow/status.h"

namespace zqcow::format {

inline constexpr uint64_t kAutoclearBitmaps = 1;  // autoclear bit 0: the extension is valid
inline constexpr uint32_t kBitmapInUse = 1u << 0;
inline constexpr uint32_t kBitmapAuto = 1u << 1;
// QEMU's limits.
inline constexpr uint32_t kMaxBitmaps = 65535;
inline constexpr uint64_t kMaxBitmapDirectoryBytes = 64ull << 20;

struct BitmapInfo {
  std::string name;
  uint64_t table_offset = 0;
  uint32_t table_size = 0;  // entries
  uint32_t flags = 0;
  uint8_t granularity_bits = 0;
};

struct BitmapDirectory {
  uint64_t offset = 0;
  uint64_t size = 0;  // bytes
  std::vector<BitmapInfo> bitmaps;
};

// Whether the header carries a bitmaps extension that is valid (autoclear bit 0 set).
bool HasBitmaps(const Header& header);

// Reads the bitmap directory the header's extension names. An image without (valid)
// bitmaps yields an empty directory. kCorruption for an extension of the wrong length,
// limits exceeded, a directory past end of file, or entries that run past the directory.
Result<BitmapDirectory> ReadBitmapDirectory(const Header& header, uint64_t file_size,
                                            const ReadAtFunction& read);

// The host offsets of the bitmap data clusters a bitmap table lists (entries with an
// offset; alignment is not checked). `table` is the raw table, 8 bytes per entry.
std::vector<uint64_t> BitmapDataClusters(const std::vector<uint8_t>& table);

}  // namespace zqcow::format

#endif  // ZQCOW_FORMAT_BITMAPS_H_
