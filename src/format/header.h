// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The qcow2 header (QEMU docs/interop/qcow2.txt, "Header"). Byte layout, all big-endian:
//   0  magic "QFI\xfb"            4  version (2 or 3)
//   8  backing_file_offset       16  backing_file_size
//  20  cluster_bits              24  size (virtual, bytes)
//  32  crypt_method              36  l1_size (entries)
//  40  l1_table_offset           48  refcount_table_offset
//  56  refcount_table_clusters   60  nb_snapshots
//  64  snapshots_offset          -- version 3 only from here --
//  72  incompatible_features     80  compatible_features
//  88  autoclear_features        96  refcount_order
// 100  header_length            104  compression_type (if header_length > 104)
// then header extensions (type u32, length u32, data padded to 8), ended by type 0.

#ifndef ZQCOW_FORMAT_HEADER_H_
#define ZQCOW_FORMAT_HEADER_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "format/types.h"
#include "zqcow/status.h"

namespace zqcow::format {

inline constexpr uint32_t kQcowMagic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kV2HeaderLength = 72;
inline constexpr uint32_t kV3BaseHeaderLength = 104;
inline constexpr uint32_t kV3HeaderLength = 112;  // with compression type, padded to 8

// Incompatible feature bits.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatExternalData = 1ull << 2;
inline constexpr uint64_t kIncompatCompressionType = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
// The ones zqcow understands; any other set bit makes the image unopenable.
// Extended L2 images are read only (qcow2_open refuses to write them).
inline constexpr uint64_t kIncompatSupported =
    kIncompatDirty | kIncompatCorrupt | kIncompatCompressionType | kIncompatExtendedL2;
inline constexpr uint32_t kMinExtendedL2ClusterBits = 14;
// QEMU's limit on an L1 table (the active one and every snapshot's): 32 MiB of entries.
inline constexpr uint64_t kMaxL1TableBytes = 32ull << 20;

// Compatible feature bits.
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureNameTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtFullDiskEncryption = 0x0537be77;
inline constexpr uint32_t kExtExternalDataFile = 0x44415441;

struct HeaderExtension {
  uint32_t type = 0;
  std::vector<uint8_t> data;  // unpadded

  bool operator==(const HeaderExtension&) const = default;
};

struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = kV3HeaderLength;
  uint8_t compression_type = 0;
  std::vector<HeaderExtension> extensions;  // in file order, without the end marker
  std::string backing_file;                 // read from backing_file_offset

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  bool extended_l2() const { return (incompatible_features & kIncompatExtendedL2) != 0; }
  Geometry geometry() const { return Geometry{cluster_bits, extended_l2()}; }
  bool operator==(const Header&) const = default;
};

// Parses and validates a header from the start of the file. `bytes` holds at least the
// first cluster of the file when the file is that long (or the whole file if shorter);
// `file_size` is the file's length. Rejects, with a kCorruption / kNotSupported message
// that says which field is wrong: bad magic, version other than 2/3, cluster_bits outside
// 9..21, refcount_order > 6, header_length < 104 or not a multiple of 8 or past the
// cluster, unknown incompatible bits, encryption, compression type unknown or its feature
// bit inconsistent, L1/refcount table offsets unaligned, overlapping the header or past
// end of file, L1 larger than the file could hold or than 32 MiB of entries, refcount table
// larger than the file, extensions that run past the cluster. Internal snapshots are
// accepted; when nb_snapshots != 0 it must be at most kMaxSnapshots and snapshots_offset
// must be cluster aligned, past the header cluster, with nb_snapshots minimal entries
// (kSnapshotEntryHeaderSize bytes each) inside the file. The entries themselves are left to
// ParseSnapshotTable (format/snapshot.h). With nb_snapshots == 0, snapshots_offset is
// ignored, as QEMU does.
// Backing files are parsed (name returned), not refused here; the caller decides.
// Version 2 headers (72 bytes) parse with header_length 72, refcount_order 4, no feature
// bits and compression type 0. Extensions run from header_length up to the backing file
// name (or the end of the cluster); an area without an end marker is accepted, as in QEMU.
// Messages start with "qcow2 header: " and name the field; callers prefix the path.
// refcount_table_may_pass_eof: accept a refcount table that runs past end of file (the
// checker reads it as zeros past the end and reports the corruption, as qemu-img check does).
Result<Header> ParseHeader(std::span<const uint8_t> bytes, uint64_t file_size,
                           bool refcount_table_may_pass_eof = false);

// The backing format header extension (kExtBackingFormat): the format's name ("qcow2",
// "raw"), unterminated, as QEMU writes it.
HeaderExtension BackingFormatExtension(std::string_view format);

// Encodes the header, its extensions and end marker (and the backing file name, if any,
// right after them). The result is at most one cluster long; kInvalidArgument otherwise.
Result<std::vector<uint8_t>> SerializeHeader(const Header& header);

}  // namespace zqcow::format

#endif  // ZQCOW_FORMAT_HEADER_H_
