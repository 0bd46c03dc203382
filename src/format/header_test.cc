// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/header.h"

#include <gtest/gtest.h>

#include <cctype>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "format/endian.h"
#include "format/snapshot.h"
#include "format/types.h"
#include "testing/test_util.h"

namespace zqcow::format {
namespace {

using ::zqcow::testing::ReadWholeFile;
using ::zqcow::testing::RunCommand;
using ::zqcow::testing::ShellQuote;
using ::zqcow::testing::TempDir;

constexpr uint64_t kBigFile = uint64_t{1} << 40;

// A header that uses every field zqcow can parse with a non-default value.
Header FullHeader() {
  Header h;
  h.version = 3;
  h.cluster_bits = 16;
  h.size = 10ull << 30;
  h.l1_size = 100;
  h.l1_table_offset = 0x30000;
  h.refcount_table_offset = 0x10000;
  h.refcount_table_clusters = 2;
  h.snapshots_offset = 0x50000;
  h.incompatible_features = kIncompatDirty | kIncompatCorrupt | kIncompatCompressionType;
  h.compatible_features = kCompatLazyRefcounts;
  h.autoclear_features = 0x3;
  h.refcount_order = 5;
  h.header_length = 120;
  h.compression_type = 1;
  h.extensions.push_back({kExtFeatureNameTable, std::vector<uint8_t>(13, 0x41)});
  h.extensions.push_back({kExtBackingFormat, {'q', 'c', 'o', 'w', '2'}});
  h.backing_file = "base image.qcow2";
  return h;
}

TEST(HeaderTest, EveryFieldRoundTrips) {
  Header h = FullHeader();
  auto bytes = SerializeHeader(h);
  ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
  // 120 header + (8+16) + (8+8) extensions + 8 end marker, then the name.
  const uint64_t name_offset = 120 + 24 + 16 + 8;
  ASSERT_EQ(bytes->size(), name_offset + h.backing_file.size());
  auto parsed = ParseHeader(*bytes, kBigFile);
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(parsed->backing_file_offset, name_offset);
  EXPECT_EQ(parsed->backing_file_size, h.backing_file.size());
  h.backing_file_offset = name_offset;
  h.backing_file_size = static_cast<uint32_t>(h.backing_file.size());
  EXPECT_EQ(*parsed, h);
  // Field by field as well, so a failure says which one.
  EXPECT_EQ(parsed->size, h.size);
  EXPECT_EQ(parsed->cluster_bits, 16u);
  EXPECT_EQ(parsed->l1_size, 100u);
  EXPECT_EQ(parsed->l1_table_offset, 0x30000u);
  EXPECT_EQ(parsed->refcount_table_offset, 0x10000u);
  EXPECT_EQ(parsed->refcount_table_clusters, 2u);
  EXPECT_EQ(parsed->snapshots_offset, 0x50000u);
  EXPECT_EQ(parsed->incompatible_features, h.incompatible_features);
  EXPECT_EQ(parsed->compatible_features, kCompatLazyRefcounts);
  EXPECT_EQ(parsed->autoclear_features, 0x3u);
  EXPECT_EQ(parsed->refcount_order, 5u);
  EXPECT_EQ(parsed->header_length, 120u);
  EXPECT_EQ(parsed->compression_type, 1);
  ASSERT_EQ(parsed->extensions.size(), 2u);
  EXPECT_EQ(parsed->extensions[0].data.size(), 13u);
  EXPECT_EQ(parsed->backing_file, "base image.qcow2");
  // Serializing the parsed header gives the same bytes.
  auto again = SerializeHeader(*parsed);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *bytes);
}

TEST(HeaderTest, FieldsRefusedByParseStillSerializeAtTheirOffsets) {
  Header h = FullHeader();
  h.crypt_method = 2;
  h.nb_snapshots = 3;
  auto bytes = SerializeHeader(h);
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(LoadBE32(bytes->data() + 32), 2u);
  EXPECT_EQ(LoadBE32(bytes->data() + 60), 3u);
  EXPECT_EQ(LoadBE64(bytes->data() + 64), 0x50000u);
}

TEST(HeaderTest, Version2RoundTrips) {
  Header h;
  h.version = 2;
  h.cluster_bits = 12;
  h.size = 123456789;
  h.l1_size = 1000;
  h.l1_table_offset = 0x3000;
  h.refcount_table_offset = 0x1000;
  h.refcount_table_clusters = 1;
  h.header_length = kV2HeaderLength;
  h.refcount_order = 4;
  auto bytes = SerializeHeader(h);
  ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
  EXPECT_EQ(bytes->size(), kV2HeaderLength + 8u);
  auto parsed = ParseHeader(*bytes, kBigFile);
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(*parsed, h);
}

TEST(HeaderTest, SerializeRefusesImpossibleHeaders) {
  Header v2;
  v2.version = 2;
  v2.incompatible_features = kIncompatDirty;
  EXPECT_EQ(SerializeHeader(v2).status().code(), Status::Code::kInvalidArgument);
  Header odd = FullHeader();
  odd.header_length = 108;
  EXPECT_EQ(SerializeHeader(odd).status().code(), Status::Code::kInvalidArgument);
  Header short_for_type = FullHeader();
  short_for_type.header_length = 104;
  EXPECT_EQ(SerializeHeader(short_for_type).status().code(), Status::Code::kInvalidArgument);
  Header too_big = FullHeader();
  too_big.cluster_bits = 9;
  too_big.extensions.push_back({kExtBitmaps, std::vector<uint8_t>(400)});
  EXPECT_EQ(SerializeHeader(too_big).status().code(), Status::Code::kInvalidArgument);
}

// Images made by qemu-img parse to what qemu-img info says.
struct QemuCreateCase {
  std::string options;
  uint32_t cluster_bits;
  uint32_t version;
  uint32_t refcount_order;
  uint8_t compression_type;
};

class QemuHeaderTest : public ::testing::TestWithParam<QemuCreateCase> {};

TEST_P(QemuHeaderTest, ParsesToTheRightValues) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  const QemuCreateCase& c = GetParam();
  TempDir dir;
  const std::string path = dir.File("img.qcow2");
  const uint64_t size = (1ull << 30) + 12345 * 512;  // not a multiple of the cluster size
  auto created = RunCommand("qemu-img create -q -f qcow2 -o " + c.options + " " + ShellQuote(path) +
                            " " + std::to_string(size));
  ASSERT_EQ(created.exit_code, 0) << created.output;
  std::vector<uint8_t> file = ReadWholeFile(path);
  auto h = ParseHeader(file, file.size());
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->version, c.version);
  EXPECT_EQ(h->cluster_bits, c.cluster_bits);
  EXPECT_EQ(h->size, size);
  EXPECT_EQ(h->refcount_order, c.refcount_order);
  EXPECT_EQ(h->compression_type, c.compression_type);
  EXPECT_EQ((h->incompatible_features & kIncompatCompressionType) != 0, c.compression_type != 0);
  EXPECT_EQ(h->header_length, c.version == 2 ? kV2HeaderLength : kV3HeaderLength);
  Geometry g{h->cluster_bits};
  EXPECT_EQ(h->l1_size, g.l1_size_for(size));
  EXPECT_EQ(h->nb_snapshots, 0u);
  EXPECT_TRUE(h->backing_file.empty());
  EXPECT_EQ(h->refcount_table_offset % g.cluster_size(), 0u);
  EXPECT_EQ(h->l1_table_offset % g.cluster_size(), 0u);
  if (c.version == 3 && c.cluster_bits >= 16) {  // QEMU leaves it out of small clusters
    bool has_feature_names = false;
    for (const auto& ext : h->extensions) has_feature_names |= ext.type == kExtFeatureNameTable;
    EXPECT_TRUE(has_feature_names);
  }

  auto info = RunCommand("qemu-img info --output=json " + ShellQuote(path) + " 2>/dev/null");
  ASSERT_EQ(info.exit_code, 0) << info.output;
  auto json = nlohmann::json::parse(info.output);
  EXPECT_EQ(json["cluster-size"].get<uint64_t>(), uint64_t{1} << c.cluster_bits);
  EXPECT_EQ(json["virtual-size"].get<uint64_t>(), size);
  const auto& spec = json["format-specific"]["data"];
  EXPECT_EQ(spec["compat"].get<std::string>(), c.version == 2 ? "0.10" : "1.1");
  EXPECT_EQ(spec["refcount-bits"].get<uint32_t>(), 1u << h->refcount_order);
  if (spec.contains("compression-type")) {
    EXPECT_EQ(spec["compression-type"].get<std::string>(),
              h->compression_type == 1 ? "zstd" : "zlib");
  }
}

INSTANTIATE_TEST_SUITE_P(
    QemuImages, QemuHeaderTest,
    ::testing::Values(QemuCreateCase{"cluster_size=512", 9, 3, 4, 0},
                      QemuCreateCase{"cluster_size=4096", 12, 3, 4, 0},
                      QemuCreateCase{"cluster_size=65536", 16, 3, 4, 0},
                      QemuCreateCase{"cluster_size=2M", 21, 3, 4, 0},
                      QemuCreateCase{"cluster_size=65536,compression_type=zstd", 16, 3, 4, 1},
                      QemuCreateCase{"cluster_size=4096,compression_type=zstd", 12, 3, 4, 1},
                      QemuCreateCase{"cluster_size=65536,refcount_bits=1", 16, 3, 0, 0},
                      QemuCreateCase{"cluster_size=65536,refcount_bits=2", 16, 3, 1, 0},
                      QemuCreateCase{"cluster_size=65536,refcount_bits=4", 16, 3, 2, 0},
                      QemuCreateCase{"cluster_size=65536,refcount_bits=8", 16, 3, 3, 0},
                      QemuCreateCase{"cluster_size=65536,refcount_bits=32", 16, 3, 5, 0},
                      QemuCreateCase{"cluster_size=512,refcount_bits=64", 9, 3, 6, 0},
                      QemuCreateCase{"cluster_size=65536,compat=0.10", 16, 2, 4, 0},
                      QemuCreateCase{"cluster_size=4096,compat=0.10", 12, 2, 4, 0}),
    [](const auto& info) {
      std::string name = info.param.options;
      for (char& ch : name) {
        if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
      }
      return name;
    });

TEST(HeaderTest, ParsesZeroSizedQemuImages) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  TempDir dir;
  for (const char* compat : {"1.1", "0.10"}) {
    const std::string path = dir.File(std::string(compat) + ".qcow2");
    auto r = RunCommand("qemu-img create -q -f qcow2 -o compat=" + std::string(compat) + " " +
                        ShellQuote(path) + " 0");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    std::vector<uint8_t> file = ReadWholeFile(path);
    auto h = ParseHeader(file, file.size());
    ASSERT_TRUE(h.ok()) << compat << ": " << h.status().ToString();
    EXPECT_EQ(h->size, 0u);
    EXPECT_EQ(h->l1_size, 0u);
  }
}

TEST(HeaderTest, ParsesQemuBackingFileName) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  TempDir dir;
  for (const char* compat : {"1.1", "0.10"}) {
    const std::string base = dir.File("base.qcow2");
    const std::string top = dir.File(std::string("top-") + compat + ".qcow2");
    ASSERT_EQ(RunCommand("qemu-img create -q -f qcow2 " + ShellQuote(base) + " 1M").exit_code, 0);
    auto r = RunCommand("qemu-img create -q -f qcow2 -o compat=" + std::string(compat) + " -b " +
                        ShellQuote(base) + " -F qcow2 " + ShellQuote(top));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    std::vector<uint8_t> file = ReadWholeFile(top);
    auto h = ParseHeader(file, file.size());
    ASSERT_TRUE(h.ok()) << h.status().ToString();
    EXPECT_EQ(h->backing_file, base) << compat;
    bool has_backing_format = false;
    for (const auto& ext : h->extensions) {
      if (ext.type == kExtBackingFormat) {
        has_backing_format = true;
        EXPECT_EQ(std::string(ext.data.begin(), ext.data.end()), "qcow2");
      }
    }
    EXPECT_TRUE(has_backing_format) << compat;
  }
}

TEST(HeaderTest, SnapshotsAreAccepted) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  TempDir dir;
  const std::string path = dir.File("snap.qcow2");
  auto r = RunCommand("qemu-img create -q -f qcow2 " + ShellQuote(path) + " 16M" +
                      " && qemu-io -f qcow2 -c 'write -P 0x11 0 64k' " + ShellQuote(path) +
                      " && qemu-img snapshot -c s1 " + ShellQuote(path) +
                      " && qemu-img snapshot -c s2 " + ShellQuote(path));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::vector<uint8_t> file = ReadWholeFile(path);
  auto h = ParseHeader(file, file.size());
  ASSERT_TRUE(h.ok()) << h.status().ToString();
  EXPECT_EQ(h->nb_snapshots, 2u);
  EXPECT_NE(h->snapshots_offset, 0u);
  EXPECT_EQ(h->snapshots_offset % h->cluster_size(), 0u);
  EXPECT_LT(h->snapshots_offset, file.size());

  // The largest count QEMU allows, with a table that fits in the (claimed) file.
  std::vector<uint8_t> most = file;
  StoreBE32(most.data() + 60, kMaxSnapshots);
  auto at_limit = ParseHeader(most, kBigFile);
  ASSERT_TRUE(at_limit.ok()) << at_limit.status().ToString();
  EXPECT_EQ(at_limit->nb_snapshots, kMaxSnapshots);

  // Without snapshots, snapshots_offset is not looked at (QEMU ignores it too).
  std::vector<uint8_t> none = file;
  StoreBE32(none.data() + 60, 0);
  StoreBE64(none.data() + 64, 0x123);
  auto ignored = ParseHeader(none, none.size());
  ASSERT_TRUE(ignored.ok()) << ignored.status().ToString();
  EXPECT_EQ(ignored->snapshots_offset, 0x123u);
}

// Malformed headers: each mutates a valid qemu-img header and expects a code and the name
// of the offending field in the message.
struct MalformedCase {
  const char* name;
  void (*mutate)(std::vector<uint8_t>& bytes, uint64_t& file_size);
  Status::Code code;
  const char* field;
};

void Set32(std::vector<uint8_t>& b, size_t off, uint32_t v) { StoreBE32(b.data() + off, v); }
void Set64(std::vector<uint8_t>& b, size_t off, uint64_t v) { StoreBE64(b.data() + off, v); }

const MalformedCase kMalformed[] = {
    {"truncated",
     [](auto& b, auto& size) {
       b.resize(50);
       size = 50;
     },
     Status::Code::kCorruption, "too short"},
    {"truncated_v3",
     [](auto& b, auto& size) {
       b.resize(80);
       size = 80;
     },
     Status::Code::kCorruption, "too short"},
    {"empty",
     [](auto& b, auto& size) {
       b.clear();
       size = 0;
     },
     Status::Code::kCorruption, "too short"},
    {"magic", [](auto& b, auto&) { b[3] = 0xfc; }, Status::Code::kCorruption, "magic"},
    {"version1", [](auto& b, auto&) { Set32(b, 4, 1); }, Status::Code::kNotSupported, "version"},
    {"version4", [](auto& b, auto&) { Set32(b, 4, 4); }, Status::Code::kNotSupported, "version"},
    {"unknown_incompatible", [](auto& b, auto&) { Set64(b, 72, 1ull << 5); },
     Status::Code::kNotSupported, "incompatible_features"},
    {"high_incompatible", [](auto& b, auto&) { Set64(b, 72, 1ull << 63); },
     Status::Code::kNotSupported, "incompatible_features"},
    {"external_data", [](auto& b, auto&) { Set64(b, 72, kIncompatExternalData); },
     Status::Code::kNotSupported, "external data"},
    // Extended L2 images are read (with clusters of at least 16 KiB, as the spec requires).
    {"extended_l2_small_clusters",
     [](auto& b, auto&) {
       Set64(b, 72, kIncompatExtendedL2);
       Set32(b, 20, 13);
     },
     Status::Code::kCorruption, "extended L2"},
    {"encryption", [](auto& b, auto&) { Set32(b, 32, 2); }, Status::Code::kNotSupported,
     "crypt_method"},
    // Snapshots are accepted (SnapshotsAreAccepted) but their table must be in place. The
    // valid image: header, refcount table, refcount block, then the 16-byte L1 table at
    // 0x30000, where the file ends.
    {"snapshots_unaligned",
     [](auto& b, auto&) {
       Set32(b, 60, 1);
       Set64(b, 64, 0x20008);
     },
     Status::Code::kCorruption, "snapshots_offset"},
    {"snapshots_offset_zero", [](auto& b, auto&) { Set32(b, 60, 1); }, Status::Code::kCorruption,
     "snapshots_offset"},
    {"snapshots_in_header_cluster",
     [](auto& b, auto&) {
       Set32(b, 60, 1);
       Set64(b, 64, 0x200);
     },
     Status::Code::kCorruption, "snapshots_offset"},
    {"snapshots_past_eof",
     [](auto& b, auto&) {
       Set32(b, 60, 1);
       Set64(b, 64, 0x100000);
     },
     Status::Code::kCorruption, "snapshots_offset"},
    {"snapshots_offset_huge",
     [](auto& b, auto&) {
       Set32(b, 60, 1);
       Set64(b, 64, 0xffffffffffff0000ull);
     },
     Status::Code::kCorruption, "snapshots_offset"},
    {"snapshots_entries_run_past_eof",
     [](auto& b, auto&) {
       Set32(b, 60, 60000);  // 60000 entries of at least 40 bytes
       Set64(b, 64, 0x30000);
     },
     Status::Code::kCorruption, "snapshots_offset"},
    {"nb_snapshots_above_limit",
     [](auto& b, auto&) {
       Set32(b, 60, 65537);
       Set64(b, 64, 0x30000);
     },
     Status::Code::kCorruption, "nb_snapshots"},
    {"nb_snapshots_huge",
     [](auto& b, auto&) {
       Set32(b, 60, 0xffffffff);
       Set64(b, 64, 0x30000);
     },
     Status::Code::kCorruption, "nb_snapshots"},
    {"cluster_bits_8", [](auto& b, auto&) { Set32(b, 20, 8); }, Status::Code::kCorruption,
     "cluster_bits"},
    {"cluster_bits_22", [](auto& b, auto&) { Set32(b, 20, 22); }, Status::Code::kCorruption,
     "cluster_bits"},
    {"cluster_bits_huge", [](auto& b, auto&) { Set32(b, 20, 0xffffffff); },
     Status::Code::kCorruption, "cluster_bits"},
    {"refcount_order_7", [](auto& b, auto&) { Set32(b, 96, 7); }, Status::Code::kCorruption,
     "refcount_order"},
    {"header_length_odd", [](auto& b, auto&) { Set32(b, 100, 108); }, Status::Code::kCorruption,
     "header_length"},
    {"header_length_short", [](auto& b, auto&) { Set32(b, 100, 96); }, Status::Code::kCorruption,
     "header_length"},
    {"header_length_past_cluster", [](auto& b, auto&) { Set32(b, 100, 65536 + 8); },
     Status::Code::kCorruption, "header_length"},
    {"header_length_past_eof",
     [](auto& b, auto& size) {
       Set32(b, 100, 4096);
       b.resize(1024);
       size = 1024;
     },
     Status::Code::kCorruption, "header_length"},
    {"l1_unaligned", [](auto& b, auto&) { Set64(b, 40, 0x30200); }, Status::Code::kCorruption,
     "l1_table_offset"},
    {"l1_overlaps_header", [](auto& b, auto&) { Set64(b, 40, 0); }, Status::Code::kCorruption,
     "l1_table_offset"},
    {"l1_past_eof", [](auto& b, auto&) { Set64(b, 40, 0x100000); }, Status::Code::kCorruption,
     "l1_table_offset"},
    {"l1_offset_huge", [](auto& b, auto&) { Set64(b, 40, 0xffffffffffff0000ull); },
     Status::Code::kCorruption, "l1_table_offset"},
    {"l1_table_runs_past_eof", [](auto& b, auto&) { Set32(b, 36, 100000); },
     Status::Code::kCorruption, "l1_table_offset"},
    {"l1_size_huge", [](auto& b, auto&) { Set32(b, 36, 0x7fffffff); }, Status::Code::kCorruption,
     "l1_size"},
    {"l1_size_too_small", [](auto& b, auto&) { Set32(b, 36, 1); }, Status::Code::kCorruption,
     "l1_size"},
    {"size_huge", [](auto& b, auto&) { Set64(b, 24, ~0ull); }, Status::Code::kCorruption,
     "l1_size"},
    {"reftable_past_eof", [](auto& b, auto&) { Set64(b, 48, 0x1000000); },
     Status::Code::kCorruption, "refcount_table_offset"},
    {"reftable_unaligned", [](auto& b, auto&) { Set64(b, 48, 0x10008); }, Status::Code::kCorruption,
     "refcount_table_offset"},
    {"reftable_overlaps_header", [](auto& b, auto&) { Set64(b, 48, 0); }, Status::Code::kCorruption,
     "refcount_table_offset"},
    {"reftable_runs_past_eof", [](auto& b, auto&) { Set32(b, 56, 10); }, Status::Code::kCorruption,
     "refcount_table_offset"},
    {"reftable_clusters_zero", [](auto& b, auto&) { Set32(b, 56, 0); }, Status::Code::kCorruption,
     "refcount_table_clusters"},
    {"reftable_clusters_huge", [](auto& b, auto&) { Set32(b, 56, 0xffffffff); },
     Status::Code::kCorruption, "refcount_table_clusters"},
    {"compression_type_2",
     [](auto& b, auto&) {
       Set64(b, 72, kIncompatCompressionType);
       b[104] = 2;
     },
     Status::Code::kNotSupported, "compression_type"},
    {"compression_type_without_bit", [](auto& b, auto&) { b[104] = 1; }, Status::Code::kCorruption,
     "compression_type"},
    {"compression_bit_without_type", [](auto& b, auto&) { Set64(b, 72, kIncompatCompressionType); },
     Status::Code::kCorruption, "compression_type"},
    {"compression_bit_with_short_header",
     [](auto& b, auto&) {
       Set64(b, 72, kIncompatCompressionType);
       b[104] = 1;
       Set32(b, 100, 104);
     },
     Status::Code::kCorruption, "compression_type"},
    {"extension_past_cluster",
     [](auto& b, auto&) {
       Set32(b, 112, 0x12345678);
       Set32(b, 116, 70000);
     },
     Status::Code::kCorruption, "extension"},
    {"backing_name_too_long",
     [](auto& b, auto&) {
       Set64(b, 8, 0x200);
       Set32(b, 16, 2000);
     },
     Status::Code::kCorruption, "backing_file_size"},
    {"backing_name_past_cluster",
     [](auto& b, auto&) {
       Set64(b, 8, 65536 - 10);
       Set32(b, 16, 100);
     },
     Status::Code::kCorruption, "backing_file_offset"},
};

class MalformedHeaderTest : public ::testing::TestWithParam<MalformedCase> {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(::zqcow::testing::HaveQemu());
    TempDir dir;
    const std::string path = dir.File("valid.qcow2");
    auto r = RunCommand("qemu-img create -q -f qcow2 " + ShellQuote(path) + " 1G");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    valid_ = new std::vector<uint8_t>(ReadWholeFile(path));
  }
  static void TearDownTestSuite() {
    delete valid_;
    valid_ = nullptr;
  }
  static std::vector<uint8_t>* valid_;
};
std::vector<uint8_t>* MalformedHeaderTest::valid_ = nullptr;

TEST_P(MalformedHeaderTest, RefusedWithFieldNamed) {
  ASSERT_NE(valid_, nullptr);
  std::vector<uint8_t> bytes = *valid_;
  uint64_t file_size = bytes.size();
  ASSERT_TRUE(ParseHeader(bytes, file_size).ok());
  GetParam().mutate(bytes, file_size);
  auto h = ParseHeader(bytes, file_size);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), GetParam().code) << h.status().ToString();
  EXPECT_NE(h.status().message().find(GetParam().field), std::string::npos)
      << h.status().ToString();
  EXPECT_EQ(h.status().message().find('\n'), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Table, MalformedHeaderTest, ::testing::ValuesIn(kMalformed),
                         [](const auto& info) { return std::string(info.param.name); });

// Every truncation and every single-byte change of the header region must be handled
// without reading out of bounds (ASan builds check this).
TEST(HeaderTest, NeverReadsOutOfBounds) {
  Header h = FullHeader();
  auto serialized = SerializeHeader(h);
  ASSERT_TRUE(serialized.ok());
  const std::vector<uint8_t> bytes = *serialized;
  for (size_t len = 0; len <= bytes.size(); ++len) {
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + len);  // exact-size allocation
    auto r = ParseHeader(cut, kBigFile);
    EXPECT_EQ(r.ok(), len == bytes.size()) << len;
  }
  for (size_t pos = 0; pos < bytes.size(); ++pos) {
    for (uint8_t value : {uint8_t{0x00}, uint8_t{0x01}, uint8_t{0x80}, uint8_t{0xff}}) {
      std::vector<uint8_t> mutated = bytes;
      mutated[pos] = value;
      (void)ParseHeader(mutated, kBigFile);
      (void)ParseHeader(mutated, mutated.size());
    }
  }
}

}  // namespace
}  // namespace zqcow::format
