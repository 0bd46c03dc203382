// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The checker against `qemu-img check`: images made by qemu-img/qemu-io (with and without
// internal snapshots) check clean with the same figures, and damaged copies get the same
// verdict (exit code 0 clean, 2 corruption, 3 leaks only).

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "format/endian.h"
#include "format/entries.h"
#include "format/header.h"
#include "format/refcount.h"
#include "format/snapshot.h"
#include "format/types.h"
#include "io/file.h"
#include "qcow2/qcow2_image.h"
#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow::qcow2 {
namespace {

using ::zqcow::testing::ReadWholeFile;
using ::zqcow::testing::RunCommand;
using ::zqcow::testing::ShellQuote;
using ::zqcow::testing::TempDir;
using ::zqcow::testing::WriteWholeFile;

constexpr int kQemuClean = 0;
constexpr int kQemuCorrupt = 2;
constexpr int kQemuLeaks = 3;

std::string Messages(const CheckResult& r) {
  std::string out;
  for (const auto& m : r.messages) out += m + "\n";
  return out;
}

int Verdict(const CheckResult& r) {
  return r.corruptions > 0 ? kQemuCorrupt : r.leaks > 0 ? kQemuLeaks : kQemuClean;
}

struct QemuCheck {
  int exit_code = -1;
  nlohmann::json json;
  std::string output;
};

QemuCheck RunQemuCheck(const std::string& path) {
  QemuCheck q;
  auto r = RunCommand("qemu-img check --output=json " + ShellQuote(path) + " 2>/dev/null");
  q.exit_code = r.exit_code;
  q.output = r.output;
  q.json = nlohmann::json::parse(r.output, nullptr, /*allow_exceptions=*/false);
  return q;
}

// Whether qemu-img check could judge `path`; if so, expects zqcow's verdict `ours` to be
// the same (the random-damage tests call this once per round).
bool ExpectSameVerdictAsQemu(const std::string& path, const CheckResult& ours, int round) {
  QemuCheck qemu = RunQemuCheck(path);
  if (qemu.exit_code != kQemuClean && qemu.exit_code != kQemuCorrupt &&
      qemu.exit_code != kQemuLeaks) {
    return false;  // QEMU could not finish (check errors)
  }
  EXPECT_EQ(Verdict(ours), qemu.exit_code) << "round " << round << "\n"
                                           << Messages(ours) << "qemu: " << qemu.output;
  return true;
}

uint64_t JsonOr0(const nlohmann::json& j, const char* key) {
  return j.is_object() && j.contains(key) ? j[key].get<uint64_t>() : 0;
}

// zqcow's verdict equals qemu-img's; returns zqcow's result.
CheckResult ExpectSameVerdict(const std::string& path, int expected_exit_code) {
  QemuCheck qemu = RunQemuCheck(path);
  EXPECT_EQ(qemu.exit_code, expected_exit_code)
      << "the test image is not what the test means: " << qemu.output;
  auto ours = CheckImage(path);
  EXPECT_TRUE(ours.ok()) << ours.status().ToString();
  if (!ours.ok()) return {};
  EXPECT_EQ(Verdict(*ours), qemu.exit_code) << Messages(*ours) << "\nqemu: " << qemu.output;
  return *ours;
}

// Runs commands, failing the test on a non-zero exit.
void RunOrFail(const std::string& command) {
  auto r = RunCommand(command);
  ASSERT_EQ(r.exit_code, 0) << command << "\n" << r.output;
}

// The layout of an image read with the format module, for patching.
struct Layout {
  format::Header header;
  format::Geometry geometry;
  uint64_t l2_offset = 0;       // first L2 table
  uint64_t refcount_block = 0;  // first refcount block
};

Layout ReadLayout(const std::vector<uint8_t>& file) {
  Layout l;
  auto h = format::ParseHeader(file, file.size());
  EXPECT_TRUE(h.ok()) << h.status().ToString();
  if (!h.ok()) return l;
  l.header = *h;
  l.geometry = format::Geometry{h->cluster_bits};
  l.l2_offset = format::LoadBE64(&file[h->l1_table_offset]) & format::kEntryOffsetMask;
  l.refcount_block = format::LoadBE64(&file[h->refcount_table_offset]);
  return l;
}

uint64_t L2Raw(const std::vector<uint8_t>& file, const Layout& l, uint64_t index) {
  return format::LoadBE64(&file[l.l2_offset + index * 8]);
}
void SetL2Raw(std::vector<uint8_t>& file, const Layout& l, uint64_t index, uint64_t raw) {
  format::StoreBE64(&file[l.l2_offset + index * 8], raw);
}
std::span<uint8_t> RefcountBlock(std::vector<uint8_t>& file, const Layout& l) {
  return {&file[l.refcount_block], l.geometry.cluster_size()};
}

// ---------------------------------------------------------------------------------------
// Clean images.

struct CleanCase {
  std::string name;
  std::string create_options;  // -o for qemu-img create
  uint64_t virtual_size;
  // qemu-io commands; "SRC<n>" is replaced by the path of a source file of n clusters with
  // varied compressibility.
  std::vector<std::string> io_commands;
};

std::vector<uint8_t> VariedData(uint64_t bytes, uint64_t cluster_size, uint64_t seed) {
  std::vector<uint8_t> data(bytes, 0x5a);
  for (uint64_t off = 0, i = 0; off < bytes; off += cluster_size, ++i) {
    const uint64_t random_bytes = std::min(bytes - off, cluster_size * ((i + seed) % 4) / 4);
    auto random = ::zqcow::testing::MakeData(::zqcow::testing::DataKind::kRandom, random_bytes,
                                             seed * 1000 + i);
    std::copy(random.begin(), random.end(), data.begin() + off);
  }
  return data;
}

class CleanImageTest : public ::testing::TestWithParam<CleanCase> {};

TEST_P(CleanImageTest, ChecksCleanWithQemuFigures) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  const CleanCase& c = GetParam();
  TempDir dir;
  const std::string image = dir.File("img.qcow2");
  RunOrFail("qemu-img create -q -f qcow2 -o " + c.create_options + " " + ShellQuote(image) + " " +
            std::to_string(c.virtual_size));
  auto info = ReadImageInfo(image);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  std::string commands;
  int sources = 0;
  for (std::string cmd : c.io_commands) {
    const size_t at = cmd.find("SRC");
    if (at != std::string::npos) {
      const size_t end = cmd.find(' ', at);
      const uint64_t bytes = std::stoull(cmd.substr(at + 3, end - at - 3));
      const std::string source = dir.File("src" + std::to_string(sources));
      WriteWholeFile(source, VariedData(bytes, info->cluster_size, ++sources));
      cmd.replace(at, end - at, source);
    }
    commands += " -c " + ShellQuote(cmd);
  }
  if (!commands.empty()) RunOrFail("qemu-io -f qcow2" + commands + " " + ShellQuote(image));

  QemuCheck qemu = RunQemuCheck(image);
  ASSERT_EQ(qemu.exit_code, kQemuClean) << qemu.output;
  auto ours = CheckImage(image);
  ASSERT_TRUE(ours.ok()) << ours.status().ToString();
  EXPECT_EQ(ours->corruptions, 0u) << Messages(*ours);
  EXPECT_EQ(ours->leaks, 0u) << Messages(*ours);
  EXPECT_FALSE(ours->incomplete);
  EXPECT_EQ(ours->allocated_clusters, JsonOr0(qemu.json, "allocated-clusters"));
  EXPECT_EQ(ours->compressed_clusters, JsonOr0(qemu.json, "compressed-clusters"));
  EXPECT_EQ(ours->image_end_offset, JsonOr0(qemu.json, "image-end-offset"));
  EXPECT_TRUE(ours->messages.empty()) << Messages(*ours);
}

const CleanCase kCleanCases[] = {
    {"empty", "cluster_size=65536", 64 << 20, {}},
    {"zero_size_v2", "compat=0.10", 0, {}},
    {"normal_writes",
     "cluster_size=65536",
     16 << 20,
     {"write -P 0x11 0 256k", "write -P 0x22 1M 64k", "write -P 0x33 4000k 100k"}},
    {"compressed_zlib",
     "cluster_size=65536",
     16 << 20,
     {"write -c -P 0x5a 0 64k", "write -c -s SRC1048576 1M 1M", "write -P 0x22 3M 64k"}},
    {"compressed_zstd",
     "cluster_size=65536,compression_type=zstd",
     16 << 20,
     {"write -c -s SRC1048576 0 1M", "write -c -P 0x5a 2M 64k"}},
    {"zero_and_discard",
     "cluster_size=65536",
     16 << 20,
     {"write -P 0x11 0 1M", "write -c -s SRC524288 2M 512k", "write -z 128k 128k",
      "discard 512k 128k", "write -z 5M 64k", "discard 2M 64k", "write -z 2112k 64k"}},
    {"preallocated_zero",
     "cluster_size=65536",
     16 << 20,
     {"write -P 0x11 0 256k", "write -z 64k 64k"}},
    {"cluster_512",
     "cluster_size=512",
     4 << 20,
     {"write -c -s SRC32768 0 32k", "write -P 0x11 64k 4k", "write -c -P 0x5a 128k 8k"}},
    {"cluster_4096",
     "cluster_size=4096",
     8 << 20,
     {"write -c -s SRC131072 0 128k", "write -P 0x11 1M 16k", "write -z 8k 8k"}},
    {"cluster_2m",
     "cluster_size=2M",
     32 << 20,
     {"write -c -s SRC8388608 0 8M", "write -P 0x11 10M 2M", "write -c -P 0x5a 14M 2M"}},
    {"refcount_bits_1",
     "cluster_size=4096,refcount_bits=1",
     8 << 20,
     {"write -c -s SRC65536 0 64k", "write -P 0x11 1M 16k"}},
    {"refcount_bits_16",
     "cluster_size=4096,refcount_bits=16",
     8 << 20,
     {"write -c -s SRC65536 0 64k", "write -P 0x11 1M 16k"}},
    {"refcount_bits_64",
     "cluster_size=4096,refcount_bits=64",
     8 << 20,
     {"write -c -s SRC65536 0 64k", "write -P 0x11 1M 16k"}},
    {"version_2",
     "cluster_size=65536,compat=0.10",
     16 << 20,
     {"write -c -s SRC524288 0 512k", "write -P 0x11 1M 64k", "discard 1M 64k"}},
};

INSTANTIATE_TEST_SUITE_P(Qemu, CleanImageTest, ::testing::ValuesIn(kCleanCases),
                         [](const auto& info) { return info.param.name; });

TEST(CheckTest, ConvertedImageChecksClean) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  TempDir dir;
  const std::string raw = dir.File("disk.raw");
  const std::string image = dir.File("disk.qcow2");
  ::zqcow::testing::WriteRawImage(raw, 8 << 20, ::zqcow::testing::DataKind::kMixed, 7);
  RunOrFail("qemu-img convert -c -O qcow2 " + ShellQuote(raw) + " " + ShellQuote(image));
  CheckResult r = ExpectSameVerdict(image, kQemuClean);
  EXPECT_GT(r.compressed_clusters, 0u);
  EXPECT_EQ(r.image_end_offset, JsonOr0(RunQemuCheck(image).json, "image-end-offset"));
}

// ---------------------------------------------------------------------------------------
// Damaged copies of one image: guest cluster 0 compressed, 1 normal, 2 compressed, 3 normal.

class DamagedImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(::zqcow::testing::HaveQemu());
    base_ = dir_.File("base.qcow2");
    RunOrFail("qemu-img create -q -f qcow2 " + ShellQuote(base_) + " 4M");
    RunOrFail(
        "qemu-io -f qcow2 -c 'write -c -P 0x11 0 64k' -c 'write -P 0x22 64k 64k' "
        "-c 'write -c -P 0x33 128k 64k' -c 'write -P 0x44 192k 64k' " +
        ShellQuote(base_));
    bytes_ = ReadWholeFile(base_);
    layout_ = ReadLayout(bytes_);
    ASSERT_NE(layout_.l2_offset, 0u);
    ASSERT_NE(layout_.refcount_block, 0u);
    ExpectSameVerdict(base_, kQemuClean);
  }

  // Writes a patched copy and returns its path.
  std::string Damage(const std::string& name,
                     const std::function<void(std::vector<uint8_t>&, const Layout&)>& patch) {
    std::vector<uint8_t> copy = bytes_;
    patch(copy, layout_);
    const std::string path = dir_.File(name + ".qcow2");
    WriteWholeFile(path, copy);
    return path;
  }

  format::L2Entry Entry(uint64_t index) const {
    auto e = format::DecodeL2Entry(L2Raw(bytes_, layout_, index), layout_.geometry);
    EXPECT_TRUE(e.ok());
    return e.ok() ? *e : format::L2Entry{};
  }
  uint32_t order() const { return layout_.header.refcount_order; }

  TempDir dir_;
  std::string base_;
  std::vector<uint8_t> bytes_;
  Layout layout_;
};

TEST_F(DamagedImageTest, RefcountDecreasedIsCorruption) {
  const uint64_t cluster = Entry(1).host_offset.value() >> layout_.header.cluster_bits;
  const std::string path = Damage("decreased", [&](auto& b, const Layout& l) {
    format::SetRefcount(RefcountBlock(b, l), cluster, order(), 0);
  });
  CheckResult r = ExpectSameVerdict(path, kQemuCorrupt);
  EXPECT_NE(
      Messages(r).find("ERROR cluster " + std::to_string(cluster) + " refcount=0 reference=1"),
      std::string::npos)
      << Messages(r);
}

TEST_F(DamagedImageTest, SharedCompressedClusterRefcountDecreasedIsCorruption) {
  // Both compressed clusters live in one host cluster: its refcount is 2.
  const uint64_t cluster = Entry(0).host_offset.value() >> layout_.header.cluster_bits;
  ASSERT_EQ(Entry(2).host_offset.value() >> layout_.header.cluster_bits, cluster);
  ASSERT_EQ(format::GetRefcount(RefcountBlock(bytes_, layout_), cluster, order()), 2u);
  const std::string path = Damage("shared", [&](auto& b, const Layout& l) {
    format::SetRefcount(RefcountBlock(b, l), cluster, order(), 1);
  });
  ExpectSameVerdict(path, kQemuCorrupt);
}

TEST_F(DamagedImageTest, ExtraRefcountIsLeak) {
  // On a compressed host cluster (no COPIED flag depends on it): a pure leak.
  const uint64_t cluster = Entry(0).host_offset.value() >> layout_.header.cluster_bits;
  const std::string path = Damage("extra", [&](auto& b, const Layout& l) {
    format::SetRefcount(RefcountBlock(b, l), cluster, order(), 3);
  });
  CheckResult r = ExpectSameVerdict(path, kQemuLeaks);
  EXPECT_EQ(r.leaks, 1u);
  EXPECT_EQ(r.corruptions, 0u);
}

TEST_F(DamagedImageTest, UnreferencedClusterAtEndIsLeak) {
  const uint64_t end_cluster = bytes_.size() >> layout_.header.cluster_bits;
  const std::string path = Damage("tail", [&](auto& b, const Layout& l) {
    b.resize(b.size() + l.geometry.cluster_size());
    format::SetRefcount(RefcountBlock(b, l), end_cluster, order(), 1);
  });
  CheckResult r = ExpectSameVerdict(path, kQemuLeaks);
  EXPECT_EQ(r.leaks, 1u);
}

TEST_F(DamagedImageTest, L2EntryPastEndOfFileIsCorruption) {
  const uint64_t past = (bytes_.size() + 16 * layout_.geometry.cluster_size());
  const std::string path = Damage("past_eof", [&](auto& b, const Layout& l) {
    SetL2Raw(b, l, 1, format::EncodeNormalL2Entry(format::HostOffset(past), true));
  });
  CheckResult r = ExpectSameVerdict(path, kQemuCorrupt);
  EXPECT_NE(Messages(r).find("end of the file"), std::string::npos) << Messages(r);
}

TEST_F(DamagedImageTest, CompressedSectorsRunningPastEndOfFile) {
  // The compressed cluster with the highest offset; grow its sector count.
  const uint64_t index = Entry(2).host_offset > Entry(0).host_offset ? 2 : 0;
  const format::Geometry& g = layout_.geometry;
  const uint64_t raw = L2Raw(bytes_, layout_, index);
  const uint32_t x = format::CompressedOffsetBits(g);
  auto with_sectors = [&](uint64_t sectors) {
    return (raw & ~(format::CompressedSectorsMask(g) << x)) | (sectors << x);
  };
  // A few sectors more stay inside the host cluster: QEMU does not mind, neither do we.
  ExpectSameVerdict(
      Damage("sectors_small",
             [&](auto& b, const Layout& l) { SetL2Raw(b, l, index, with_sectors(3)); }),
      kQemuClean);
  // Into the next cluster (which holds a normal cluster): that one is referenced twice.
  ExpectSameVerdict(
      Damage("sectors_next",
             [&](auto& b, const Layout& l) { SetL2Raw(b, l, index, with_sectors(200)); }),
      kQemuCorrupt);
  // A descriptor starting in the last cluster and running a whole cluster past the end.
  const std::string path = Damage("sectors_eof", [&](auto& b, const Layout& l) {
    const uint64_t last_cluster = (b.size() - 1) & ~(g.cluster_size() - 1);
    SetL2Raw(b, l, index,
             format::EncodeCompressedL2Entry(format::HostOffset(last_cluster + 100),
                                             g.cluster_size() - 1, g) |
                 (format::CompressedSectorsMask(g) << x));
  });
  ExpectSameVerdict(path, kQemuCorrupt);
}

TEST_F(DamagedImageTest, CopiedFlagClearedIsCorruption) {
  const std::string l2 = Damage("l2_copied", [&](auto& b, const Layout& l) {
    SetL2Raw(b, l, 1, L2Raw(b, l, 1) & ~format::kEntryCopied);
  });
  CheckResult r = ExpectSameVerdict(l2, kQemuCorrupt);
  EXPECT_NE(Messages(r).find("OFLAG_COPIED"), std::string::npos) << Messages(r);
  const std::string l1 = Damage("l1_copied", [&](auto& b, const Layout& l) {
    const uint64_t at = l.header.l1_table_offset;
    format::StoreBE64(&b[at], format::LoadBE64(&b[at]) & ~format::kEntryCopied);
  });
  ExpectSameVerdict(l1, kQemuCorrupt);
  const std::string compressed = Damage("compressed_copied", [&](auto& b, const Layout& l) {
    SetL2Raw(b, l, 0, L2Raw(b, l, 0) | format::kEntryCopied);
  });
  ExpectSameVerdict(compressed, kQemuCorrupt);
}

TEST_F(DamagedImageTest, CopiedFlagOnSharedClusterIsCorruption) {
  // Guest cluster 3 points at guest cluster 1's host cluster: referenced twice, refcount 1.
  const std::string path =
      Damage("shared_normal", [&](auto& b, const Layout& l) { SetL2Raw(b, l, 3, L2Raw(b, l, 1)); });
  ExpectSameVerdict(path, kQemuCorrupt);
}

TEST_F(DamagedImageTest, ReservedBitsAreCorruption) {
  ExpectSameVerdict(Damage("l2_reserved",
                           [&](auto& b, const Layout& l) {
                             SetL2Raw(b, l, 1, L2Raw(b, l, 1) | (uint64_t{1} << 57));
                           }),
                    kQemuCorrupt);
  ExpectSameVerdict(Damage("l1_reserved",
                           [&](auto& b, const Layout& l) {
                             const uint64_t at = l.header.l1_table_offset;
                             format::StoreBE64(&b[at],
                                               format::LoadBE64(&b[at]) | (uint64_t{1} << 58));
                           }),
                    kQemuCorrupt);
}

TEST_F(DamagedImageTest, UnalignedDataOffsetIsCorruption) {
  ExpectSameVerdict(
      Damage("unaligned",
             [&](auto& b, const Layout& l) { SetL2Raw(b, l, 1, L2Raw(b, l, 1) + 512); }),
      kQemuCorrupt);
}

TEST_F(DamagedImageTest, BadRefcountBlockOffsetIsCorruption) {
  // QEMU counts one corruption and then cannot read the refcounts the block covers (check
  // errors, exit code 1); zqcow reports the corruption and skips those refcounts.
  const std::string unaligned = Damage("refblock_unaligned", [&](auto& b, const Layout& l) {
    format::StoreBE64(&b[l.header.refcount_table_offset], l.refcount_block + 512);
  });
  QemuCheck qemu = RunQemuCheck(unaligned);
  EXPECT_GT(JsonOr0(qemu.json, "corruptions"), 0u) << qemu.output;
  auto ours = CheckImage(unaligned);
  ASSERT_TRUE(ours.ok()) << ours.status().ToString();
  EXPECT_EQ(ours->corruptions, JsonOr0(qemu.json, "corruptions")) << Messages(*ours);
  ExpectSameVerdict(Damage("refblock_outside",
                           [&](auto& b, const Layout& l) {
                             format::StoreBE64(&b[l.header.refcount_table_offset],
                                               uint64_t{1} << 40);
                           }),
                    kQemuCorrupt);
}

TEST_F(DamagedImageTest, DirtyBitIsIncomplete) {
  const std::string path = Damage("dirty", [&](auto& b, const Layout&) {
    b[72 + 7] |= static_cast<uint8_t>(format::kIncompatDirty);
  });
  CheckResult r = ExpectSameVerdict(path, kQemuClean);
  EXPECT_TRUE(r.incomplete);
  auto info = ReadImageInfo(path);
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->dirty);
  auto clean = CheckImage(base_);
  ASSERT_TRUE(clean.ok());
  EXPECT_FALSE(clean->incomplete);
}

TEST_F(DamagedImageTest, CheckImageFileWorksOnAnOpenFile) {
  auto file = io::OpenFile(base_, io::FileOptions{});
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  auto r = CheckImageFile(file->get());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(Verdict(*r), kQemuClean);
  EXPECT_EQ(r->allocated_clusters, 4u);
  EXPECT_EQ(r->compressed_clusters, 2u);
}

// Random damage to the metadata (L1, L2 and refcount entries): the checker never crashes or
// reads out of bounds (ASan builds), and wherever qemu-img can finish its check (exit code
// 0, 2 or 3) the verdicts agree.
TEST_F(DamagedImageTest, RandomMetadataDamageAgreesWithQemu) {
  std::mt19937_64 rng(20261124);
  const uint64_t c = layout_.geometry.cluster_size();
  int compared = 0;
  for (int round = 0; round < 60; ++round) {
    const std::string path = Damage("random" + std::to_string(round), [&](auto& b,
                                                                          const Layout& l) {
      for (int k = 0; k < 1 + round % 3; ++k) {
        switch (rng() % 4) {
          case 0: {  // an L2 entry: flip a bit
            const uint64_t at = l.l2_offset + (rng() % 6) * 8;
            format::StoreBE64(&b[at], format::LoadBE64(&b[at]) ^ (uint64_t{1} << (rng() % 64)));
            break;
          }
          case 1: {  // an L2 entry: point somewhere in or near the file
            const uint64_t at = l.l2_offset + (rng() % 6) * 8;
            const uint64_t offset = rng() % (b.size() + 2 * c);
            format::StoreBE64(
                &b[at],
                rng() % 2 ? format::EncodeNormalL2Entry(format::HostOffset(offset & ~(c - 1)), true)
                          : format::EncodeCompressedL2Entry(format::HostOffset(offset),
                                                            1 + rng() % (c - 1), l.geometry));
            break;
          }
          case 2: {  // a refcount
            const uint64_t cluster = rng() % (b.size() / c + 2);
            format::SetRefcount(RefcountBlock(b, l), cluster, l.header.refcount_order, rng() % 3);
            break;
          }
          default: {  // the L1 entry: flip a bit
            const uint64_t at = l.header.l1_table_offset;
            format::StoreBE64(&b[at], format::LoadBE64(&b[at]) ^ (uint64_t{1} << (rng() % 64)));
            break;
          }
        }
      }
    });
    auto ours = CheckImage(path);
    ASSERT_TRUE(ours.ok()) << ours.status().ToString();
    compared += ExpectSameVerdictAsQemu(path, *ours, round);
  }
  EXPECT_GT(compared, 30);
}

// ---------------------------------------------------------------------------------------
// Internal snapshots: references from the snapshot table, every snapshot's L1 table, its L2
// tables and their data clusters count like the active state's, COPIED is checked on the
// active tables only.

// Reads the snapshot table of an image held in memory.
format::SnapshotTable ReadTable(const std::vector<uint8_t>& file, const format::Header& header) {
  auto table = format::ReadSnapshotTable(
      header, file.size(), [&](uint64_t offset, std::span<uint8_t> buffer) {
        std::copy_n(file.begin() + offset, buffer.size(), buffer.begin());
        return Status::OK();
      });
  EXPECT_TRUE(table.ok()) << table.status().ToString();
  return table.ok() ? *table : format::SnapshotTable{};
}

// Guest layout written around the snapshots (64 KiB clusters, "c" = compressed; QEMU
// writes compressed clusters only where nothing is allocated, hence the discard):
//   before s1:  0..256k 0x11, 1M c0x22, 2M..2M+256k c(varied)
//   before s2:  64k 0x33, 1M 0x44 (over the compressed one), 1M+64k c0x45
//   after s2:   128k 0x55, discard 2M, 2M c0x66, discard 192k, zero 3M, 4M 0x77
// so guest cluster 0 is shared by the active state, s1 and s2 (refcount 3), 64k's second
// version by the active state and s2, 128k's first by s1 and s2, 192k's by s1 and s2 only,
// the compressed 0x22 by s1 only.
const char* const kBeforeS1[] = {"write -P 0x11 0 256k", "write -c -P 0x22 1M 64k",
                                 "write -c -s SRC 2M 256k"};
const char* const kBeforeS2[] = {"write -P 0x33 64k 64k", "write -P 0x44 1M 64k",
                                 "write -c -P 0x45 1088k 64k"};
const char* const kAfterS2[] = {"write -P 0x55 128k 64k",  "discard 2M 64k",
                                "write -c -P 0x66 2M 64k", "discard 192k 64k",
                                "write -z 3M 64k",         "write -P 0x77 4M 64k"};

// Creates the image above with `create_options` (a failing qemu command fails the test).
void MakeSnapshotImage(const TempDir& dir, const std::string& image,
                       const std::string& create_options) {
  const std::string source = dir.File("varied.raw");
  WriteWholeFile(source, VariedData(256 << 10, 65536, 3));
  auto qemu_io = [&](const auto& commands) {
    std::string args;
    for (std::string cmd : commands) {
      const size_t at = cmd.find("SRC");
      if (at != std::string::npos) cmd.replace(at, 3, source);
      args += " -c " + ShellQuote(cmd);
    }
    return "qemu-io -f qcow2" + args + " " + ShellQuote(image);
  };
  for (const std::string& command :
       {"qemu-img create -q -f qcow2 -o " + create_options + " " + ShellQuote(image) + " 16M",
        qemu_io(kBeforeS1), "qemu-img snapshot -c s1 " + ShellQuote(image), qemu_io(kBeforeS2),
        "qemu-img snapshot -c s2 " + ShellQuote(image), qemu_io(kAfterS2)}) {
    RunOrFail(command);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

class SnapshotCleanTest : public ::testing::TestWithParam<std::string> {};

// The reference counting must include the snapshots: without them the clusters only the
// snapshots use would be leaks and the shared ones would have refcounts above their
// references.
TEST_P(SnapshotCleanTest, ChecksCleanWithQemuFigures) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  TempDir dir;
  const std::string image = dir.File("snap.qcow2");
  ASSERT_NO_FATAL_FAILURE(MakeSnapshotImage(dir, image, GetParam()));
  QemuCheck qemu = RunQemuCheck(image);
  ASSERT_EQ(qemu.exit_code, kQemuClean) << qemu.output;
  auto ours = CheckImage(image);
  ASSERT_TRUE(ours.ok()) << ours.status().ToString();
  EXPECT_EQ(ours->corruptions, 0u) << Messages(*ours);
  EXPECT_EQ(ours->leaks, 0u) << Messages(*ours);
  EXPECT_TRUE(ours->messages.empty()) << Messages(*ours);
  EXPECT_EQ(ours->allocated_clusters, JsonOr0(qemu.json, "allocated-clusters"));
  EXPECT_EQ(ours->compressed_clusters, JsonOr0(qemu.json, "compressed-clusters"));
  EXPECT_EQ(ours->image_end_offset, JsonOr0(qemu.json, "image-end-offset"));

  // The image is what the test means: two snapshots, guest cluster 0 shared three ways.
  const std::vector<uint8_t> file = ReadWholeFile(image);
  const Layout layout = ReadLayout(file);
  ASSERT_EQ(layout.header.nb_snapshots, 2u);
  const uint64_t cluster0 = L2Raw(file, layout, 0) & format::kEntryOffsetMask;
  std::vector<uint8_t> copy = file;
  EXPECT_EQ(format::GetRefcount(RefcountBlock(copy, layout), cluster0 >> layout.header.cluster_bits,
                                layout.header.refcount_order),
            3u);
}

INSTANTIATE_TEST_SUITE_P(Qemu, SnapshotCleanTest,
                         ::testing::Values("cluster_size=65536", "cluster_size=4096",
                                           "cluster_size=65536,compression_type=zstd",
                                           "cluster_size=65536,compat=0.10",
                                           "cluster_size=4096,refcount_bits=8"),
                         [](const auto& info) {
                           std::string name = info.param;
                           for (char& ch : name) {
                             if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

// Damaged copies of one snapshot image.
class SnapshotDamageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(::zqcow::testing::HaveQemu());
    base_ = dir_.File("base.qcow2");
    ASSERT_NO_FATAL_FAILURE(MakeSnapshotImage(dir_, base_, "cluster_size=65536"));
    bytes_ = ReadWholeFile(base_);
    layout_ = ReadLayout(bytes_);
    table_ = ReadTable(bytes_, layout_.header);
    ASSERT_EQ(table_.snapshots.size(), 2u);
    ExpectSameVerdict(base_, kQemuClean);
  }

  std::string Damage(const std::string& name,
                     const std::function<void(std::vector<uint8_t>&)>& patch) {
    std::vector<uint8_t> copy = bytes_;
    patch(copy);
    const std::string path = dir_.File(name + ".qcow2");
    WriteWholeFile(path, copy);
    return path;
  }

  uint64_t ClusterOf(uint64_t offset) const { return offset >> layout_.header.cluster_bits; }
  uint64_t Refcount(uint64_t cluster) const {
    std::vector<uint8_t> copy = bytes_;
    return format::GetRefcount(RefcountBlock(copy, layout_), cluster,
                               layout_.header.refcount_order);
  }
  void SetRefcount(std::vector<uint8_t>& b, uint64_t cluster, uint64_t value) const {
    format::SetRefcount(RefcountBlock(b, layout_), cluster, layout_.header.refcount_order, value);
  }
  // Snapshot `index`'s first L1 entry and the L2 table it points to.
  uint64_t SnapshotL1At(size_t index) const { return table_.snapshots[index].l1_table_offset; }
  uint64_t SnapshotL2(size_t index) const {
    return format::LoadBE64(&bytes_[SnapshotL1At(index)]) & format::kEntryOffsetMask;
  }
  // Replaces the snapshot table in place (it must still fit in its cluster) and sets
  // nb_snapshots to match.
  void WriteTable(std::vector<uint8_t>& b, const std::vector<format::Snapshot>& snapshots) const {
    auto table = format::SerializeSnapshotTable(snapshots);
    ASSERT_TRUE(table.ok());
    const uint64_t at = layout_.header.snapshots_offset;
    ASSERT_LE(table->size(), layout_.geometry.cluster_size());
    if (b.size() < at + table->size()) b.resize(at + table->size());
    std::fill(b.begin() + at, b.begin() + at + table_.byte_length, 0);
    std::copy(table->begin(), table->end(), b.begin() + at);
    format::StoreBE32(&b[60], static_cast<uint32_t>(snapshots.size()));
  }

  TempDir dir_;
  std::string base_;
  std::vector<uint8_t> bytes_;
  Layout layout_;
  format::SnapshotTable table_;
};

TEST_F(SnapshotDamageTest, SharedClusterRefcountDecreasedIsCorruption) {
  const uint64_t cluster = ClusterOf(L2Raw(bytes_, layout_, 0) & format::kEntryOffsetMask);
  ASSERT_EQ(Refcount(cluster), 3u);
  const std::string path = Damage("shared", [&](auto& b) { SetRefcount(b, cluster, 2); });
  CheckResult r = ExpectSameVerdict(path, kQemuCorrupt);
  EXPECT_NE(
      Messages(r).find("ERROR cluster " + std::to_string(cluster) + " refcount=2 reference=3"),
      std::string::npos)
      << Messages(r);
}

TEST_F(SnapshotDamageTest, SnapshotOnlyClusterRefcountDroppedIsCorruption) {
  // s1's L2 table is its own (the active state copied its L2 table on the first write).
  const uint64_t l2 = ClusterOf(SnapshotL2(0));
  ASSERT_NE(SnapshotL2(0), layout_.l2_offset);
  ASSERT_EQ(Refcount(l2), 1u);
  const std::string path = Damage("s1_l2", [&](auto& b) { SetRefcount(b, l2, 0); });
  CheckResult r = ExpectSameVerdict(path, kQemuCorrupt);
  EXPECT_EQ(r.leaks, 0u) << Messages(r);
}

TEST_F(SnapshotDamageTest, ExtraRefcountOnSnapshotClusterIsLeak) {
  const uint64_t l1 = ClusterOf(SnapshotL1At(1));
  const std::string path = Damage("s2_l1", [&](auto& b) { SetRefcount(b, l1, 2); });
  CheckResult r = ExpectSameVerdict(path, kQemuLeaks);
  EXPECT_EQ(r.leaks, 1u) << Messages(r);
  EXPECT_EQ(r.corruptions, 0u) << Messages(r);
}

TEST_F(SnapshotDamageTest, ForgottenSnapshotLeaksItsClusters) {
  // nb_snapshots 2 -> 1: s2's references are gone but its refcounts stay: leaks only.
  const std::string path = Damage("forgotten", [&](auto& b) { format::StoreBE32(&b[60], 1); });
  CheckResult r = ExpectSameVerdict(path, kQemuLeaks);
  EXPECT_GT(r.leaks, 1u);
  EXPECT_EQ(r.corruptions, 0u) << Messages(r);
}

TEST_F(SnapshotDamageTest, CopiedFlagIsCheckedOnActiveTablesOnly) {
  // Guest cluster 0 has refcount 3: an active entry with COPIED is corruption.
  const std::string active = Damage("active_copied", [&](auto& b) {
    SetL2Raw(b, layout_, 0, L2Raw(b, layout_, 0) | format::kEntryCopied);
  });
  CheckResult r = ExpectSameVerdict(active, kQemuCorrupt);
  EXPECT_NE(Messages(r).find("OFLAG_COPIED data cluster"), std::string::npos) << Messages(r);
  // Guest cluster 4M (written after s2) has refcount 1: COPIED must be set.
  const uint64_t index = (4 << 20) >> layout_.header.cluster_bits;
  ASSERT_NE(L2Raw(bytes_, layout_, index) & format::kEntryCopied, 0u);
  ExpectSameVerdict(Damage("active_not_copied",
                           [&](auto& b) {
                             SetL2Raw(b, layout_, index,
                                      L2Raw(b, layout_, index) & ~format::kEntryCopied);
                           }),
                    kQemuCorrupt);
  // The active L1 entry: its L2 table has refcount 1 (COPIED set); clearing it is corruption.
  ExpectSameVerdict(Damage("active_l1",
                           [&](auto& b) {
                             const uint64_t at = layout_.header.l1_table_offset;
                             format::StoreBE64(&b[at],
                                               format::LoadBE64(&b[at]) & ~format::kEntryCopied);
                           }),
                    kQemuCorrupt);
  // The same flags in a snapshot's tables are not looked at, by QEMU or by zqcow.
  ExpectSameVerdict(Damage("snapshot_flags",
                           [&](auto& b) {
                             const uint64_t l1 = SnapshotL1At(0);
                             format::StoreBE64(&b[l1],
                                               format::LoadBE64(&b[l1]) ^ format::kEntryCopied);
                             const uint64_t l2 = SnapshotL2(0);
                             for (uint64_t j = 0; j < 4; ++j) {
                               const uint64_t raw = format::LoadBE64(&b[l2 + j * 8]);
                               format::StoreBE64(&b[l2 + j * 8], raw ^ format::kEntryCopied);
                             }
                           }),
                    kQemuClean);
}

TEST_F(SnapshotDamageTest, BadSnapshotL1TableIsCorruption) {
  std::vector<format::Snapshot> unaligned = table_.snapshots;
  unaligned[0].l1_table_offset += 512;
  CheckResult r = ExpectSameVerdict(
      Damage("l1_unaligned", [&](auto& b) { WriteTable(b, unaligned); }), kQemuCorrupt);
  EXPECT_NE(Messages(r).find("snapshot 0 (id \"1\", name \"s1\"): l1_table_offset"),
            std::string::npos)
      << Messages(r);
  std::vector<format::Snapshot> too_large = table_.snapshots;
  too_large[1].l1_size = (32u << 20) / 8 + 1;
  r = ExpectSameVerdict(Damage("l1_too_large", [&](auto& b) { WriteTable(b, too_large); }),
                        kQemuCorrupt);
  EXPECT_NE(Messages(r).find("l1_size"), std::string::npos) << Messages(r);
  std::vector<format::Snapshot> past_eof = table_.snapshots;
  past_eof[1].l1_table_offset = uint64_t{1} << 40;
  ExpectSameVerdict(Damage("l1_past_eof", [&](auto& b) { WriteTable(b, past_eof); }), kQemuCorrupt);
}

TEST_F(SnapshotDamageTest, IncompleteVersion3EntryIsCorruption) {
  // A version 3 entry must hold disk_size (16 bytes of extra data); QEMU reports it.
  std::vector<format::Snapshot> old_style = table_.snapshots;
  old_style[1].disk_size.reset();
  old_style[1].icount.reset();
  CheckResult r = ExpectSameVerdict(
      Damage("incomplete", [&](auto& b) { WriteTable(b, old_style); }), kQemuCorrupt);
  EXPECT_EQ(r.corruptions, 1u) << Messages(r);
  EXPECT_NE(Messages(r).find("snapshot table entry 1 is incomplete"), std::string::npos)
      << Messages(r);
}

TEST_F(SnapshotDamageTest, UnreadableSnapshotTableIsCorruptionAndTheRestIsChecked) {
  // extra_data_size above 1024: QEMU cannot open the image (exit 1); zqcow reports the
  // table, leaves the snapshots out, and still checks the active state.
  const std::string path = Damage("extra_data", [&](auto& b) {
    format::StoreBE32(&b[layout_.header.snapshots_offset + 36], 5000);
  });
  EXPECT_EQ(RunQemuCheck(path).exit_code, 1);
  auto r = CheckImage(path);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->corruptions, 1u) << Messages(*r);
  EXPECT_NE(Messages(*r).find("qcow2 snapshot table: snapshot 0: extra_data_size 5000"),
            std::string::npos)
      << Messages(*r);
  EXPECT_GT(r->leaks, 0u);  // what only the snapshots reference
  EXPECT_EQ(r->allocated_clusters, JsonOr0(RunQemuCheck(base_).json, "allocated-clusters"));

  // The same with damage to the active state as well: that is still found.
  const uint64_t cluster = ClusterOf(L2Raw(bytes_, layout_, 0) & format::kEntryOffsetMask);
  const std::string both = Damage("both", [&](auto& b) {
    format::StoreBE32(&b[layout_.header.snapshots_offset + 36], 5000);
    SetRefcount(b, cluster, 0);
  });
  auto r2 = CheckImage(both);
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  EXPECT_NE(Messages(*r2).find("ERROR cluster " + std::to_string(cluster) + " refcount=0"),
            std::string::npos)
      << Messages(*r2);
}

// Random damage to the snapshots' tables, refcounts and the snapshot table: the checker never
// crashes or reads out of bounds (ASan builds); where the snapshot table stays readable and
// qemu-img can finish its check, the verdicts agree.
TEST_F(SnapshotDamageTest, RandomSnapshotDamageAgreesWithQemu) {
  std::mt19937_64 rng(20261125);
  const uint64_t c = layout_.geometry.cluster_size();
  int compared = 0;
  for (int round = 0; round < 60; ++round) {
    bool table_damaged = false;
    const std::string path = Damage("random" + std::to_string(round), [&](auto& b) {
      for (int k = 0; k < 1 + round % 3; ++k) {
        const size_t snapshot = rng() % 2;
        switch (rng() % 5) {
          case 0: {  // a snapshot L2 entry: flip a bit
            const uint64_t at = SnapshotL2(snapshot) + (rng() % 8) * 8;
            format::StoreBE64(&b[at], format::LoadBE64(&b[at]) ^ (uint64_t{1} << (rng() % 64)));
            break;
          }
          case 1: {  // a snapshot L2 entry: point somewhere in or near the file
            const uint64_t at = SnapshotL2(snapshot) + (rng() % 8) * 8;
            const uint64_t offset = rng() % (b.size() + 2 * c);
            format::StoreBE64(&b[at], rng() % 2 ? format::EncodeNormalL2Entry(
                                                      format::HostOffset(offset & ~(c - 1)), false)
                                                : format::EncodeCompressedL2Entry(
                                                      format::HostOffset(offset),
                                                      1 + rng() % (c - 1), layout_.geometry));
            break;
          }
          case 2: {  // a refcount
            const uint64_t cluster = rng() % (b.size() / c + 2);
            SetRefcount(b, cluster, rng() % 4);
            break;
          }
          case 3: {  // a snapshot's L1 entry: flip a bit
            const uint64_t at = SnapshotL1At(snapshot);
            format::StoreBE64(&b[at], format::LoadBE64(&b[at]) ^ (uint64_t{1} << (rng() % 64)));
            break;
          }
          default: {  // a byte of the snapshot table
            const uint64_t at = layout_.header.snapshots_offset + rng() % table_.byte_length;
            b[at] ^= static_cast<uint8_t>(1u << (rng() % 8));
            table_damaged = true;
            break;
          }
        }
      }
    });
    auto ours = CheckImage(path);
    ASSERT_TRUE(ours.ok()) << ours.status().ToString();
    if (table_damaged) continue;  // QEMU reads such tables differently (see check.cc)
    compared += ExpectSameVerdictAsQemu(path, *ours, round);
  }
  EXPECT_GT(compared, 25);
}

// ---------------------------------------------------------------------------------------
// Errors and ImageInfo.

TEST(CheckTest, UnreadableImagesGiveClearErrors) {
  TempDir dir;
  auto missing = CheckImage(dir.File("missing.qcow2"));
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), Status::Code::kNotFound);
  const std::string garbage = dir.File("garbage.qcow2");
  WriteWholeFile(garbage, std::vector<uint8_t>(4096, 0x42));
  auto bad = CheckImage(garbage);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Status::Code::kCorruption);
  EXPECT_NE(bad.status().message().find(garbage), std::string::npos);
  EXPECT_NE(bad.status().message().find("magic"), std::string::npos);
  auto info = ReadImageInfo(garbage);
  ASSERT_FALSE(info.ok());
  EXPECT_NE(info.status().message().find(garbage), std::string::npos);
  const std::string empty = dir.File("empty.qcow2");
  WriteWholeFile(empty, {});
  EXPECT_EQ(CheckImage(empty).status().code(), Status::Code::kCorruption);
}

TEST(CheckTest, ReadImageInfoMatchesQemuImgInfo) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  TempDir dir;
  const std::string image = dir.File("info.qcow2");
  RunOrFail(
      "qemu-img create -q -f qcow2 -o cluster_size=4096,compression_type=zstd,refcount_bits=32 " +
      ShellQuote(image) + " 12345344");
  auto info = ReadImageInfo(image);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(info->path, image);
  EXPECT_EQ(info->version, 3u);
  EXPECT_EQ(info->virtual_size, 12345344u);  // a multiple of 512, not of the cluster size
  EXPECT_EQ(info->cluster_size, 4096u);
  EXPECT_EQ(info->refcount_bits, 32u);
  EXPECT_EQ(info->compression, Compression::kZstd);
  EXPECT_EQ(info->file_size, ReadWholeFile(image).size());
  EXPECT_FALSE(info->dirty);
  EXPECT_FALSE(info->corrupt);
  EXPECT_TRUE(info->backing_file.empty());

  const std::string v2 = dir.File("v2.qcow2");
  RunOrFail("qemu-img create -q -f qcow2 -o compat=0.10 -b " + ShellQuote(image) + " -F qcow2 " +
            ShellQuote(v2));
  auto info2 = ReadImageInfo(v2);
  ASSERT_TRUE(info2.ok()) << info2.status().ToString();
  EXPECT_EQ(info2->version, 2u);
  EXPECT_EQ(info2->refcount_bits, 16u);
  EXPECT_EQ(info2->compression, Compression::kZlib);
  EXPECT_EQ(info2->backing_file, image);
}

}  // namespace
}  // namespace zqcow::qcow2
