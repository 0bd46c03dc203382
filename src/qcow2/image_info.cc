// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// ReadImageInfo: what `qemu-img info` reports of a qcow2 image, from its header, snapshot
// table and bitmap directory, without opening the image.

#include <memory>
#include <string>

#include "format/bitmaps.h"
#include "format/header.h"
#include "format/snapshot.h"
#include "qcow2/backing.h"
#include "qcow2/header_io.h"
#include "zqcow/image.h"

namespace zqcow {

Result<ImageInfo> ReadImageInfo(const std::string& path, bool force_share) {
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<io::File> file, qcow2::OpenForReading(path, force_share));
  ZQ_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  ZQ_ASSIGN_OR_RETURN(format::Header header, qcow2::ReadHeader(file.get(), file_size));
  ImageInfo info;
  info.path = path;
  info.version = header.version;
  info.virtual_size = header.size;
  info.cluster_size = static_cast<uint32_t>(header.cluster_size());
  info.refcount_bits = 1u << header.refcount_order;
  info.compression = static_cast<Compression>(header.compression_type);
  info.file_size = file_size;
  info.dirty = (header.incompatible_features & format::kIncompatDirty) != 0;
  info.corrupt = (header.incompatible_features & format::kIncompatCorrupt) != 0;
  info.lazy_refcounts = (header.compatible_features & format::kCompatLazyRefcounts) != 0;
  info.extended_l2 = (header.incompatible_features & format::kIncompatExtendedL2) != 0;
  info.backing_file = header.backing_file;
  info.backing_format = qcow2::BackingFormatOf(header);
  auto table = format::ReadSnapshotTable(header, file_size, qcow2::ReaderOf(file.get()));
  if (!table.ok()) return table.status().WithPrefix(path);
  for (const format::Snapshot& snapshot : table->snapshots) {
    info.snapshots.push_back({snapshot.id, snapshot.name, snapshot.vm_state_size, snapshot.date_sec,
                              snapshot.date_nsec, snapshot.vm_clock_nsec,
                              snapshot.icount.value_or(0)});
  }
  auto bitmaps = format::ReadBitmapDirectory(header, file_size, qcow2::ReaderOf(file.get()));
  if (!bitmaps.ok()) return bitmaps.status().WithPrefix(path);
  for (const format::BitmapInfo& bitmap : bitmaps->bitmaps) {
    BitmapSummary summary;
    summary.name = bitmap.name;
    summary.granularity = bitmap.granularity_bits < 64 ? uint64_t{1} << bitmap.granularity_bits : 0;
    summary.in_use = (bitmap.flags & format::kBitmapInUse) != 0;
    summary.auto_enabled = (bitmap.flags & format::kBitmapAuto) != 0;
    info.bitmaps.push_back(std::move(summary));
  }
  return info;
}

}  // namespace zqcow
