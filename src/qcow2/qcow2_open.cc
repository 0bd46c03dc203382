// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// OpenImageOnFile: validates the header and every table location against the file size
// before allocating memory for it (memory is bounded by the file size, never by a header
// value alone), opens the backing chain (read-only, also under a writable overlay), refuses
// what zqcow does not follow (writing to images with snapshots, unknown features), and
// finds the end of the used area for appending.

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <optional>

#include "format/endian.h"
#include "format/header.h"
#include "format/refcount.h"
#include "format/snapshot.h"
#include "qcow2/backing.h"
#include "qcow2/cluster_io.h"
#include "qcow2/qcow2_engine.h"
#include "qcow2/qcow2_image.h"

namespace zqcow::qcow2 {

namespace {

constexpr uint64_t kMaxClusterSize = uint64_t{1} << format::kMaxClusterBits;

// The end of the used area according to the refcounts: one past the last cluster with a
// nonzero refcount in the last refcount block that exists.
Result<uint64_t> RefcountedEnd(io::File* file, const io::AlignedBuffer& table,
                               const format::RefcountGeometry& rg, uint64_t file_size) {
  const format::Geometry g{rg.cluster_bits};
  const uint64_t cluster_size = g.cluster_size();
  for (uint64_t index = table.size() / 8; index-- > 0;) {
    auto decoded = format::DecodeRefcountTableEntry(format::LoadBE64(table.data() + index * 8), g);
    if (!decoded.ok()) return decoded.status().WithPrefix(file->path());
    uint64_t offset = decoded->value();
    if (offset == 0) continue;
    if (offset + cluster_size > io::AlignUp(file_size, cluster_size)) {
      return Status::Corruption(file->path() + ": refcount block " + std::to_string(index) +
                                " at offset " + Hex(offset) + " lies past the end of the file");
    }
    ZQ_ASSIGN_OR_RETURN(io::AlignedBuffer block, ReadTable(file, offset, cluster_size));
    for (uint64_t entry = rg.block_entries(); entry-- > 0;) {
      if (format::GetRefcount(block.span(), entry, rg.refcount_order) != 0) {
        return ((index << rg.block_entry_bits()) + entry + 1) * cluster_size;
      }
    }
  }
  return uint64_t{0};
}

bool WantsSnapshot(const OpenOptions& options) {
  return !options.snapshot.empty() || !options.snapshot_id.empty() ||
         !options.snapshot_name.empty();
}

// The snapshot `options` selects, found as QEMU finds it (find_snapshot_by_id_and_name,
// and for `snapshot` by id first, then by name).
Result<format::Snapshot> FindSnapshot(io::File* file, const format::Header& header,
                                      uint64_t file_size, const OpenOptions& options) {
  auto read_at = [file](uint64_t offset, std::span<uint8_t> buffer) -> Status {
    auto read = file->ReadAt(offset, buffer.data(), buffer.size());
    return read.ok() ? Status::OK() : read.status();
  };
  ZQ_ASSIGN_OR_RETURN(format::SnapshotTable table,
                      format::ReadSnapshotTable(header, file_size, read_at));
  auto find = [&table](const std::string& id, const std::string& name) -> const format::Snapshot* {
    for (const format::Snapshot& snapshot : table.snapshots) {
      if ((id.empty() || snapshot.id == id) && (name.empty() || snapshot.name == name)) {
        return &snapshot;
      }
    }
    return nullptr;
  };
  const format::Snapshot* found = nullptr;
  std::string wanted;
  if (!options.snapshot.empty()) {
    found = find(options.snapshot, "");
    if (found == nullptr) found = find("", options.snapshot);
    wanted = "with id or name '" + options.snapshot + "'";
  } else {
    found = find(options.snapshot_id, options.snapshot_name);
    if (!options.snapshot_id.empty()) wanted = "with id '" + options.snapshot_id + "'";
    if (!options.snapshot_name.empty()) {
      wanted += (wanted.empty() ? "with" : " and") + std::string(" name '") +
                options.snapshot_name + "'";
    }
  }
  if (found == nullptr) {
    return Status::NotFound(file->path() + ": no internal snapshot " + wanted + " (" +
                            std::to_string(table.snapshots.size()) + " snapshots)");
  }
  return *found;
}

}  // namespace

Result<std::unique_ptr<Image>> OpenImageOnFile(std::unique_ptr<io::File> file,
                                               const OpenOptions& options, int depth) {
  const std::string path = file->path();
  if (options.writable && options.io.force_share) {
    return Status::InvalidArgument(path + ": force-share (-U) is only for read-only opens");
  }
  ZQ_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  const uint64_t head_bytes = std::min(file_size, kMaxClusterSize);
  ZQ_ASSIGN_OR_RETURN(
      io::AlignedBuffer head,
      ReadTable(file.get(), 0,
                io::AlignUp(std::max<uint64_t>(head_bytes, 1), io::kBufferAlignment)));
  auto parsed = format::ParseHeader(head.span().first(head_bytes), file_size);
  if (!parsed.ok()) return parsed.status().WithPrefix(path);
  format::Header header = std::move(parsed).value();

  const bool has_backing = header.backing_file_offset != 0 || !header.backing_file.empty();
  std::optional<uint32_t> snapshot_l1_entries;  // a snapshot's L1 table, of this many entries
  if (WantsSnapshot(options)) {
    if (options.writable) {
      return Status::NotSupported(path + ": an internal snapshot can only be opened read-only");
    }
    ZQ_ASSIGN_OR_RETURN(format::Snapshot snapshot,
                        FindSnapshot(file.get(), header, file_size, options));
    // As QEMU's qcow2_snapshot_load_tmp: the snapshot's L1 table replaces the active one;
    // the virtual size stays the image's (what lies past the snapshot's L1 table reads as
    // unallocated: zeros, or the backing file's data).
    header.l1_table_offset = snapshot.l1_table_offset;
    snapshot_l1_entries = snapshot.l1_size;
    header.l1_size = std::max<uint32_t>(
        snapshot.l1_size,
        static_cast<uint32_t>(format::Geometry{header.cluster_bits}.l1_size_for(header.size)));
  }
  if (options.writable && header.nb_snapshots != 0) {
    return Status::NotSupported(path +
                                ": writing to an image with internal snapshots is not "
                                "supported (reading it is)");
  }
  if (header.crypt_method != 0) {
    return Status::NotSupported(path + ": encrypted images are not supported");
  }
  if ((header.incompatible_features & ~format::kIncompatSupported) != 0) {
    return Status::NotSupported(path + ": unknown incompatible features " +
                                Hex(header.incompatible_features & ~format::kIncompatSupported));
  }
  const uint64_t cluster_size = header.cluster_size();
  if (options.writable && header.extended_l2()) {
    return Status::NotSupported(path +
                                ": writing to an image with extended L2 entries (subclusters) is "
                                "not supported (reading it is)");
  }
  if (options.writable) {
    if (header.incompatible_features & format::kIncompatCorrupt) {
      return Status::Corruption(path + ": image is marked corrupt; repair it before writing");
    }
    if ((header.incompatible_features & format::kIncompatDirty) &&
        (header.compatible_features & format::kCompatLazyRefcounts)) {
      return Status::NotSupported(path +
                                  ": image has lazy refcounts and was not closed "
                                  "cleanly; repair it (qemu-img check -r all) first");
    }
  }
  if (file->direct_io() && file->alignment() > cluster_size) {
    return Status::NotSupported(path + ": O_DIRECT needs " + std::to_string(file->alignment()) +
                                "-byte alignment, larger than the cluster size " +
                                std::to_string(cluster_size));
  }

  const format::Geometry geometry = header.geometry();
  if (header.l1_size < geometry.l1_size_for(header.size)) {
    return Status::Corruption(path + ": L1 table of " + std::to_string(header.l1_size) +
                              " entries is too small for virtual size " +
                              std::to_string(header.size));
  }
  const uint64_t l1_bytes =
      io::AlignUp(std::max<uint64_t>(uint64_t{header.l1_size} * 8, 1), cluster_size);
  const uint64_t l1_stored_entries = snapshot_l1_entries.value_or(header.l1_size);
  if (header.l1_table_offset % cluster_size != 0 ||
      header.l1_table_offset + l1_stored_entries * 8 > file_size) {
    return Status::Corruption(path + ": L1 table at offset " + Hex(header.l1_table_offset) +
                              " with " + std::to_string(header.l1_size) +
                              " entries lies past the end of the file");
  }
  const uint64_t table_bytes = uint64_t{header.refcount_table_clusters} * cluster_size;
  if (header.refcount_table_clusters == 0 || header.refcount_table_offset % cluster_size != 0 ||
      header.refcount_table_offset + table_bytes > io::AlignUp(file_size, cluster_size)) {
    return Status::Corruption(path + ": refcount table at offset " +
                              Hex(header.refcount_table_offset) + " (" +
                              std::to_string(header.refcount_table_clusters) +
                              " clusters) lies past the end of the file");
  }
  io::AlignedBuffer l1;
  if (!snapshot_l1_entries) {
    ZQ_ASSIGN_OR_RETURN(l1, ReadTable(file.get(), header.l1_table_offset, l1_bytes));
  } else {
    // A snapshot's table may be shorter than the size needs: the rest is unallocated.
    l1 = io::AlignedBuffer(l1_bytes);  // zero-filled
    const uint64_t stored_bytes = l1_stored_entries * 8;
    if (stored_bytes > 0) {
      ZQ_ASSIGN_OR_RETURN(
          io::AlignedBuffer stored,
          ReadTable(file.get(), header.l1_table_offset, io::AlignUp(stored_bytes, cluster_size)));
      std::memcpy(l1.data(), stored.data(), stored_bytes);
    }
  }
  ZQ_ASSIGN_OR_RETURN(io::AlignedBuffer header_cluster, ReadTable(file.get(), 0, cluster_size));

  Qcow2Image::Parts parts;
  parts.writable = options.writable;
  parts.io = options.io;
  parts.l1_offset = header.l1_table_offset;
  parts.l1 = std::move(l1);
  parts.file_size = file_size;
  if (options.writable) {
    ZQ_ASSIGN_OR_RETURN(io::AlignedBuffer table,
                        ReadTable(file.get(), header.refcount_table_offset, table_bytes));
    format::RefcountGeometry rg{header.cluster_bits, header.refcount_order};
    ZQ_ASSIGN_OR_RETURN(uint64_t refcounted_end, RefcountedEnd(file.get(), table, rg, file_size));
    uint64_t end =
        std::max({io::AlignUp(file_size, cluster_size), refcounted_end,
                  header.l1_table_offset + l1_bytes, header.refcount_table_offset + table_bytes});
    parts.refcount_table_offset = header.refcount_table_offset;
    parts.refcount_table_clusters = header.refcount_table_clusters;
    parts.refcount_table = std::move(table);
    parts.next_free = format::HostCluster(end / cluster_size);
  }
  if (has_backing) {
    if (header.backing_file.empty()) {
      return Status::Corruption(path + ": backing_file_offset is set but the name is empty");
    }
    ZQ_ASSIGN_OR_RETURN(
        parts.backing,
        OpenBackingFile(path, header.backing_file, BackingFormatOf(header), options.io, depth + 1));
  }
  parts.file = std::move(file);
  parts.header = std::move(header);
  parts.header_cluster = std::move(header_cluster);
  auto image = std::make_unique<Qcow2Image>(std::move(parts));
  if (options.writable) ZQ_RETURN_IF_ERROR(image->MarkOpenForWriting());
  return std::unique_ptr<Image>(std::move(image));
}

}  // namespace zqcow::qcow2
