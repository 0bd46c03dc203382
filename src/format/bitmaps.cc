// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/bitmaps.h"

#include <string>

#include "format/endian.h"
#include "format/entries.h"

namespace zqcow::format {
namespace {

constexpr size_t kExtensionSize = 24;
constexpr size_t kEntryHeaderSize = 24;

Status Corrupt(const std::string& what) { return Status::Corruption("qcow2 bitmaps: " + what); }

}  // namespace

bool HasBitmaps(const Header& header) {
  if (!(header.autoclear_features & kAutoclearBitmaps)) return false;
  for (const auto& ext : header.extensions) {
    if (ext.type == kExtBitmaps) return true;
  }
  return false;
}

Result<BitmapDirectory> ReadBitmapDirectory(const Header& header, uint64_t file_size,
                                            const ReadAtFunction& read) {
  BitmapDirectory directory;
  if (!HasBitmaps(header)) return directory;
  const HeaderExtension* ext = nullptr;
  for (const auto& e : header.extensions) {
    if (e.type == kExtBitmaps) ext = &e;
  }
  if (ext->data.size() != kExtensionSize) {
    return Corrupt("extension length " + std::to_string(ext->data.size()) + " is not 24");
  }
  const uint32_t count = LoadBE32(ext->data.data());
  directory.size = LoadBE64(ext->data.data() + 8);
  directory.offset = LoadBE64(ext->data.data() + 16);
  if (count == 0 || count > kMaxBitmaps) {
    return Corrupt("nb_bitmaps " + std::to_string(count) + " is outside 1.." +
                   std::to_string(kMaxBitmaps));
  }
  if (directory.size > kMaxBitmapDirectoryBytes || directory.size < kEntryHeaderSize * count) {
    return Corrupt("bitmap_directory_size " + std::to_string(directory.size) + " is invalid");
  }
  if (directory.offset % header.cluster_size() != 0 || directory.offset == 0 ||
      directory.offset > file_size || file_size - directory.offset < directory.size) {
    return Corrupt("bitmap_directory_offset " + std::to_string(directory.offset) +
                   " is unaligned or the directory runs past end of file");
  }
  std::vector<uint8_t> raw(directory.size);
  ZQ_RETURN_IF_ERROR(read(directory.offset, raw));
  uint64_t pos = 0;
  for (uint32_t i = 0; i < count; ++i) {
    if (raw.size() - pos < kEntryHeaderSize) return Corrupt("directory entries run past its size");
    const uint8_t* p = raw.data() + pos;
    BitmapInfo bitmap;
    bitmap.table_offset = LoadBE64(p);
    bitmap.table_size = LoadBE32(p + 8);
    bitmap.flags = LoadBE32(p + 12);
    bitmap.granularity_bits = p[17];
    const uint64_t name_size = LoadBE16(p + 18);
    const uint64_t extra = LoadBE32(p + 20);
    const uint64_t entry = (kEntryHeaderSize + extra + name_size + 7) & ~uint64_t{7};
    if (entry > raw.size() - pos) return Corrupt("directory entries run past its size");
    bitmap.name.assign(reinterpret_cast<const char*>(p + kEntryHeaderSize + extra), name_size);
    directory.bitmaps.push_back(std::move(bitmap));
    pos += entry;
  }
  return directory;
}

std::vector<uint64_t> BitmapDataClusters(const std::vector<uint8_t>& table) {
  std::vector<uint64_t> offsets;
  for (size_t i = 0; i + 8 <= table.size(); i += 8) {
    const uint64_t offset = LoadBE64(&table[i]) & kEntryOffsetMask;
    if (offset != 0) offsets.push_back(offset);
  }
  return offsets;
}

}  // namespace zqcow::format
