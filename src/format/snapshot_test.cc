// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/snapshot.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "format/endian.h"
#include "format/header.h"
#include "format/types.h"
#include "testing/test_util.h"

namespace zqcow::format {
namespace {

using ::zqcow::testing::ReadWholeFile;
using ::zqcow::testing::RunCommand;
using ::zqcow::testing::ShellQuote;
using ::zqcow::testing::TempDir;

// The synthetic file: 64 KiB clusters, snapshot L1 tables in cluster 2, the snapshot table
// at cluster 3 and running to the end of the file.
constexpr uint64_t kClusterSize = 65536;
constexpr uint64_t kL1Offset = 2 * kClusterSize;
constexpr uint64_t kTableOffset = 3 * kClusterSize;

Header TableHeader(uint32_t nb_snapshots) {
  Header h;
  h.cluster_bits = 16;
  h.nb_snapshots = nb_snapshots;
  h.snapshots_offset = kTableOffset;
  return h;
}

std::vector<Snapshot> ThreeSnapshots() {
  Snapshot modern;  // as QEMU 5.0 and later write them
  modern.id = "1";
  modern.name = "before upgrade";
  modern.l1_table_offset = kL1Offset;
  modern.l1_size = 16;
  modern.date_sec = 1700000000;
  modern.date_nsec = 123456789;
  modern.vm_clock_nsec = 987654321012;
  modern.vm_state_size = 0;
  modern.disk_size = 1ull << 30;
  modern.icount = ~0ull;
  modern.extra_data_size = 24;
  Snapshot v3;  // vm_state_size_large and disk_size only
  v3.id = "2";
  v3.name = "";
  v3.l1_table_offset = kL1Offset;
  v3.l1_size = 8;
  v3.vm_state_size = 5ull << 32;  // needs the 64-bit field
  v3.disk_size = 512ull << 20;
  v3.extra_data_size = 16;
  Snapshot old;  // version 2 era: no extra data
  old.id = "10";
  old.name = "s";
  old.l1_table_offset = kL1Offset;
  old.l1_size = 0;
  old.vm_state_size = 4096;
  old.extra_data_size = 0;
  return {modern, v3, old};
}

std::vector<uint8_t> Serialize(const std::vector<Snapshot>& snapshots) {
  auto bytes = SerializeSnapshotTable(snapshots);
  EXPECT_TRUE(bytes.ok()) << bytes.status().ToString();
  return bytes.ok() ? *bytes : std::vector<uint8_t>{};
}

TEST(SnapshotTest, RoundTrips) {
  const std::vector<Snapshot> snapshots = ThreeSnapshots();
  const std::vector<uint8_t> bytes = Serialize(snapshots);
  // 40 + 24 + 1 + 14 = 79, padded to 80; + 40 + 16 + 1 = 137, padded to 144; + 40 + 2 + 1.
  ASSERT_EQ(bytes.size(), 187u);
  auto table = ParseSnapshotTable(bytes, TableHeader(3), kTableOffset + bytes.size());
  ASSERT_TRUE(table.ok()) << table.status().ToString();
  EXPECT_EQ(table->byte_length, bytes.size());
  ASSERT_EQ(table->snapshots.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(table->snapshots[i], snapshots[i]) << i;
  EXPECT_EQ(table->snapshots[1].vm_state_size, 5ull << 32);
  EXPECT_FALSE(table->snapshots[2].disk_size.has_value());
  EXPECT_FALSE(table->snapshots[1].icount.has_value());
  // The 32-bit field saturates when the 64-bit one is in use.
  EXPECT_EQ(LoadBE32(&bytes[80 + 32]), 0xffffffffu);
  // Serializing the parsed table gives the same bytes.
  auto again = SerializeSnapshotTable(table->snapshots);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, bytes);
}

TEST(SnapshotTest, EmptyTableReadsNothing) {
  Header h = TableHeader(0);
  h.snapshots_offset = 0;
  auto parsed = ParseSnapshotTable({}, h, kTableOffset);
  ASSERT_TRUE(parsed.ok());
  EXPECT_TRUE(parsed->snapshots.empty());
  EXPECT_EQ(parsed->byte_length, 0u);
  int reads = 0;
  auto read = ReadSnapshotTable(h, kTableOffset, [&](uint64_t, std::span<uint8_t>) {
    ++reads;
    return Status::OK();
  });
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(reads, 0);
}

TEST(SnapshotTest, UnknownExtraDataIsSkipped) {
  std::vector<Snapshot> snapshots = ThreeSnapshots();
  std::vector<uint8_t> bytes = Serialize({snapshots[0]});
  // Grow the extra data from 24 to 40 bytes: 16 unknown bytes before the id.
  StoreBE32(&bytes[36], 40);
  bytes.insert(bytes.begin() + 40 + 24, 16, 0xee);
  auto table = ParseSnapshotTable(bytes, TableHeader(1), kTableOffset + bytes.size());
  ASSERT_TRUE(table.ok()) << table.status().ToString();
  EXPECT_EQ(table->snapshots[0].extra_data_size, 40u);
  EXPECT_EQ(table->snapshots[0].id, "1");
  EXPECT_EQ(table->snapshots[0].name, "before upgrade");
  EXPECT_EQ(table->snapshots[0].icount, ~0ull);
}

// A table longer than the first read: ReadSnapshotTable reads on until the end.
TEST(SnapshotTest, ReadSnapshotTableGrowsItsRead) {
  std::vector<Snapshot> snapshots = ThreeSnapshots();
  for (Snapshot& sn : snapshots) sn.name = std::string(60000, 'n') + sn.id;
  const std::vector<uint8_t> bytes = Serialize(snapshots);
  ASSERT_GT(bytes.size(), 128u << 10);
  // The file goes on after the table.
  std::vector<uint8_t> file(kTableOffset + bytes.size() + 100000, 0x77);
  std::copy(bytes.begin(), bytes.end(), file.begin() + kTableOffset);
  int reads = 0;
  auto table = ReadSnapshotTable(TableHeader(3), file.size(),
                                 [&](uint64_t offset, std::span<uint8_t> buffer) {
                                   ++reads;
                                   EXPECT_LE(offset + buffer.size(), file.size());
                                   std::memcpy(buffer.data(), &file[offset], buffer.size());
                                   return Status::OK();
                                 });
  ASSERT_TRUE(table.ok()) << table.status().ToString();
  EXPECT_EQ(reads, 3);  // 64 KiB, 128 KiB, 256 KiB
  EXPECT_EQ(table->byte_length, bytes.size());
  ASSERT_EQ(table->snapshots.size(), 3u);
  EXPECT_EQ(table->snapshots[2].name, std::string(60000, 'n') + "10");

  // A read error is passed on.
  auto failed = ReadSnapshotTable(TableHeader(3), file.size(), [](uint64_t, std::span<uint8_t>) {
    return Status::IOError("disk on fire");
  });
  EXPECT_EQ(failed.status().code(), Status::Code::kIOError);

  // ParseSnapshotTable given too short a prefix: the caller's mistake, not corruption.
  auto short_prefix =
      ParseSnapshotTable(std::span(bytes).first(1000), TableHeader(3), kTableOffset + bytes.size());
  EXPECT_EQ(short_prefix.status().code(), Status::Code::kInvalidArgument);
}

TEST(SnapshotTest, TableAboveTheSizeLimitIsCorruption) {
  // 2000 entries of 65576 bytes each (a 65535-byte name), generated on the fly: the table
  // would be 131 MB; entry 1023 crosses 64 MiB.
  constexpr uint64_t kEntryBytes = 40 + 65535 + 1;
  auto fill = [](uint64_t offset, std::span<uint8_t> buffer) {
    uint8_t entry[40] = {};
    StoreBE64(entry, kL1Offset);
    StoreBE16(entry + 14, 65535);  // name_size
    for (size_t i = 0; i < buffer.size(); ++i) {
      const uint64_t at = (offset - kTableOffset + i) % kEntryBytes;
      buffer[i] = at < 40 ? entry[at] : at == kEntryBytes - 1 ? 0 : 'n';
    }
    return Status::OK();
  };
  auto table = ReadSnapshotTable(TableHeader(2000), uint64_t{1} << 40, fill);
  ASSERT_FALSE(table.ok());
  EXPECT_EQ(table.status().code(), Status::Code::kCorruption);
  EXPECT_NE(table.status().message().find("snapshot 1023"), std::string::npos)
      << table.status().ToString();
  EXPECT_NE(table.status().message().find("limit"), std::string::npos);
}

TEST(SnapshotTest, ParsesQemuSnapshots) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  TempDir dir;
  const std::string path = dir.File("snap.qcow2");
  const uint64_t size = 64 << 20;
  auto r = RunCommand("qemu-img create -q -f qcow2 -o cluster_size=4096 " + ShellQuote(path) + " " +
                      std::to_string(size) + " && qemu-io -f qcow2 -c 'write -P 0x11 0 1M' " +
                      ShellQuote(path) + " && qemu-img snapshot -c first " + ShellQuote(path) +
                      " && qemu-img resize -q " + ShellQuote(path) + " 128M" +
                      " && qemu-img snapshot -c 'second one' " + ShellQuote(path));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<uint8_t> file = ReadWholeFile(path);
  auto header = ParseHeader(file, file.size());
  ASSERT_TRUE(header.ok()) << header.status().ToString();
  ASSERT_EQ(header->nb_snapshots, 2u);
  auto table =
      ReadSnapshotTable(*header, file.size(), [&](uint64_t offset, std::span<uint8_t> buffer) {
        std::memcpy(buffer.data(), &file[offset], buffer.size());
        return Status::OK();
      });
  ASSERT_TRUE(table.ok()) << table.status().ToString();
  ASSERT_EQ(table->snapshots.size(), 2u);
  EXPECT_GE(table->byte_length, 2u * kSnapshotEntryHeaderSize + 16);
  EXPECT_LE(header->snapshots_offset + table->byte_length, file.size());

  const Geometry geometry{header->cluster_bits};
  const Snapshot& first = table->snapshots[0];
  const Snapshot& second = table->snapshots[1];
  EXPECT_EQ(first.name, "first");
  EXPECT_EQ(second.name, "second one");
  EXPECT_EQ(first.disk_size, size);
  EXPECT_EQ(second.disk_size, 2 * size);
  EXPECT_EQ(first.l1_size, geometry.l1_size_for(size));
  EXPECT_EQ(second.l1_size, geometry.l1_size_for(2 * size));
  EXPECT_GE(first.extra_data_size, kSnapshotV3MinExtraData);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(ValidateSnapshotL1Table(table->snapshots[i], i, geometry, file.size()).ok());
    EXPECT_NE(table->snapshots[i].l1_table_offset, header->l1_table_offset);
  }

  // The same as qemu-img info says.
  auto info = RunCommand("qemu-img info --output=json " + ShellQuote(path) + " 2>/dev/null");
  ASSERT_EQ(info.exit_code, 0) << info.output;
  const auto json = nlohmann::json::parse(info.output)["snapshots"];
  ASSERT_EQ(json.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const Snapshot& sn = table->snapshots[i];
    EXPECT_EQ(json[i]["id"].get<std::string>(), sn.id);
    EXPECT_EQ(json[i]["name"].get<std::string>(), sn.name);
    EXPECT_EQ(json[i]["vm-state-size"].get<uint64_t>(), sn.vm_state_size);
    EXPECT_EQ(json[i]["date-sec"].get<uint64_t>(), sn.date_sec);
    EXPECT_EQ(json[i]["date-nsec"].get<uint64_t>(), sn.date_nsec);
  }
}

// Malformed tables: each mutates the serialized ThreeSnapshots (whose file ends with the
// table) and expects kCorruption naming the snapshot and the field.
struct MalformedCase {
  const char* name;
  void (*mutate)(std::vector<uint8_t>& table, Header& header, uint64_t& file_size);
  const char* snapshot;  // "snapshot <index>"
  const char* field;
  bool l1_field;  // refused by ValidateSnapshotL1Table, accepted with kLeaveToCaller
};

// Entry offsets in the serialized ThreeSnapshots (see RoundTrips).
constexpr size_t kEntry0 = 0;
constexpr size_t kEntry1 = 80;
constexpr size_t kEntry2 = 144;

const MalformedCase kMalformed[] = {
    {"more_entries_than_table", [](auto&, Header& h, auto&) { h.nb_snapshots = 4; }, "snapshot 3",
     "entry at table offset", false},
    {"entry_cut_by_eof",
     [](auto& t, Header&, uint64_t& size) {
       t.resize(kEntry2 + 20);
       size = kTableOffset + t.size();
     },
     "snapshot 2", "entry at table offset", false},
    {"extra_data_above_limit", [](auto& t, Header&, auto&) { StoreBE32(&t[kEntry1 + 36], 1025); },
     "snapshot 1", "extra_data_size 1025", false},
    {"extra_data_huge", [](auto& t, Header&, auto&) { StoreBE32(&t[kEntry1 + 36], 0xffffffff); },
     "snapshot 1", "extra_data_size", false},
    {"extra_data_past_eof", [](auto& t, Header&, auto&) { StoreBE32(&t[kEntry2 + 36], 1000); },
     "snapshot 2", "extra_data_size 1000", false},
    {"id_past_eof", [](auto& t, Header&, auto&) { StoreBE16(&t[kEntry2 + 12], 500); }, "snapshot 2",
     "id_str_size 500", false},
    {"name_past_eof", [](auto& t, Header&, auto&) { StoreBE16(&t[kEntry2 + 14], 0xffff); },
     "snapshot 2 (id \"10\")", "name_size 65535", false},
    {"l1_unaligned", [](auto& t, Header&, auto&) { StoreBE64(&t[kEntry1], kL1Offset + 8); },
     "snapshot 1 (id \"2\", name \"\")", "l1_table_offset", true},
    {"l1_unaligned_empty", [](auto& t, Header&, auto&) { StoreBE64(&t[kEntry2], kL1Offset + 512); },
     "snapshot 2 (id \"10\", name \"s\")", "l1_table_offset", true},
    {"l1_in_header_cluster", [](auto& t, Header&, auto&) { StoreBE64(&t[kEntry0], 0); },
     "snapshot 0 (id \"1\", name \"before upgrade\")", "l1_table_offset", true},
    {"l1_past_eof", [](auto& t, Header&, auto&) { StoreBE64(&t[kEntry0], 1ull << 40); },
     "snapshot 0", "l1_table_offset", true},
    {"l1_offset_huge",
     [](auto& t, Header&, auto&) { StoreBE64(&t[kEntry0], 0xffffffffffff0000ull); }, "snapshot 0",
     "l1_table_offset", true},
    {"l1_runs_past_eof", [](auto& t, Header&, auto&) { StoreBE32(&t[kEntry0 + 8], 60000); },
     "snapshot 0", "l1_table_offset", true},
    {"l1_size_above_limit",
     [](auto& t, Header&, uint64_t& size) {
       StoreBE32(&t[kEntry1 + 8], (32u << 20) / 8 + 1);
       size = uint64_t{1} << 40;  // the table would fit: only the limit refuses it
     },
     "snapshot 1", "l1_size 4194305", true},
    {"l1_size_huge", [](auto& t, Header&, auto&) { StoreBE32(&t[kEntry1 + 8], 0xffffffff); },
     "snapshot 1", "l1_size", true},
};

class MalformedSnapshotTableTest : public ::testing::TestWithParam<MalformedCase> {};

TEST_P(MalformedSnapshotTableTest, RefusedWithSnapshotAndFieldNamed) {
  std::vector<uint8_t> bytes = Serialize(ThreeSnapshots());
  Header header = TableHeader(3);
  uint64_t file_size = kTableOffset + bytes.size();
  ASSERT_TRUE(ParseSnapshotTable(bytes, header, file_size).ok());
  GetParam().mutate(bytes, header, file_size);
  auto table = ParseSnapshotTable(bytes, header, file_size);
  ASSERT_FALSE(table.ok());
  const Status& status = table.status();
  EXPECT_EQ(status.code(), Status::Code::kCorruption) << status.ToString();
  EXPECT_EQ(status.message().rfind("qcow2 snapshot table: ", 0), 0u) << status.ToString();
  EXPECT_NE(status.message().find(GetParam().snapshot), std::string::npos) << status.ToString();
  EXPECT_NE(status.message().find(GetParam().field), std::string::npos) << status.ToString();
  EXPECT_EQ(status.message().find('\n'), std::string::npos);

  // Leaving the L1 checks to the caller: the table parses, and the check refuses it there.
  auto lenient = ParseSnapshotTable(bytes, header, file_size, SnapshotL1Checks::kLeaveToCaller);
  EXPECT_EQ(lenient.ok(), GetParam().l1_field) << lenient.status().ToString();
  if (lenient.ok()) {
    Status first_error;
    for (size_t i = 0; i < lenient->snapshots.size() && first_error.ok(); ++i) {
      first_error = ValidateSnapshotL1Table(lenient->snapshots[i], i, Geometry{16}, file_size);
    }
    EXPECT_EQ(first_error.message(), status.message());
  }
}

INSTANTIATE_TEST_SUITE_P(Table, MalformedSnapshotTableTest, ::testing::ValuesIn(kMalformed),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(SnapshotTest, MessagesQuoteIdsAndNamesOnOneLine) {
  std::vector<Snapshot> snapshots = ThreeSnapshots();
  snapshots[0].name = "evil\nname \"quoted\" \xff" + std::string(100, 'x');
  snapshots[0].l1_table_offset = kL1Offset + 8;
  const std::vector<uint8_t> bytes = Serialize(snapshots);
  auto table = ParseSnapshotTable(bytes, TableHeader(3), kTableOffset + bytes.size());
  ASSERT_FALSE(table.ok());
  const std::string& message = table.status().message();
  EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  EXPECT_NE(message.find(R"(name "evil\x0aname \"quoted\" \xff)"), std::string::npos) << message;
  EXPECT_NE(message.find("xxx\"..."), std::string::npos) << message;  // cut
  EXPECT_LT(message.size(), 300u);
}

TEST(SnapshotTest, SerializeRefusesImpossibleTables) {
  Snapshot icount_only;
  icount_only.icount = 5;
  EXPECT_EQ(SerializeSnapshotTable({icount_only}).status().code(), Status::Code::kInvalidArgument);
  Snapshot long_name;
  long_name.name.assign(65536, 'a');
  EXPECT_EQ(SerializeSnapshotTable({long_name}).status().code(), Status::Code::kInvalidArgument);
}

// Every truncation and every single-byte change of a table is handled without reading out
// of bounds (ASan builds check this).
TEST(SnapshotTest, NeverReadsOutOfBounds) {
  const std::vector<uint8_t> bytes = Serialize(ThreeSnapshots());
  for (size_t len = 0; len <= bytes.size(); ++len) {
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + len);  // exact-size allocation
    auto r = ParseSnapshotTable(cut, TableHeader(3), kTableOffset + len);
    EXPECT_EQ(r.ok(), len == bytes.size()) << len;
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), Status::Code::kCorruption) << len;
    }
  }
  for (size_t pos = 0; pos < bytes.size(); ++pos) {
    for (uint8_t value : {uint8_t{0x00}, uint8_t{0x01}, uint8_t{0x80}, uint8_t{0xff}}) {
      std::vector<uint8_t> mutated = bytes;
      mutated[pos] = value;
      for (uint64_t file_size : {kTableOffset + mutated.size(), uint64_t{1} << 40}) {
        std::vector<uint8_t> padded = mutated;
        if (file_size > kTableOffset + mutated.size()) padded.resize(300000, 0);
        (void)ParseSnapshotTable(padded, TableHeader(3), file_size);
      }
    }
  }
}

}  // namespace
}  // namespace zqcow::format
