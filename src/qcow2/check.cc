// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The image checker: what `qemu-img check` does, read only.
//
// 1. Read the on-disk refcount of every host cluster of the file (one sequential walk over
//    the refcount blocks).
// 2. Compute the references: header cluster, L1 table, every L2 table, every data cluster
//    (normal and preallocated zero), every host cluster a compressed cluster's sectors
//    touch, the refcount table and every refcount block. Check the entries on the way
//    (reserved bits, alignment, COPIED flags against the on-disk refcounts).
//    Internal snapshots add references of their own, as in QEMU: the snapshot table's
//    clusters, and for every snapshot its L1 table, each L2 table once per L1 entry that
//    points to it, and each data cluster once per L2 entry (so a cluster shared by the
//    active state and two snapshots is referenced three times). Their entries get the same
//    reserved-bit and alignment checks, but not the COPIED check: QEMU checks COPIED on the
//    active tables only, where it must be set exactly when the on-disk refcount is 1. Nor
//    do they count in allocated_clusters / compressed_clusters (the active state's figures).
// 3. Compare: on disk lower than referenced = corruption, higher = leak.
//
// Memory: two 32-bit counters per host cluster of the FILE (never sized from a header
// field), plus the refcount table, one L1 table at a time and the snapshot table, each
// checked to lie inside the file and to be within QEMU's limits (8 MiB, 32 MiB, 64 MiB)
// before it is read. Files with more than kMaxCheckedClusters clusters are refused.
//
// Deliberate differences from QEMU, all in images that are corrupt anyway: L2 tables at
// unaligned offsets are reported but their entries are not followed, and an L2 table that
// several L1 entries of one L1 table share is read once (its references count once per L1
// entry). A snapshot table QEMU cannot read makes qemu-img check fail outright (and one
// whose entries run past end of file it reads as zeros); zqcow reports it as a corruption,
// counts the table's smallest possible extent as referenced, and checks the rest of the
// image without the snapshots. A snapshot whose L1 table is unaligned, too large or past
// end of file is a corruption and its L1 table is not followed (QEMU follows one past end
// of file, reading zeros).

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <limits>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "format/endian.h"
#include "format/bitmaps.h"
#include "format/entries.h"
#include "format/header.h"
#include "format/refcount.h"
#include "format/snapshot.h"
#include "format/types.h"
#include "io/file.h"
#include "qcow2/header_io.h"
#include "qcow2/qcow2_image.h"
#include "zqcow/image.h"

namespace zqcow::qcow2 {
namespace {

using format::kEntryCompressed;
using format::kEntryCopied;
using format::kEntryOffsetMask;
using format::kEntryZero;

// 2^26 clusters: 512 MiB of counters at most; 4 TiB files at 64 KiB clusters.
constexpr uint64_t kMaxCheckedClusters = uint64_t{1} << 26;
// Findings beyond this many are counted but not listed.
constexpr size_t kMaxMessages = 1000;
// Counter values: on-disk refcounts that cannot be read are kUnknown; larger values
// saturate at kSaturated.
constexpr uint32_t kUnknown = std::numeric_limits<uint32_t>::max();
constexpr uint32_t kSaturated = kUnknown - 1;

std::string Format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string Format(const char* fmt, ...) {
  char buf[256];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  return buf;
}

class Checker {
 public:
  Checker(io::File* file, const format::Header& header, uint64_t file_size)
      : file_(file),
        header_(header),
        geometry_(header.geometry()),
        refcount_geometry_{header.cluster_bits, header.refcount_order},
        cluster_size_(geometry_.cluster_size()),
        file_size_(file_size),
        file_clusters_((file_size + cluster_size_ - 1) >> header.cluster_bits),
        max_count_(static_cast<uint32_t>(
            std::min<uint64_t>(refcount_geometry_.max_refcount(), kSaturated))) {}

  Result<CheckResult> Run() {
    // A reference may end less than one cluster past end of file (as in QEMU): one counter
    // beyond the file's last cluster.
    if (file_clusters_ + 1 > kMaxCheckedClusters) {
      return Status::NotSupported(
          Format("%s: file of %" PRIu64 " clusters is too large to check (limit %" PRIu64 ")",
                 file_->path().c_str(), file_clusters_, kMaxCheckedClusters));
    }
    references_.assign(file_clusters_ + 1, 0);
    on_disk_.assign(file_clusters_ + 1, 0);
    result_.incomplete = (header_.incompatible_features & format::kIncompatDirty) != 0;
    result_.corrupt_flag = (header_.incompatible_features & format::kIncompatCorrupt) != 0;
    result_.total_clusters =
        header_.size / cluster_size_ + (geometry_.offset_in_cluster(header_.size) != 0);
    if (header_.incompatible_features & format::kIncompatCorrupt) {
      Note("Note: the image is marked corrupt (incompatible feature bit 1)");
    }

    ZQ_RETURN_IF_ERROR(ReadRefcountTable());
    ZQ_RETURN_IF_ERROR(ReadOnDiskRefcounts());
    Reference(0, cluster_size_);  // header
    ZQ_RETURN_IF_ERROR(CheckL1AndL2(header_.l1_table_offset, header_.l1_size, /*active=*/true));
    ZQ_RETURN_IF_ERROR(CheckSnapshots());
    ZQ_RETURN_IF_ERROR(CheckBitmaps());
    Reference(header_.refcount_table_offset, refcount_table_.size() * 8);
    CheckRefcountBlocks();
    CompareRefcounts();
    if (dropped_messages_ > 0) {
      result_.messages.push_back(
          Format("... %" PRIu64 " more findings not listed", dropped_messages_));
    }
    return std::move(result_);
  }

 private:
  void Note(std::string line) {
    if (result_.messages.size() < kMaxMessages) {
      result_.messages.push_back(std::move(line));
    } else {
      ++dropped_messages_;
    }
  }
  void Corruption(std::string line) {
    ++result_.corruptions;
    Note(std::move(line));
  }

  // One reference to every cluster that [offset, offset + size) touches. A range ending a
  // whole cluster or more past end of file is a corruption and counts nothing.
  void Reference(uint64_t offset, uint64_t size, uint64_t times = 1) {
    if (size == 0) return;
    if (offset > std::numeric_limits<uint64_t>::max() - size ||
        (offset + size > file_size_ && offset + size - file_size_ >= cluster_size_)) {
      Corruption(Format("ERROR: reference to offset 0x%" PRIx64 " size 0x%" PRIx64
                        " exceeds the end of the file by one cluster or more",
                        offset, size));
      return;
    }
    const uint64_t first = offset >> header_.cluster_bits;
    const uint64_t last = (offset + size - 1) >> header_.cluster_bits;
    for (uint64_t cluster = first; cluster <= last; ++cluster) {
      uint32_t& count = references_[cluster];  // in range: see Run()
      const uint64_t room = max_count_ - count;
      if (times > room) {
        Corruption(
            Format("ERROR: overflow cluster offset=0x%" PRIx64, cluster << header_.cluster_bits));
      }
      count += static_cast<uint32_t>(std::min(times, room));
    }
  }

  // The on-disk refcount, kUnknown when its refcount block cannot be read, 0 past the range
  // this checker tracks.
  uint32_t OnDisk(uint64_t cluster) const {
    return cluster < on_disk_.size() ? on_disk_[cluster] : kUnknown;
  }

  Status ReadRefcountTable() {
    const uint64_t entries = uint64_t{header_.refcount_table_clusters} * cluster_size_ / 8;
    // ParseHeader checked it is inside the file, unless the caller allowed a table past end
    // of file: that part reads as zeros (as in QEMU), and its reference is a corruption.
    std::vector<uint8_t> raw(entries * 8);
    const uint64_t offset = header_.refcount_table_offset;
    const uint64_t inside = offset >= file_size_ ? 0 : std::min<uint64_t>(raw.size(), file_size_ - offset);
    ZQ_RETURN_IF_ERROR(ReadExact(file_, offset, raw.data(), inside));
    refcount_table_.resize(entries);
    for (uint64_t i = 0; i < entries; ++i) refcount_table_[i] = format::LoadBE64(&raw[i * 8]);
    return Status::OK();
  }

  bool RefcountBlockUsable(uint64_t raw) const {
    return format::DecodeRefcountTableEntry(raw, geometry_).ok();
  }

  Status ReadOnDiskRefcounts() {
    const uint64_t per_block = refcount_geometry_.block_entries();
    std::vector<uint8_t> block(cluster_size_);
    for (uint64_t first = 0; first < on_disk_.size(); first += per_block) {
      const uint64_t table_index = first / per_block;
      const uint64_t count = std::min<uint64_t>(per_block, on_disk_.size() - first);
      const uint64_t raw = table_index < refcount_table_.size() ? refcount_table_[table_index] : 0;
      if (raw == 0) continue;  // no block: refcounts are 0
      if (!RefcountBlockUsable(raw)) {
        std::fill_n(on_disk_.begin() + first, count, kUnknown);
        continue;
      }
      // A block past end of file reads as zeros, as it does for QEMU.
      if (raw >= file_size_) continue;
      ZQ_RETURN_IF_ERROR(ReadExact(file_, raw, block.data(), block.size()));
      for (uint64_t i = 0; i < count; ++i) {
        const uint64_t value = format::GetRefcount(block, i, header_.refcount_order);
        on_disk_[first + i] = static_cast<uint32_t>(std::min<uint64_t>(value, kSaturated));
      }
    }
    return Status::OK();
  }

  void CheckCopied(bool copied, uint64_t host_offset, const char* what, uint64_t raw) {
    const uint32_t refcount = OnDisk(host_offset >> header_.cluster_bits);
    if (refcount == kUnknown) return;  // reported with its refcount block
    if ((refcount == 1) != copied) {
      Corruption(Format("ERROR OFLAG_COPIED %s: entry=0x%" PRIx64 " refcount=%" PRIu32, what, raw,
                        refcount));
    }
  }

  // One L1 table and everything it references. `active`: the image's own L1 table (checks
  // COPIED flags and counts the allocation figures), else a snapshot's.
  // REQUIRES: the table is inside the file and at most kMaxL1TableBytes (ParseHeader or
  // ValidateSnapshotL1Table checked).
  Status CheckL1AndL2(uint64_t l1_offset, uint32_t l1_size, bool active) {
    if (l1_size == 0) return Status::OK();
    const uint64_t l1_bytes = uint64_t{l1_size} * 8;
    Reference(l1_offset, l1_bytes);
    std::vector<uint8_t> l1(l1_bytes);
    ZQ_RETURN_IF_ERROR(ReadExact(file_, l1_offset, l1.data(), l1.size()));

    // L2 table offset -> number of L1 entries pointing at it.
    std::unordered_map<uint64_t, uint64_t> l2_tables;
    for (uint64_t i = 0; i < l1_size; ++i) {
      const uint64_t raw = format::LoadBE64(&l1[i * 8]);
      if (raw == 0) continue;
      if (raw & format::kL1ReservedMask) {
        Corruption(Format("ERROR found L1 entry with reserved bits set: 0x%" PRIx64, raw));
      }
      const uint64_t l2_offset = raw & kEntryOffsetMask;
      Reference(l2_offset, cluster_size_);
      if (geometry_.offset_in_cluster(l2_offset) != 0) {
        Corruption(Format("ERROR l2_offset=0x%" PRIx64
                          ": Table is not cluster aligned; L1 entry corrupted",
                          l2_offset));
        continue;
      }
      if (active) {
        CheckCopied((raw & kEntryCopied) != 0, l2_offset,
                    Format("L2 cluster (l1_index=%" PRIu64 ")", i).c_str(), raw);
      }
      ++l2_tables[l2_offset];
    }

    std::vector<std::pair<uint64_t, uint64_t>> ordered(l2_tables.begin(), l2_tables.end());
    std::sort(ordered.begin(), ordered.end());
    std::vector<uint8_t> l2(cluster_size_);
    for (const auto& [l2_offset, times] : ordered) {
      if (l2_offset >= file_size_) continue;  // reads as zeros: no entries
      ZQ_RETURN_IF_ERROR(ReadExact(file_, l2_offset, l2.data(), l2.size()));
      next_contiguous_ = 0;
      const uint64_t entry_bytes = geometry_.l2_entry_bytes();
      for (uint64_t j = 0; j < geometry_.l2_entries(); ++j) {
        const uint64_t raw = format::LoadBE64(&l2[j * entry_bytes]);
        if (geometry_.extended_l2) {
          const uint64_t bitmap = format::LoadBE64(&l2[j * entry_bytes + 8]);
          auto extended = format::DecodeExtendedL2Entry(raw, bitmap, geometry_);
          if (!extended.ok()) Corruption("ERROR " + extended.status().message());
        }
        CheckL2Entry(raw, times, active);
      }
    }
    return Status::OK();
  }

  // One L2 entry of a table that `times` L1 entries point to; `active` as in CheckL1AndL2.
  void CheckL2Entry(uint64_t raw, uint64_t times, bool active) {
    if (raw == 0) return;
    if (raw & kEntryCompressed) {
      if (raw & kEntryCopied) {
        Corruption(Format("ERROR: entry=0x%" PRIx64
                          ": copied flag must never be set for compressed clusters",
                          raw));
      }
      auto entry = format::DecodeL2Entry(raw & ~kEntryCopied, geometry_);
      if (!entry.ok()) {  // cannot happen for compressed entries; be safe
        Corruption("ERROR " + entry.status().message());
        return;
      }
      Reference(entry->host_offset.value(), entry->compressed_span, times);
      if (active) {
        result_.allocated_clusters += times;
        result_.compressed_clusters += times;
        // As QEMU counts them: compressed clusters are fragmented by nature.
        result_.fragmented_clusters += times;
      }
      return;
    }
    if (raw & format::kL2StandardReservedMask) {
      Corruption(Format("ERROR found l2 entry with reserved bits set: 0x%" PRIx64, raw));
    }
    const uint64_t offset = raw & kEntryOffsetMask;
    if (offset == 0) return;  // unallocated or plain zero cluster
    if (geometry_.offset_in_cluster(offset) != 0) {
      Corruption(Format("ERROR offset=0x%" PRIx64
                        ": %s cluster is not properly aligned; L2 entry corrupted",
                        offset, (raw & kEntryZero) ? "Preallocated" : "Data"));
    }
    Reference(offset, cluster_size_, times);
    if (active) {
      result_.allocated_clusters += times;
      // QEMU: a cluster is fragmented when it does not follow the previous allocated one
      // of the same L2 table in the file.
      if (next_contiguous_ != 0 && offset != next_contiguous_) {
        result_.fragmented_clusters += times;
      }
      next_contiguous_ = offset + cluster_size_;
      CheckCopied((raw & kEntryCopied) != 0, offset, "data cluster", raw);
    }
  }

  // The snapshot table and every snapshot's tables (see the file comment).
  Status CheckSnapshots() {
    if (header_.nb_snapshots == 0) return Status::OK();
    auto table = format::ReadSnapshotTable(header_, file_size_, ReaderOf(file_),
                                           format::SnapshotL1Checks::kLeaveToCaller);
    if (!table.ok()) {
      if (!table.status().IsCorruption()) return table.status();
      Corruption("ERROR " + table.status().message());
      // Where the entries end is unknown; they take at least this much (inside the file:
      // ParseHeader checked). The snapshots' own clusters will show as leaks.
      Reference(header_.snapshots_offset,
                uint64_t{header_.nb_snapshots} * format::kSnapshotEntryHeaderSize);
      return Status::OK();
    }
    for (size_t i = 0; i < table->snapshots.size(); ++i) {
      const format::Snapshot& snapshot = table->snapshots[i];
      if (header_.version >= 3 && snapshot.extra_data_size < format::kSnapshotV3MinExtraData) {
        Corruption(Format("ERROR snapshot table entry %zu is incomplete", i));
      }
      Status l1 = format::ValidateSnapshotL1Table(snapshot, i, geometry_, file_size_);
      if (!l1.ok()) {
        Corruption("ERROR " + l1.message());
        continue;
      }
      ZQ_RETURN_IF_ERROR(
          CheckL1AndL2(snapshot.l1_table_offset, snapshot.l1_size, /*active=*/false));
    }
    Reference(header_.snapshots_offset, table->byte_length);
    return Status::OK();
  }

  // Persistent dirty bitmaps: the directory, every bitmap's table and its data clusters are
  // referenced once each (QEMU's qcow2_check_bitmaps_refcounts).
  Status CheckBitmaps() {
    auto directory = format::ReadBitmapDirectory(header_, file_size_, ReaderOf(file_));
    if (!directory.ok()) {
      if (!directory.status().IsCorruption()) return directory.status();
      Corruption("ERROR " + directory.status().message());
      return Status::OK();
    }
    if (directory->bitmaps.empty()) return Status::OK();
    Reference(directory->offset, directory->size);
    for (const format::BitmapInfo& bitmap : directory->bitmaps) {
      const uint64_t bytes = uint64_t{bitmap.table_size} * 8;
      if (geometry_.offset_in_cluster(bitmap.table_offset) != 0 ||
          bitmap.table_offset > file_size_ || bytes > file_size_ - bitmap.table_offset ||
          bytes > format::kMaxBitmapDirectoryBytes) {
        Corruption(Format("ERROR bitmap table of '%s' at 0x%" PRIx64
                          " is unaligned or outside the file",
                          bitmap.name.c_str(), bitmap.table_offset));
        continue;
      }
      Reference(bitmap.table_offset, bytes);
      std::vector<uint8_t> table(bytes);
      ZQ_RETURN_IF_ERROR(ReadExact(file_, bitmap.table_offset, table.data(), table.size()));
      for (uint64_t data : format::BitmapDataClusters(table)) Reference(data, cluster_size_);
    }
    return Status::OK();
  }

  void CheckRefcountBlocks() {
    std::vector<std::pair<uint64_t, uint64_t>> blocks;  // (cluster, table index)
    for (uint64_t i = 0; i < refcount_table_.size(); ++i) {
      const uint64_t raw = refcount_table_[i];
      if (raw == 0) continue;
      if (!RefcountBlockUsable(raw)) {
        Corruption(Format("ERROR refcount block %" PRIu64
                          " is not cluster aligned; refcount table entry corrupted",
                          i));
        continue;
      }
      const uint64_t cluster = raw >> header_.cluster_bits;
      if (cluster >= file_clusters_) {
        Corruption(Format("ERROR refcount block %" PRIu64 " is outside image", i));
        continue;
      }
      Reference(raw, cluster_size_);
      blocks.emplace_back(cluster, i);
    }
    for (const auto& [cluster, index] : blocks) {
      if (references_[cluster] != 1) {
        Corruption(Format("ERROR refcount block %" PRIu64 " refcount=%" PRIu32, index,
                          references_[cluster]));
      }
    }
  }

  void CompareRefcounts() {
    uint64_t highest = 0;
    for (uint64_t cluster = 0; cluster < references_.size(); ++cluster) {
      const uint32_t reference = references_[cluster];
      // The cluster past the file's last one only matters when something references it.
      if (cluster >= file_clusters_ && reference == 0) continue;
      const uint32_t refcount = on_disk_[cluster];
      if (refcount == kUnknown) continue;  // its refcount block was reported
      if (refcount > 0 || reference > 0) highest = cluster;
      if (refcount == reference) continue;
      if (refcount < reference) {
        Corruption(Format("ERROR cluster %" PRIu64 " refcount=%" PRIu32 " reference=%" PRIu32,
                          cluster, refcount, reference));
      } else {
        ++result_.leaks;
        Note(Format("Leaked cluster %" PRIu64 " refcount=%" PRIu32 " reference=%" PRIu32, cluster,
                    refcount, reference));
      }
    }
    result_.image_end_offset = (highest + 1) << header_.cluster_bits;
  }

 public:
  // The leak repair (RepairLeaksOnFile), after Run(): every refcount higher than the
  // references counted is lowered to them, one read-modify-write per refcount block that
  // has such a cluster, then one sync. Lowering a leaked refcount is safe at any moment
  // (it never drops below what the image references), so a crash during the repair leaves
  // leaks at most. REQUIRES: Run() found no corruption; no one else writes the file.
  Result<uint64_t> RepairLeaks() {
    const uint64_t per_block = refcount_geometry_.block_entries();
    std::vector<uint8_t> block(cluster_size_);
    uint64_t repaired = 0;
    for (uint64_t first = 0; first < on_disk_.size(); first += per_block) {
      const uint64_t count = std::min<uint64_t>(per_block, on_disk_.size() - first);
      auto leaked = [&](uint64_t i) {
        return on_disk_[first + i] != kUnknown && on_disk_[first + i] > references_[first + i];
      };
      uint64_t i = 0;
      while (i < count && !leaked(i)) ++i;
      if (i == count) continue;
      // A refcount above 0 came from a usable block inside the file (ReadOnDiskRefcounts).
      const uint64_t block_offset = refcount_table_[first / per_block];
      ZQ_RETURN_IF_ERROR(ReadExact(file_, block_offset, block.data(), block.size()));
      for (; i < count; ++i) {
        if (!leaked(i)) continue;
        format::SetRefcount(block, i, header_.refcount_order, references_[first + i]);
        on_disk_[first + i] = references_[first + i];
        ++repaired;
      }
      ZQ_RETURN_IF_ERROR(file_->WriteAt(block_offset, block.data(), block.size()));
    }
    if (repaired > 0) ZQ_RETURN_IF_ERROR(file_->Sync());
    return repaired;
  }

 private:
  io::File* const file_;
  const format::Header header_;
  const format::Geometry geometry_;
  const format::RefcountGeometry refcount_geometry_;
  const uint64_t cluster_size_;
  const uint64_t file_size_;
  const uint64_t file_clusters_;
  const uint32_t max_count_;  // a reference count may not exceed this (as on disk)

  std::vector<uint64_t> refcount_table_;
  std::vector<uint32_t> references_;  // computed, per host cluster
  std::vector<uint32_t> on_disk_;     // read from the refcount blocks, per host cluster
  CheckResult result_;
  uint64_t dropped_messages_ = 0;
  uint64_t next_contiguous_ = 0;  // fragmentation: where the next data cluster would follow
};

}  // namespace

Result<uint64_t> RepairLeaksOnFile(io::File* file) {
  ZQ_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  ZQ_ASSIGN_OR_RETURN(format::Header header, ReadHeader(file, file_size));
  Checker checker(file, header, file_size);
  ZQ_ASSIGN_OR_RETURN(CheckResult found, checker.Run());
  if (found.corruptions > 0) {
    return Status::Corruption(file->path() + ": " + std::to_string(found.corruptions) +
                              " corruption(s) found, not repaired" +
                              (found.messages.empty() ? "" : " (" + found.messages.front() + ")"));
  }
  if (found.leaks == 0) return uint64_t{0};
  return checker.RepairLeaks();
}

Result<uint64_t> RepairLeaks(const std::string& path) {
  io::FileOptions options;
  options.writable = true;
  options.use_io_uring = false;  // a handful of block reads and writes
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<io::File> file, io::OpenFile(path, options));
  return RepairLeaksOnFile(file.get());
}

Result<CheckResult> CheckImageFile(io::File* file) {
  ZQ_ASSIGN_OR_RETURN(uint64_t file_size, file->Size());
  ZQ_ASSIGN_OR_RETURN(format::Header header,
                      ReadHeader(file, file_size, /*refcount_table_may_pass_eof=*/true));
  Checker checker(file, header, file_size);
  return checker.Run();
}

}  // namespace zqcow::qcow2

namespace zqcow {

Result<CheckResult> CheckImage(const std::string& path, bool force_share) {
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<io::File> file, qcow2::OpenForReading(path, force_share));
  return qcow2::CheckImageFile(file.get());
}

Result<uint64_t> RepairImageLeaks(const std::string& path) { return qcow2::RepairLeaks(path); }

}  // namespace zqcow
