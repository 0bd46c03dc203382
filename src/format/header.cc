// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/header.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <utility>

#include "format/endian.h"
#include "format/refcount.h"
#include "format/snapshot.h"
#include "format/types.h"

namespace zqcow::format {
namespace {

// Byte offsets of the header fields (see header.h).
constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 4;
constexpr size_t kOffBackingFileOffset = 8;
constexpr size_t kOffBackingFileSize = 16;
constexpr size_t kOffClusterBits = 20;
constexpr size_t kOffSize = 24;
constexpr size_t kOffCryptMethod = 32;
constexpr size_t kOffL1Size = 36;
constexpr size_t kOffL1TableOffset = 40;
constexpr size_t kOffRefcountTableOffset = 48;
constexpr size_t kOffRefcountTableClusters = 56;
constexpr size_t kOffNbSnapshots = 60;
constexpr size_t kOffSnapshotsOffset = 64;
constexpr size_t kOffIncompatibleFeatures = 72;
constexpr size_t kOffCompatibleFeatures = 80;
constexpr size_t kOffAutoclearFeatures = 88;
constexpr size_t kOffRefcountOrder = 96;
constexpr size_t kOffHeaderLength = 100;
constexpr size_t kOffCompressionType = 104;

constexpr uint32_t kHeaderAlignment = 8;        // header_length and extension padding
constexpr uint32_t kExtensionHeaderSize = 8;    // type u32 + length u32
constexpr uint32_t kMaxBackingFileName = 1023;  // as QEMU
constexpr uint32_t kV2RefcountOrder = 4;
// QEMU's limit: refcount tables above 8 MiB are refused (for L1 tables see header.h).
constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;
constexpr uint8_t kCompressionDeflate = 0;
constexpr uint8_t kCompressionZstd = 1;

std::string Hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

Status Corrupt(const std::string& msg) { return Status::Corruption("qcow2 header: " + msg); }
Status Unsupported(const std::string& msg) { return Status::NotSupported("qcow2 header: " + msg); }

// Validates a table of `bytes` bytes at `offset`: cluster aligned, not in the header
// cluster, inside the file. `name` is the header field that holds the offset.
Status CheckTable(const char* name, uint64_t offset, uint64_t bytes, uint64_t cluster_size,
                  uint64_t file_size) {
  if (offset % cluster_size != 0) {
    return Corrupt(std::string(name) + " " + Hex(offset) + " is not aligned to the cluster size " +
                   std::to_string(cluster_size));
  }
  if (offset < cluster_size) {
    return Corrupt(std::string(name) + " " + Hex(offset) + " overlaps the header cluster");
  }
  if (offset > file_size || bytes > file_size - offset) {
    return Corrupt(std::string(name) + " " + Hex(offset) + ": table of " + std::to_string(bytes) +
                   " bytes runs past end of file (" + std::to_string(file_size) + " bytes)");
  }
  return Status::OK();
}

// L1 entries needed for `size` bytes, without overflow.
uint64_t L1EntriesNeeded(uint64_t size, uint32_t cluster_bits, bool extended_l2) {
  const uint32_t shift = cluster_bits + (cluster_bits - (extended_l2 ? 4 : 3));
  const uint64_t mask = (uint64_t{1} << shift) - 1;
  return (size >> shift) + ((size & mask) != 0 ? 1 : 0);
}

Status ParseExtensions(std::span<const uint8_t> bytes, uint64_t start, uint64_t limit,
                       Header* header) {
  uint64_t pos = start;
  while (pos < limit) {
    if (kExtensionHeaderSize > limit - pos) {
      return Corrupt("header extension at " + Hex(pos) + " runs past the extension area");
    }
    const uint32_t type = LoadBE32(bytes.data() + pos);
    const uint32_t length = LoadBE32(bytes.data() + pos + 4);
    pos += kExtensionHeaderSize;
    if (type == kExtEnd) return Status::OK();
    if (length > limit - pos) {
      return Corrupt("header extension " + Hex(type) + " of " + std::to_string(length) +
                     " bytes runs past the extension area");
    }
    HeaderExtension ext;
    ext.type = type;
    ext.data.assign(bytes.begin() + pos, bytes.begin() + pos + length);
    header->extensions.push_back(std::move(ext));
    pos += AlignUp(length, kHeaderAlignment);
  }
  return Status::OK();  // the area ended without an end marker: allowed, as QEMU does
}

}  // namespace

Result<Header> ParseHeader(std::span<const uint8_t> bytes, uint64_t file_size,
                           bool refcount_table_may_pass_eof) {
  if (bytes.size() > file_size) bytes = bytes.first(file_size);
  if (bytes.size() < kV2HeaderLength) {
    return Corrupt("file too short for a qcow2 header (" + std::to_string(bytes.size()) +
                   " bytes)");
  }
  const uint8_t* p = bytes.data();
  const uint32_t magic = LoadBE32(p + kOffMagic);
  if (magic != kQcowMagic) {
    return Corrupt("bad magic " + Hex(magic) + " (not a qcow2 image)");
  }
  Header h;
  h.version = LoadBE32(p + kOffVersion);
  if (h.version != 2 && h.version != 3) {
    return Unsupported("version " + std::to_string(h.version) + " is not supported (2 or 3 only)");
  }
  h.backing_file_offset = LoadBE64(p + kOffBackingFileOffset);
  h.backing_file_size = LoadBE32(p + kOffBackingFileSize);
  h.cluster_bits = LoadBE32(p + kOffClusterBits);
  h.size = LoadBE64(p + kOffSize);
  h.crypt_method = LoadBE32(p + kOffCryptMethod);
  h.l1_size = LoadBE32(p + kOffL1Size);
  h.l1_table_offset = LoadBE64(p + kOffL1TableOffset);
  h.refcount_table_offset = LoadBE64(p + kOffRefcountTableOffset);
  h.refcount_table_clusters = LoadBE32(p + kOffRefcountTableClusters);
  h.nb_snapshots = LoadBE32(p + kOffNbSnapshots);
  h.snapshots_offset = LoadBE64(p + kOffSnapshotsOffset);

  if (h.cluster_bits < kMinClusterBits || h.cluster_bits > kMaxClusterBits) {
    return Corrupt("cluster_bits " + std::to_string(h.cluster_bits) + " outside " +
                   std::to_string(kMinClusterBits) + ".." + std::to_string(kMaxClusterBits));
  }
  const uint64_t cluster_size = h.cluster_size();

  if (h.version == 2) {
    h.incompatible_features = 0;
    h.compatible_features = 0;
    h.autoclear_features = 0;
    h.refcount_order = kV2RefcountOrder;
    h.header_length = kV2HeaderLength;
    h.compression_type = kCompressionDeflate;
  } else {
    if (bytes.size() < kV3BaseHeaderLength) {
      return Corrupt("file too short for a version 3 header (" + std::to_string(bytes.size()) +
                     " bytes)");
    }
    h.incompatible_features = LoadBE64(p + kOffIncompatibleFeatures);
    h.compatible_features = LoadBE64(p + kOffCompatibleFeatures);
    h.autoclear_features = LoadBE64(p + kOffAutoclearFeatures);
    h.refcount_order = LoadBE32(p + kOffRefcountOrder);
    h.header_length = LoadBE32(p + kOffHeaderLength);
    if (h.header_length < kV3BaseHeaderLength) {
      return Corrupt("header_length " + std::to_string(h.header_length) + " is below " +
                     std::to_string(kV3BaseHeaderLength));
    }
    if (h.header_length % kHeaderAlignment != 0) {
      return Corrupt("header_length " + std::to_string(h.header_length) + " is not a multiple of " +
                     std::to_string(kHeaderAlignment));
    }
    if (h.header_length > cluster_size) {
      return Corrupt("header_length " + std::to_string(h.header_length) +
                     " exceeds the cluster size " + std::to_string(cluster_size));
    }
    if (h.header_length > bytes.size()) {
      return Corrupt("header_length " + std::to_string(h.header_length) +
                     " runs past end of file (" + std::to_string(bytes.size()) + " bytes)");
    }
    if (h.header_length > kOffCompressionType) h.compression_type = p[kOffCompressionType];
  }

  // Features.
  const uint64_t unknown = h.incompatible_features & ~kIncompatSupported;
  if (unknown & kIncompatExternalData) {
    return Unsupported("incompatible_features: external data files are not supported");
  }
  if ((h.incompatible_features & kIncompatExtendedL2) && h.cluster_bits < kMinExtendedL2ClusterBits) {
    return Corrupt("extended L2 entries need clusters of at least 16 KiB (cluster_bits " +
                   std::to_string(h.cluster_bits) + ")");
  }
  if (unknown != 0) {
    return Unsupported("incompatible_features has unknown bits " + Hex(unknown));
  }
  if (h.crypt_method != 0) {
    return Unsupported("crypt_method " + std::to_string(h.crypt_method) +
                       ": encrypted images are not supported");
  }
  const bool type_bit = (h.incompatible_features & kIncompatCompressionType) != 0;
  if (h.compression_type != kCompressionDeflate && !type_bit) {
    return Corrupt("compression_type " + std::to_string(h.compression_type) +
                   " is set without the compression type incompatible feature bit");
  }
  if (type_bit && h.compression_type == kCompressionDeflate) {
    return Corrupt(
        "compression type incompatible feature bit is set but compression_type is 0 (deflate)");
  }
  if (h.compression_type != kCompressionDeflate && h.compression_type != kCompressionZstd) {
    return Unsupported("compression_type " + std::to_string(h.compression_type) + " is unknown");
  }
  if (h.refcount_order > kMaxRefcountOrder) {
    return Corrupt("refcount_order " + std::to_string(h.refcount_order) + " is above " +
                   std::to_string(kMaxRefcountOrder));
  }
  // L1 table.
  if (uint64_t{h.l1_size} * 8 > kMaxL1TableBytes) {
    return Corrupt("l1_size " + std::to_string(h.l1_size) + " is above the limit of " +
                   std::to_string(kMaxL1TableBytes / 8) + " entries");
  }
  const uint64_t l1_needed =
      L1EntriesNeeded(h.size, h.cluster_bits, (h.incompatible_features & kIncompatExtendedL2) != 0);
  if (h.l1_size < l1_needed) {
    return Corrupt("l1_size " + std::to_string(h.l1_size) + " is too small for size " +
                   std::to_string(h.size) + " (needs " + std::to_string(l1_needed) + " entries)");
  }
  if (h.l1_size > 0) {
    ZQ_RETURN_IF_ERROR(CheckTable("l1_table_offset", h.l1_table_offset, uint64_t{h.l1_size} * 8,
                                  cluster_size, file_size));
  }

  // Refcount table.
  if (h.refcount_table_clusters == 0) {
    return Corrupt("refcount_table_clusters is 0 (no refcount table)");
  }
  const uint64_t reftable_bytes = uint64_t{h.refcount_table_clusters} * cluster_size;
  if (reftable_bytes > kMaxRefcountTableBytes) {
    return Corrupt("refcount_table_clusters " + std::to_string(h.refcount_table_clusters) +
                   " is above the limit of " + std::to_string(kMaxRefcountTableBytes) + " bytes");
  }
  ZQ_RETURN_IF_ERROR(CheckTable("refcount_table_offset", h.refcount_table_offset, reftable_bytes,
                                cluster_size,
                                refcount_table_may_pass_eof ? UINT64_MAX : file_size));

  // Snapshot table: only where it lies; its entries are parsed by format/snapshot.h. Every
  // entry is at least kSnapshotEntryHeaderSize bytes, so that much must be in the file.
  if (h.nb_snapshots > kMaxSnapshots) {
    return Corrupt("nb_snapshots " + std::to_string(h.nb_snapshots) + " is above the limit of " +
                   std::to_string(kMaxSnapshots));
  }
  if (h.nb_snapshots != 0) {
    ZQ_RETURN_IF_ERROR(CheckTable("snapshots_offset", h.snapshots_offset,
                                  uint64_t{h.nb_snapshots} * kSnapshotEntryHeaderSize, cluster_size,
                                  file_size));
  }

  // Extensions and backing file name live in the first cluster; the extension area ends
  // where the backing file name starts.
  const uint64_t limit = std::min<uint64_t>(cluster_size, bytes.size());
  uint64_t extensions_end = limit;
  if (h.backing_file_offset != 0) extensions_end = std::min(extensions_end, h.backing_file_offset);
  ZQ_RETURN_IF_ERROR(ParseExtensions(bytes, h.header_length, extensions_end, &h));

  if (h.backing_file_offset != 0 || h.backing_file_size != 0) {
    if (h.backing_file_size > kMaxBackingFileName) {
      return Corrupt("backing_file_size " + std::to_string(h.backing_file_size) + " is above " +
                     std::to_string(kMaxBackingFileName));
    }
    if (h.backing_file_offset > limit || h.backing_file_size > limit - h.backing_file_offset) {
      return Corrupt("backing_file_offset " + Hex(h.backing_file_offset) +
                     ": the name runs past the first cluster");
    }
    h.backing_file.assign(reinterpret_cast<const char*>(p) + h.backing_file_offset,
                          h.backing_file_size);
  }
  return h;
}

HeaderExtension BackingFormatExtension(std::string_view format) {
  return {kExtBackingFormat, std::vector<uint8_t>(format.begin(), format.end())};
}

Result<std::vector<uint8_t>> SerializeHeader(const Header& header) {
  if (header.version != 2 && header.version != 3) {
    return Status::InvalidArgument("SerializeHeader: version " + std::to_string(header.version));
  }
  if (header.cluster_bits < kMinClusterBits || header.cluster_bits > kMaxClusterBits) {
    return Status::InvalidArgument("SerializeHeader: cluster_bits " +
                                   std::to_string(header.cluster_bits));
  }
  uint32_t header_length = kV2HeaderLength;
  if (header.version == 2) {
    if (header.incompatible_features != 0 || header.compatible_features != 0 ||
        header.autoclear_features != 0 || header.refcount_order != kV2RefcountOrder ||
        header.compression_type != 0) {
      return Status::InvalidArgument(
          "SerializeHeader: version 2 cannot hold feature bits, refcount_order other than 4 or a "
          "compression type");
    }
  } else {
    header_length = header.header_length;
    if (header_length < kV3BaseHeaderLength || header_length % kHeaderAlignment != 0) {
      return Status::InvalidArgument("SerializeHeader: header_length " +
                                     std::to_string(header_length));
    }
    if (header.compression_type != 0 && header_length <= kOffCompressionType) {
      return Status::InvalidArgument(
          "SerializeHeader: a compression type needs header_length >= 112");
    }
  }
  if (header.backing_file.size() > kMaxBackingFileName) {
    return Status::InvalidArgument("SerializeHeader: backing file name too long");
  }

  uint64_t total = header_length;
  for (const HeaderExtension& ext : header.extensions) {
    if (ext.type == kExtEnd) {
      return Status::InvalidArgument("SerializeHeader: extension of type 0 (end marker)");
    }
    total += kExtensionHeaderSize + AlignUp(ext.data.size(), kHeaderAlignment);
  }
  total += kExtensionHeaderSize;  // end marker
  const uint64_t backing_offset = header.backing_file.empty() ? 0 : total;
  total += header.backing_file.size();
  if (total > header.cluster_size()) {
    return Status::InvalidArgument("SerializeHeader: header of " + std::to_string(total) +
                                   " bytes does not fit in one cluster");
  }

  std::vector<uint8_t> out(total, 0);
  uint8_t* p = out.data();
  StoreBE32(p + kOffMagic, kQcowMagic);
  StoreBE32(p + kOffVersion, header.version);
  StoreBE64(p + kOffBackingFileOffset, backing_offset);
  StoreBE32(p + kOffBackingFileSize, static_cast<uint32_t>(header.backing_file.size()));
  StoreBE32(p + kOffClusterBits, header.cluster_bits);
  StoreBE64(p + kOffSize, header.size);
  StoreBE32(p + kOffCryptMethod, header.crypt_method);
  StoreBE32(p + kOffL1Size, header.l1_size);
  StoreBE64(p + kOffL1TableOffset, header.l1_table_offset);
  StoreBE64(p + kOffRefcountTableOffset, header.refcount_table_offset);
  StoreBE32(p + kOffRefcountTableClusters, header.refcount_table_clusters);
  StoreBE32(p + kOffNbSnapshots, header.nb_snapshots);
  StoreBE64(p + kOffSnapshotsOffset, header.snapshots_offset);
  if (header.version == 3) {
    StoreBE64(p + kOffIncompatibleFeatures, header.incompatible_features);
    StoreBE64(p + kOffCompatibleFeatures, header.compatible_features);
    StoreBE64(p + kOffAutoclearFeatures, header.autoclear_features);
    StoreBE32(p + kOffRefcountOrder, header.refcount_order);
    StoreBE32(p + kOffHeaderLength, header_length);
    if (header_length > kOffCompressionType) p[kOffCompressionType] = header.compression_type;
  }
  uint64_t pos = header_length;
  for (const HeaderExtension& ext : header.extensions) {
    StoreBE32(p + pos, ext.type);
    StoreBE32(p + pos + 4, static_cast<uint32_t>(ext.data.size()));
    std::copy(ext.data.begin(), ext.data.end(), out.begin() + pos + kExtensionHeaderSize);
    pos += kExtensionHeaderSize + AlignUp(ext.data.size(), kHeaderAlignment);
  }
  pos += kExtensionHeaderSize;  // end marker: already zero
  std::copy(header.backing_file.begin(), header.backing_file.end(), out.begin() + pos);
  return out;
}

}  // namespace zqcow::format
