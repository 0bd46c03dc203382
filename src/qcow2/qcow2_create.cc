// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// CreateImageOnFile: lays out a fresh v3 image.
//   cluster 0            header (dirty bit set while open)
//   clusters 1 .. R      refcount table, sized for the expected file size (capped; it grows)
//   then                 the first refcount block(s), placed by the allocator
//   then                 the L1 table (zeros: the file is extended over it, not written)
// An overlay names its backing file in cluster 0 after the header extensions (with the
// backing format extension) and opens it, so the image reads through it from the start.
// Everything is refcounted through the normal allocator, so the layout describes itself.

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>

#include "format/header.h"
#include "format/refcount.h"
#include "qcow2/backing.h"
#include "qcow2/cluster_io.h"
#include "qcow2/qcow2_engine.h"
#include "qcow2/qcow2_image.h"

namespace zqcow::qcow2 {

namespace {

// The refcount table is held in memory whole; beyond this it grows on demand.
constexpr uint64_t kMaxInitialRefcountTableBytes = 1u << 20;
// Maximum L1 table (QEMU refuses larger ones).
constexpr uint64_t kMaxL1Bytes = 32ull << 20;

Status ValidateCreateOptions(const std::string& path, const CreateOptions& options) {
  auto invalid = [&](const std::string& what) {
    return Status::InvalidArgument(path + ": " + what);
  };
  if (!std::has_single_bit(options.cluster_size) ||
      options.cluster_size < (1u << format::kMinClusterBits) ||
      options.cluster_size > (1u << format::kMaxClusterBits)) {
    return invalid("cluster size " + std::to_string(options.cluster_size) +
                   " must be a power of two from 512 to 2097152");
  }
  if (!std::has_single_bit(options.refcount_bits) || options.refcount_bits > 64) {
    return invalid("refcount bits " + std::to_string(options.refcount_bits) +
                   " must be a power of two from 1 to 64");
  }
  if (options.compression != Compression::kZlib && options.compression != Compression::kZstd) {
    return invalid("unknown compression type");
  }
  if (options.version != 2 && options.version != 3) {
    return invalid("version " + std::to_string(options.version) + " must be 2 or 3");
  }
  if (options.version == 2 && options.compression != Compression::kZlib) {
    return invalid("a version 2 image (compat=0.10) can only compress with zlib");
  }
  if (options.version == 2 && options.refcount_bits != 16) {
    return invalid("a version 2 image (compat=0.10) needs refcount_bits 16");
  }
  if (!options.backing_file.empty() && options.backing_format.empty()) {
    return invalid("backing file '" + options.backing_file + "' needs a backing format");
  }
  return Status::OK();
}

}  // namespace

Result<std::unique_ptr<Image>> CreateImageOnFile(std::unique_ptr<io::File> file,
                                                 const CreateOptions& options,
                                                 const IoOptions& io) {
  const std::string path = file->path();
  ZQ_RETURN_IF_ERROR(ValidateCreateOptions(path, options));
  const uint32_t cluster_bits = static_cast<uint32_t>(std::countr_zero(options.cluster_size));
  const uint64_t cluster_size = options.cluster_size;
  if (file->direct_io() && file->alignment() > cluster_size) {
    return Status::NotSupported(path + ": O_DIRECT needs " + std::to_string(file->alignment()) +
                                "-byte alignment, larger than the cluster size " +
                                std::to_string(cluster_size));
  }
  // The backing file is opened before anything is written: a missing or unreadable one
  // fails the create (the caller removes the file).
  std::unique_ptr<BackingFile> backing;
  if (!options.backing_file.empty()) {
    ZQ_ASSIGN_OR_RETURN(backing, OpenBackingFile(path, options.backing_file, options.backing_format,
                                                 io, /*depth=*/1));
  }
  format::Geometry geometry{cluster_bits};
  format::RefcountGeometry refcount_geometry{
      cluster_bits, static_cast<uint32_t>(std::countr_zero(options.refcount_bits))};

  // Guest offsets are signed 64-bit in QEMU: it refuses anything larger.
  if (options.virtual_size > static_cast<uint64_t>(INT64_MAX)) {
    return Status::InvalidArgument(path + ": virtual size " + std::to_string(options.virtual_size) +
                                   " is larger than the qcow2 maximum of 2^63-1 bytes");
  }
  const uint64_t l1_size = geometry.l1_size_for(options.virtual_size);
  if (l1_size * 8 > kMaxL1Bytes) {
    return Status::InvalidArgument(path + ": virtual size " + std::to_string(options.virtual_size) +
                                   " needs an L1 table above 32 MiB at cluster size " +
                                   std::to_string(cluster_size));
  }
  const uint64_t l1_clusters =
      std::max<uint64_t>(1, (l1_size * 8 + cluster_size - 1) / cluster_size);

  // Expected host clusters: all data, all L2 tables, the L1, some slack.
  uint64_t data_clusters = (options.virtual_size + cluster_size - 1) / cluster_size;
  uint64_t expected = data_clusters + l1_size + l1_clusters + 16;
  uint64_t table_entries = expected / refcount_geometry.block_entries() + 2;
  uint64_t table_bytes =
      std::min(table_entries * 8, std::max(kMaxInitialRefcountTableBytes, cluster_size));
  const uint32_t table_clusters =
      static_cast<uint32_t>(std::max<uint64_t>(1, (table_bytes + cluster_size - 1) / cluster_size));

  format::Header header;
  header.version = options.version;
  header.cluster_bits = cluster_bits;
  header.size = options.virtual_size;
  header.l1_size = static_cast<uint32_t>(l1_size);
  header.refcount_table_offset = cluster_size;
  header.refcount_table_clusters = table_clusters;
  header.refcount_order = refcount_geometry.refcount_order;
  header.header_length = format::kV3HeaderLength;
  header.compression_type = static_cast<uint8_t>(options.compression);
  header.incompatible_features = format::kIncompatDirty;
  if (options.version == 2) {
    header.header_length = format::kV2HeaderLength;
    header.incompatible_features = 0;  // v2 has no feature bits (and no dirty bit)
  }
  if (options.compression == Compression::kZstd) {
    header.incompatible_features |= format::kIncompatCompressionType;
  }
  if (backing) {
    header.backing_file = options.backing_file;
    header.extensions.push_back(format::BackingFormatExtension(options.backing_format));
  }

  Qcow2Image::Parts parts;
  parts.writable = true;
  parts.io = io;
  parts.refcount_table_offset = cluster_size;
  parts.refcount_table_clusters = table_clusters;
  parts.refcount_table = io::AlignedBuffer(table_clusters * cluster_size);
  parts.next_free = format::HostCluster(1 + table_clusters);
  // Layout pass: reference the header and table, place the refcount block(s) and the L1
  // with a standalone Refcounts, write them; the engine then starts from that state.
  MetadataCache scratch_cache(io.metadata_cache_bytes, options.cluster_size);
  Refcounts layout(file.get(), &scratch_cache, refcount_geometry, cluster_size, table_clusters,
                   std::move(parts.refcount_table), parts.next_free);
  for (uint64_t c = 0; c < 1 + table_clusters; ++c) {
    ZQ_RETURN_IF_ERROR(layout.Increment(format::HostCluster(c)));
  }
  if (l1_size == 0) {
    // An empty disk has no L1 entries. As qemu-img does, point l1_table_offset at the next
    // free cluster without allocating it: a cluster nothing references would be a leak.
    header.l1_table_offset = layout.next_free().value() * cluster_size;
  } else {
    ZQ_ASSIGN_OR_RETURN(format::HostCluster l1_first, layout.Allocate(l1_clusters));
    header.l1_table_offset = l1_first.value() * cluster_size;
  }
  if (layout.TakeTableMoved()) {
    header.refcount_table_offset = layout.table_offset();
    header.refcount_table_clusters = layout.table_clusters();
  }
  // Write the refcount blocks and table now; the engine takes over from a clean state.
  bool wrote = false;
  ZQ_RETURN_IF_ERROR(layout.WriteDirtyBlocks(&wrote));
  ZQ_RETURN_IF_ERROR(layout.WriteTableIfDirty(&wrote));
  ZQ_RETURN_IF_ERROR(layout.ApplyDecrements([](format::HostCluster) {}));
  ZQ_RETURN_IF_ERROR(layout.WriteDirtyBlocks(&wrote));
  const format::HostCluster next_free = layout.next_free();
  ZQ_RETURN_IF_ERROR(file->Truncate(next_free.value() * cluster_size));

  Result<std::vector<uint8_t>> header_bytes = format::SerializeHeader(header);
  if (!header_bytes.ok()) return header_bytes.status().WithPrefix(path);
  io::AlignedBuffer header_cluster(cluster_size);
  std::memcpy(header_cluster.data(), header_bytes->data(), header_bytes->size());

  ZQ_ASSIGN_OR_RETURN(io::AlignedBuffer table,
                      ReadTable(file.get(), header.refcount_table_offset,
                                header.refcount_table_clusters * cluster_size));
  parts.file = std::move(file);
  parts.header = header;
  parts.header_cluster = std::move(header_cluster);
  parts.l1_offset = header.l1_table_offset;
  parts.l1 = io::AlignedBuffer(l1_clusters * cluster_size);
  parts.refcount_table_offset = header.refcount_table_offset;
  parts.refcount_table_clusters = header.refcount_table_clusters;
  parts.refcount_table = std::move(table);
  parts.next_free = next_free;
  parts.file_size = next_free.value() * cluster_size;
  parts.backing = std::move(backing);
  auto image = std::make_unique<Qcow2Image>(std::move(parts));
  ZQ_RETURN_IF_ERROR(image->InitialFlush());
  return std::unique_ptr<Image>(std::move(image));
}

}  // namespace zqcow::qcow2
