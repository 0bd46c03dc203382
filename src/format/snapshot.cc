// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/snapshot.h"

#include <algorithm>
#include <cstdio>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

#include "format/endian.h"

namespace zqcow::format {
namespace {

// Byte offsets in an entry (see snapshot.h).
constexpr size_t kOffL1TableOffset = 0;
constexpr size_t kOffL1Size = 8;
constexpr size_t kOffIdStrSize = 12;
constexpr size_t kOffNameSize = 14;
constexpr size_t kOffDateSec = 16;
constexpr size_t kOffDateNsec = 20;
constexpr size_t kOffVmClockNsec = 24;
constexpr size_t kOffVmStateSize = 32;
constexpr size_t kOffExtraDataSize = 36;
// Byte offsets in the extra data; a field is present when the extra data covers it.
constexpr size_t kExtraVmStateSizeLarge = 0;
constexpr size_t kExtraDiskSize = 8;
constexpr size_t kExtraIcount = 16;
constexpr size_t kExtraFieldSize = 8;

constexpr uint64_t kEntryAlignment = 8;
constexpr uint64_t kFirstReadBytes = 64 << 10;
// Ids and names in messages are cut to this many bytes.
constexpr size_t kMaxQuotedBytes = 64;

std::string Hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// `s` in double quotes, for a one-line message: bytes outside printable ASCII, quotes and
// backslashes escaped, at most kMaxQuotedBytes of it.
std::string Quote(std::string_view s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < kMaxQuotedBytes; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c > 0x7e) {
      char buf[8];
      snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += s.size() > kMaxQuotedBytes ? "\"..." : "\"";
  return out;
}

// "snapshot 3", with the id and name once they have been read.
std::string Describe(size_t index, const Snapshot* snapshot, bool have_id, bool have_name) {
  std::string out = "snapshot " + std::to_string(index);
  if (have_id) {
    out += " (id " + Quote(snapshot->id);
    if (have_name) out += ", name " + Quote(snapshot->name);
    out += ")";
  }
  return out;
}

Status Corrupt(const std::string& msg) {
  return Status::Corruption("qcow2 snapshot table: " + msg);
}

// Parses the table from a prefix of the file's bytes at snapshots_offset. When an entry
// runs past the prefix but not past the end of the file (nor the table limit), Parse()
// fails with kInvalidArgument and truncated() is true: the caller may retry with more.
class TableParser {
 public:
  TableParser(std::span<const uint8_t> bytes, const Header& header, uint64_t file_size,
              SnapshotL1Checks l1_checks)
      : bytes_(bytes),
        header_(header),
        file_size_(file_size),
        l1_checks_(l1_checks),
        in_file_(file_size >= header.snapshots_offset ? file_size - header.snapshots_offset : 0) {}

  bool truncated() const { return truncated_; }

  Result<SnapshotTable> Parse() {
    SnapshotTable table;
    if (header_.nb_snapshots == 0) return table;
    if (header_.snapshots_offset > file_size_) {  // ParseHeader refuses it; be safe
      return Corrupt("snapshots_offset " + Hex(header_.snapshots_offset) + " is past end of file");
    }
    const Geometry geometry{header_.cluster_bits};
    table.snapshots.reserve(
        std::min<uint64_t>(header_.nb_snapshots, bytes_.size() / kSnapshotEntryHeaderSize + 1));
    uint64_t pos = 0;
    for (uint32_t index = 0; index < header_.nb_snapshots; ++index) {
      Snapshot sn;
      pos = AlignUp(pos, kEntryAlignment);
      const uint64_t entry = pos;
      ZQ_RETURN_IF_ERROR(Need(pos + kSnapshotEntryHeaderSize, index, &sn, false, false,
                              "entry at table offset " + Hex(entry)));
      const uint8_t* p = bytes_.data() + pos;
      sn.l1_table_offset = LoadBE64(p + kOffL1TableOffset);
      sn.l1_size = LoadBE32(p + kOffL1Size);
      const uint16_t id_size = LoadBE16(p + kOffIdStrSize);
      const uint16_t name_size = LoadBE16(p + kOffNameSize);
      sn.date_sec = LoadBE32(p + kOffDateSec);
      sn.date_nsec = LoadBE32(p + kOffDateNsec);
      sn.vm_clock_nsec = LoadBE64(p + kOffVmClockNsec);
      sn.vm_state_size = LoadBE32(p + kOffVmStateSize);
      sn.extra_data_size = LoadBE32(p + kOffExtraDataSize);
      pos += kSnapshotEntryHeaderSize;

      if (sn.extra_data_size > kMaxSnapshotExtraData) {
        return Corrupt(Describe(index, &sn, false, false) + ": extra_data_size " +
                       std::to_string(sn.extra_data_size) + " is above the limit of " +
                       std::to_string(kMaxSnapshotExtraData));
      }
      ZQ_RETURN_IF_ERROR(
          Need(pos + sn.extra_data_size, index, &sn, false, false,
               "extra data (extra_data_size " + std::to_string(sn.extra_data_size) + ")"));
      const uint8_t* extra = bytes_.data() + pos;
      if (sn.extra_data_size >= kExtraVmStateSizeLarge + kExtraFieldSize) {
        sn.vm_state_size = LoadBE64(extra + kExtraVmStateSizeLarge);
      }
      if (sn.extra_data_size >= kExtraDiskSize + kExtraFieldSize) {
        sn.disk_size = LoadBE64(extra + kExtraDiskSize);
      }
      if (sn.extra_data_size >= kExtraIcount + kExtraFieldSize) {
        sn.icount = LoadBE64(extra + kExtraIcount);
      }
      pos += sn.extra_data_size;

      ZQ_RETURN_IF_ERROR(Need(pos + id_size, index, &sn, false, false,
                              "id string (id_str_size " + std::to_string(id_size) + ")"));
      sn.id.assign(reinterpret_cast<const char*>(bytes_.data() + pos), id_size);
      pos += id_size;
      ZQ_RETURN_IF_ERROR(Need(pos + name_size, index, &sn, true, false,
                              "name (name_size " + std::to_string(name_size) + ")"));
      sn.name.assign(reinterpret_cast<const char*>(bytes_.data() + pos), name_size);
      pos += name_size;

      if (l1_checks_ == SnapshotL1Checks::kValidate) {
        ZQ_RETURN_IF_ERROR(ValidateSnapshotL1Table(sn, index, geometry, file_size_));
      }
      table.snapshots.push_back(std::move(sn));
    }
    table.byte_length = pos;
    return table;
  }

 private:
  // Whether the table's bytes up to `end` can be read. `what` names what ends there.
  Status Need(uint64_t end, uint32_t index, const Snapshot* sn, bool have_id, bool have_name,
              const std::string& what) {
    if (end > kMaxSnapshotTableBytes) {
      return Corrupt(Describe(index, sn, have_id, have_name) + ": " + what + " ends " +
                     std::to_string(end) + " bytes into the table, past the limit of " +
                     std::to_string(kMaxSnapshotTableBytes));
    }
    if (end > in_file_) {
      return Corrupt(Describe(index, sn, have_id, have_name) + ": " + what +
                     " runs past end of file (table at " + Hex(header_.snapshots_offset) +
                     ", file of " + std::to_string(file_size_) + " bytes)");
    }
    if (end > bytes_.size()) {
      truncated_ = true;
      return Status::InvalidArgument("ParseSnapshotTable: the table continues past the " +
                                     std::to_string(bytes_.size()) + " bytes given");
    }
    return Status::OK();
  }

  const std::span<const uint8_t> bytes_;
  const Header& header_;
  const uint64_t file_size_;
  const SnapshotL1Checks l1_checks_;
  const uint64_t in_file_;  // bytes of the file from snapshots_offset on
  bool truncated_ = false;
};

}  // namespace

Result<SnapshotTable> ParseSnapshotTable(std::span<const uint8_t> bytes, const Header& header,
                                         uint64_t file_size, SnapshotL1Checks l1_checks) {
  TableParser parser(bytes, header, file_size, l1_checks);
  return parser.Parse();
}

Result<SnapshotTable> ReadSnapshotTable(const Header& header, uint64_t file_size,
                                        const ReadAtFunction& read_at, SnapshotL1Checks l1_checks) {
  if (header.nb_snapshots == 0) return SnapshotTable{};
  if (header.snapshots_offset > file_size) {
    return Corrupt("snapshots_offset " + Hex(header.snapshots_offset) + " is past end of file");
  }
  const uint64_t available = std::min(file_size - header.snapshots_offset, kMaxSnapshotTableBytes);
  std::vector<uint8_t> bytes;
  uint64_t length = std::min(available, kFirstReadBytes);
  while (true) {
    const size_t have = bytes.size();
    bytes.resize(length);
    ZQ_RETURN_IF_ERROR(read_at(header.snapshots_offset + have, std::span(bytes).subspan(have)));
    TableParser parser(bytes, header, file_size, l1_checks);
    Result<SnapshotTable> table = parser.Parse();
    // Truncated means an entry ends inside `available` but past `length`: length < available.
    if (!parser.truncated()) return table;
    length = std::min(available, length * 2);
  }
}

Status ValidateSnapshotL1Table(const Snapshot& snapshot, size_t index, const Geometry& geometry,
                               uint64_t file_size) {
  const std::string who = Describe(index, &snapshot, true, true);
  const uint64_t offset = snapshot.l1_table_offset;
  const uint64_t bytes = uint64_t{snapshot.l1_size} * 8;
  if (bytes > kMaxL1TableBytes) {
    return Corrupt(who + ": l1_size " + std::to_string(snapshot.l1_size) +
                   " is above the limit of " + std::to_string(kMaxL1TableBytes / 8) + " entries");
  }
  if (geometry.offset_in_cluster(offset) != 0) {
    return Corrupt(who + ": l1_table_offset " + Hex(offset) +
                   " is not aligned to the cluster size " +
                   std::to_string(geometry.cluster_size()));
  }
  if (bytes == 0) return Status::OK();
  if (offset < geometry.cluster_size()) {
    return Corrupt(who + ": l1_table_offset " + Hex(offset) + " overlaps the header cluster");
  }
  if (offset > file_size || bytes > file_size - offset) {
    return Corrupt(who + ": l1_table_offset " + Hex(offset) + ": table of " +
                   std::to_string(bytes) + " bytes runs past end of file (" +
                   std::to_string(file_size) + " bytes)");
  }
  return Status::OK();
}

Result<std::vector<uint8_t>> SerializeSnapshotTable(const std::vector<Snapshot>& snapshots) {
  if (snapshots.size() > kMaxSnapshots) {
    return Status::InvalidArgument("SerializeSnapshotTable: " + std::to_string(snapshots.size()) +
                                   " snapshots");
  }
  constexpr uint64_t kMaxString = std::numeric_limits<uint16_t>::max();
  std::vector<uint8_t> out;
  for (const Snapshot& sn : snapshots) {
    if (sn.id.size() > kMaxString || sn.name.size() > kMaxString) {
      return Status::InvalidArgument("SerializeSnapshotTable: id or name longer than 65535 bytes");
    }
    if (sn.icount.has_value() && !sn.disk_size.has_value()) {
      return Status::InvalidArgument("SerializeSnapshotTable: icount without disk_size");
    }
    constexpr uint64_t kMax32 = std::numeric_limits<uint32_t>::max();
    uint32_t extra_size = 0;
    if (sn.icount.has_value()) {
      extra_size = kExtraIcount + kExtraFieldSize;
    } else if (sn.disk_size.has_value()) {
      extra_size = kExtraDiskSize + kExtraFieldSize;
    } else if (sn.vm_state_size > kMax32) {
      extra_size = kExtraVmStateSizeLarge + kExtraFieldSize;
    }
    const size_t at = AlignUp(out.size(), kEntryAlignment);
    out.resize(at + kSnapshotEntryHeaderSize + extra_size + sn.id.size() + sn.name.size(), 0);
    uint8_t* p = out.data() + at;
    StoreBE64(p + kOffL1TableOffset, sn.l1_table_offset);
    StoreBE32(p + kOffL1Size, sn.l1_size);
    StoreBE16(p + kOffIdStrSize, static_cast<uint16_t>(sn.id.size()));
    StoreBE16(p + kOffNameSize, static_cast<uint16_t>(sn.name.size()));
    StoreBE32(p + kOffDateSec, sn.date_sec);
    StoreBE32(p + kOffDateNsec, sn.date_nsec);
    StoreBE64(p + kOffVmClockNsec, sn.vm_clock_nsec);
    StoreBE32(p + kOffVmStateSize, static_cast<uint32_t>(std::min(sn.vm_state_size, kMax32)));
    StoreBE32(p + kOffExtraDataSize, extra_size);
    uint8_t* extra = p + kSnapshotEntryHeaderSize;
    if (extra_size > kExtraVmStateSizeLarge) {
      StoreBE64(extra + kExtraVmStateSizeLarge, sn.vm_state_size);
    }
    if (extra_size > kExtraDiskSize) StoreBE64(extra + kExtraDiskSize, *sn.disk_size);
    if (extra_size > kExtraIcount) StoreBE64(extra + kExtraIcount, *sn.icount);
    uint8_t* strings = extra + extra_size;
    std::copy(sn.id.begin(), sn.id.end(), strings);
    std::copy(sn.name.begin(), sn.name.end(), strings + sn.id.size());
  }
  return out;
}

}  // namespace zqcow::format
