// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The internal snapshot table (QEMU docs/interop/qcow2.txt, "Snapshots"). The header gives
// nb_snapshots and snapshots_offset (cluster aligned); the table is that many entries, each
// starting at a multiple of 8 bytes from snapshots_offset. One entry, all big-endian:
//   0  l1_table_offset u64     8  l1_size u32 (entries)
//  12  id_str_size u16        14  name_size u16
//  16  date_sec u32           20  date_nsec u32
//  24  vm_clock_nsec u64      32  vm_state_size u32
//  36  extra_data_size u32    40  extra data (extra_data_size bytes), of which known:
//                                   +0 vm_state_size_large u64 (replaces vm_state_size)
//                                   +8 disk_size u64 (virtual size when taken; version 3
//                                      images must have it)
//                                  +16 icount u64
// then the id string and the name (neither NUL terminated), then zero padding up to a
// multiple of 8. A snapshot's L1 table has the layout of the active one and shares its L2
// tables and data clusters with it and with other snapshots (refcounts count every user).

#ifndef ZQCOW_FORMAT_SNAPSHOT_H_
#define ZQCOW_FORMAT_SNAPSHOT_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "format/header.h"
#include "format/types.h"
#include "zqcow/status.h"

namespace zqcow::format {

// QEMU's limits: at most 65536 snapshots, 1 KiB of extra data per entry, and a table of at
// most 64 MiB. (A snapshot's L1 table has the active one's limit, kMaxL1TableBytes.)
inline constexpr uint32_t kMaxSnapshots = 65536;
inline constexpr uint32_t kMaxSnapshotExtraData = 1024;
inline constexpr uint64_t kMaxSnapshotTableBytes = 64ull << 20;
// The fixed part of an entry; also the smallest entry.
inline constexpr uint32_t kSnapshotEntryHeaderSize = 40;
// Extra data a version 3 entry must have: vm_state_size_large and disk_size.
inline constexpr uint32_t kSnapshotV3MinExtraData = 16;

struct Snapshot {
  std::string id;    // id_str: unique in the table (QEMU numbers them "1", "2", ...)
  std::string name;  // the tag given by the user; may be empty
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;  // entries
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  // vm_state_size_large when the extra data holds it, else the 32-bit field.
  uint64_t vm_state_size = 0;
  std::optional<uint64_t> disk_size;  // absent in old (version 2) entries
  std::optional<uint64_t> icount;
  // As stored, including extra data zqcow does not know. Parsing sets it; serializing
  // ignores it (it writes the known fields only, see SerializeSnapshotTable).
  uint32_t extra_data_size = 0;

  bool operator==(const Snapshot&) const = default;
};

struct SnapshotTable {
  std::vector<Snapshot> snapshots;  // in table order
  // Bytes from snapshots_offset to the end of the last entry's name. The last entry's
  // padding is not counted, as in QEMU (whose allocation and check use this length).
  uint64_t byte_length = 0;
};

// Whether ParseSnapshotTable validates each snapshot's L1 table fields (with
// ValidateSnapshotL1Table) or leaves that to the caller. A checker wants the second: one
// snapshot with a bad L1 table is a finding, not a reason to ignore the others.
enum class SnapshotL1Checks { kValidate, kLeaveToCaller };

// Parses header.nb_snapshots entries. `bytes` are the file's bytes from
// header.snapshots_offset on; REQUIRES: they reach the end of the file or the end of the
// table, whichever comes first (kInvalidArgument otherwise). `header` has passed
// ParseHeader for a file of `file_size` bytes.
// kCorruption, with messages "qcow2 snapshot table: snapshot <index> ...: <field> ..." (index
// from 0, then the id and name when they are known, printable and shortened): an entry, its
// extra data, id or name running past end of file; extra_data_size above
// kMaxSnapshotExtraData; a table longer than kMaxSnapshotTableBytes; with kValidate, what
// ValidateSnapshotL1Table refuses. Duplicate ids and version 3 entries without disk_size
// are not refused here (a checker reports the latter, as QEMU's does).
Result<SnapshotTable> ParseSnapshotTable(std::span<const uint8_t> bytes, const Header& header,
                                         uint64_t file_size,
                                         SnapshotL1Checks l1_checks = SnapshotL1Checks::kValidate);

// Fills `buffer` with the image file's bytes at `offset`; REQUIRES of the caller that
// offset + buffer.size() <= the file size. The I/O belongs to the caller.
using ReadAtFunction = std::function<Status(uint64_t offset, std::span<uint8_t> buffer)>;

// Reads and parses the table. The table has no length field, so this reads a prefix
// (64 KiB) and doubles it while the entries run on, up to the end of the file or
// kMaxSnapshotTableBytes. No table (nb_snapshots == 0) reads nothing. Errors: those of
// ParseSnapshotTable and of `read_at`.
Result<SnapshotTable> ReadSnapshotTable(const Header& header, uint64_t file_size,
                                        const ReadAtFunction& read_at,
                                        SnapshotL1Checks l1_checks = SnapshotL1Checks::kValidate);

// Snapshot `index`'s L1 table: l1_size at most kMaxL1TableBytes / 8 entries,
// l1_table_offset cluster aligned, and for a non-empty table past the header cluster and
// wholly inside the file. kCorruption naming the snapshot and the field otherwise.
Status ValidateSnapshotL1Table(const Snapshot& snapshot, size_t index, const Geometry& geometry,
                               uint64_t file_size);

// Encodes entries as a table (padding between entries, none after the last). Extra data:
// vm_state_size_large and disk_size when disk_size is set, then icount when that is set;
// only vm_state_size_large when disk_size is not set but vm_state_size needs 64 bits; none
// otherwise. The 32-bit vm_state_size saturates. kInvalidArgument: icount without
// disk_size, an id or name longer than 65535 bytes, more than kMaxSnapshots entries.
Result<std::vector<uint8_t>> SerializeSnapshotTable(const std::vector<Snapshot>& snapshots);

}  // namespace zqcow::format

#endif  // ZQCOW_FORMAT_SNAPSHOT_H_
