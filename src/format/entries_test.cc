// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/entries.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <zlib.h>

#include <algorithm>
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

TEST(L1EntryTest, RoundTripsAndRejectsBadEntries) {
  for (uint32_t bits = kMinClusterBits; bits <= kMaxClusterBits; ++bits) {
    Geometry g{bits};
    const uint64_t offset = 5 * g.cluster_size();
    for (bool copied : {false, true}) {
      const uint64_t raw = EncodeL1Entry({HostOffset(offset), copied});
      EXPECT_EQ(raw, offset | (copied ? kEntryCopied : 0));
      auto e = DecodeL1Entry(raw, g);
      ASSERT_TRUE(e.ok()) << e.status().ToString();
      EXPECT_EQ(e->l2_offset.value(), offset);
      EXPECT_EQ(e->copied, copied);
    }
    auto empty = DecodeL1Entry(0, g);
    ASSERT_TRUE(empty.ok());
    EXPECT_EQ(empty->l2_offset.value(), 0u);
    for (uint64_t bit : {0, 1, 8, 56, 60, 62}) {
      EXPECT_TRUE(DecodeL1Entry(offset | (uint64_t{1} << bit), g).status().IsCorruption())
          << bits << " " << bit;
    }
    if (bits > 9) {
      auto unaligned = DecodeL1Entry(offset + 512, g);
      EXPECT_TRUE(unaligned.status().IsCorruption()) << bits;
      EXPECT_NE(unaligned.status().message().find("aligned"), std::string::npos);
    }
  }
}

TEST(L2EntryTest, StandardEntriesRoundTrip) {
  for (uint32_t bits = kMinClusterBits; bits <= kMaxClusterBits; ++bits) {
    Geometry g{bits};
    const uint64_t offset = (uint64_t{1} << 40) + 7 * g.cluster_size();
    for (bool copied : {false, true}) {
      const uint64_t raw = EncodeNormalL2Entry(HostOffset(offset), copied);
      EXPECT_EQ(raw, offset | (copied ? kEntryCopied : 0));
      auto e = DecodeL2Entry(raw, g);
      ASSERT_TRUE(e.ok()) << e.status().ToString();
      EXPECT_EQ(e->kind, L2Entry::Kind::kNormal);
      EXPECT_EQ(e->host_offset.value(), offset);
      EXPECT_EQ(e->copied, copied);
    }
    auto unallocated = DecodeL2Entry(EncodeUnallocatedL2Entry(), g);
    ASSERT_TRUE(unallocated.ok());
    EXPECT_EQ(unallocated->kind, L2Entry::Kind::kUnallocated);
    auto zero = DecodeL2Entry(EncodeZeroL2Entry(), g);
    ASSERT_TRUE(zero.ok());
    EXPECT_EQ(zero->kind, L2Entry::Kind::kZero);
    EXPECT_EQ(zero->host_offset.value(), 0u);
    auto prealloc = DecodeL2Entry(offset | kEntryZero | kEntryCopied, g);
    ASSERT_TRUE(prealloc.ok());
    EXPECT_EQ(prealloc->kind, L2Entry::Kind::kZero);
    EXPECT_EQ(prealloc->host_offset.value(), offset);
    EXPECT_TRUE(prealloc->copied);
    for (uint64_t bit : {1, 8, 56, 61}) {
      EXPECT_TRUE(DecodeL2Entry(offset | (uint64_t{1} << bit), g).status().IsCorruption())
          << bits << " " << bit;
    }
    if (bits > 9) {
      EXPECT_TRUE(DecodeL2Entry(offset + 512, g).status().IsCorruption());
      EXPECT_TRUE(DecodeL2Entry((offset + 512) | kEntryZero, g).status().IsCorruption());
    }
  }
}

// Offsets and lengths around sector and cluster boundaries, for every cluster size.
TEST(L2EntryTest, CompressedDescriptorsRoundTrip) {
  for (uint32_t bits = kMinClusterBits; bits <= kMaxClusterBits; ++bits) {
    Geometry g{bits};
    const uint64_t c = g.cluster_size();
    const uint64_t base = 3 * c;
    const std::vector<uint64_t> offsets = {base,           base + 1,         base + 511,
                                           base + 512,     base + c - 1,     base + c - 512,
                                           base + c - 513, base + c / 2 + 17};
    const std::vector<uint64_t> lengths = {1, 2, 511, 512, 513, 1000, c / 2, c - 1};
    for (uint64_t off : offsets) {
      for (uint64_t len : lengths) {
        if (len >= c) continue;
        const uint64_t raw = EncodeCompressedL2Entry(HostOffset(off), len, g);
        EXPECT_EQ(raw & kEntryCopied, 0u);
        auto e = DecodeL2Entry(raw, g);
        ASSERT_TRUE(e.ok()) << e.status().ToString();
        ASSERT_EQ(e->kind, L2Entry::Kind::kCompressed);
        EXPECT_EQ(e->host_offset.value(), off);
        EXPECT_FALSE(e->copied);
        // The span ends at the end of the sector holding the last byte.
        const uint64_t last_byte = off + len - 1;
        EXPECT_EQ(off + e->compressed_span, (last_byte / 512 + 1) * 512)
            << "bits=" << bits << " off=" << off << " len=" << len;
        EXPECT_GE(e->compressed_span, len);
        EXPECT_LT(e->compressed_span - len, 512u);
        HostClusterRange range = CompressedHostClusters(*e, g);
        EXPECT_EQ(range.first.value(), off >> bits);
        EXPECT_EQ(range.last.value(), last_byte >> bits);
        // Field layout as the spec describes it.
        const uint32_t x = 62 - (bits - 8);
        EXPECT_EQ(raw & ((uint64_t{1} << x) - 1), off);
        EXPECT_EQ((raw >> x) & ((uint64_t{1} << (bits - 8)) - 1), last_byte / 512 - off / 512);
      }
    }
    // The largest offset the field can hold.
    const uint32_t x = 62 - (bits - 8);
    const uint64_t max_offset = (uint64_t{1} << x) - 1;
    auto e = DecodeL2Entry(EncodeCompressedL2Entry(HostOffset(max_offset - 100), 50, g), g);
    ASSERT_TRUE(e.ok());
    EXPECT_EQ(e->host_offset.value(), max_offset - 100);
    // Largest sector count: a cluster-1 byte stream starting at the last byte of a sector
    // touches c/512 + 1 sectors.
    auto widest = DecodeL2Entry(EncodeCompressedL2Entry(HostOffset(base + 511), c - 1, g), g);
    ASSERT_TRUE(widest.ok());
    EXPECT_EQ(widest->compressed_span, c + 1);
    // The COPIED bit on a compressed entry is reported, not hidden.
    auto copied = DecodeL2Entry(EncodeCompressedL2Entry(HostOffset(base), 10, g) | kEntryCopied, g);
    ASSERT_TRUE(copied.ok());
    EXPECT_TRUE(copied->copied);
  }
}

// ---------------------------------------------------------------------------------------
// Cross-check against images written by QEMU. The compressed streams are inflated with the
// system zlib, loaded at run time (this test links only the format module), which tells the
// exact compressed length QEMU wrote; encoding (offset, length) must then give QEMU's entry.

class Inflater {
 public:
  Inflater() {
    lib_ = dlopen("libz.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib_ == nullptr) return;
    init_ = reinterpret_cast<decltype(init_)>(dlsym(lib_, "inflateInit2_"));
    inflate_ = reinterpret_cast<decltype(inflate_)>(dlsym(lib_, "inflate"));
    end_ = reinterpret_cast<decltype(end_)>(dlsym(lib_, "inflateEnd"));
  }
  ~Inflater() {
    if (lib_ != nullptr) dlclose(lib_);
  }
  bool ok() const { return init_ && inflate_ && end_; }

  // Inflates raw deflate data (4 KiB window, as QEMU) into `out`; returns the number of
  // input bytes consumed up to the end of the stream, or -1 if it did not end cleanly.
  int64_t Inflate(const uint8_t* in, size_t in_len, std::vector<uint8_t>* out) {
    z_stream s{};
    if (init_(&s, -12, ZLIB_VERSION, static_cast<int>(sizeof(s))) != Z_OK) return -1;
    s.next_in = const_cast<uint8_t*>(in);
    s.avail_in = static_cast<uInt>(in_len);
    s.next_out = out->data();
    s.avail_out = static_cast<uInt>(out->size());
    const int rc = inflate_(&s, Z_FINISH);
    const int64_t consumed = static_cast<int64_t>(in_len - s.avail_in);
    const bool full = s.avail_out == 0;
    end_(&s);
    return rc == Z_STREAM_END && full ? consumed : -1;
  }

 private:
  void* lib_ = nullptr;
  int (*init_)(z_streamp, int, const char*, int) = nullptr;
  int (*inflate_)(z_streamp, int) = nullptr;
  int (*end_)(z_streamp) = nullptr;
};

// Source data for guest cluster i: a random prefix of a varying share of the cluster, the
// rest a repeated byte, so compressed lengths vary from a few bytes to the whole cluster.
std::vector<uint8_t> SourceData(uint64_t clusters, uint64_t cluster_size) {
  std::vector<uint8_t> data(clusters * cluster_size, 0x5a);
  for (uint64_t i = 0; i < clusters; ++i) {
    const uint64_t random_bytes = cluster_size * (i % 5) / 4;  // 0, 1/4, 1/2, 3/4, all
    auto random =
        ::zqcow::testing::MakeData(::zqcow::testing::DataKind::kRandom, random_bytes, i + 1);
    std::copy(random.begin(), random.end(), data.begin() + i * cluster_size);
  }
  return data;
}

class QemuL2Test : public ::testing::TestWithParam<uint32_t> {};

TEST_P(QemuL2Test, DecodesWhatQemuIoWrites) {
  ASSERT_TRUE(::zqcow::testing::HaveQemu());
  Inflater inflater;
  ASSERT_TRUE(inflater.ok()) << "libz.so.1 not loadable";
  const uint32_t bits = GetParam();
  const Geometry g{bits};
  const uint64_t c = g.cluster_size();
  const uint64_t n = bits <= 12 ? 40 : bits <= 16 ? 15 : 5;  // clusters from the source file
  const uint64_t pattern_cluster = n, zero_cluster = n + 1, unallocated_cluster = n + 2;
  const uint64_t virtual_size = (n + 3) * c;
  ASSERT_LE(n + 3, g.l2_entries());  // one L2 table maps them all

  TempDir dir;
  const std::string image = dir.File("img.qcow2");
  const std::vector<uint8_t> data = SourceData(n, c);
  auto r = RunCommand("qemu-img create -q -f qcow2 -o cluster_size=" + std::to_string(c) + " " +
                      ShellQuote(image) + " " + std::to_string(virtual_size));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // One write per cluster, so QEMU allocates in guest order (a multi-cluster write
  // compresses in parallel and allocates in any order).
  std::string commands;
  for (uint64_t i = 0; i < n; ++i) {
    const std::string source = dir.File("source" + std::to_string(i));
    ::zqcow::testing::WriteWholeFile(
        source, std::vector<uint8_t>(data.begin() + i * c, data.begin() + (i + 1) * c));
    commands += " -c " + ShellQuote("write -q -c -s " + source + " " + std::to_string(i * c) + " " +
                                    std::to_string(c));
  }
  commands += " -c " + ShellQuote("write -q -c -P 0x5a " + std::to_string(pattern_cluster * c) +
                                  " " + std::to_string(c));
  commands += " -c " + ShellQuote("write -q -z " + std::to_string(zero_cluster * c) + " " +
                                  std::to_string(c));
  r = RunCommand("qemu-io -f qcow2" + commands + " " + ShellQuote(image));
  ASSERT_EQ(r.exit_code, 0) << r.output;

  const std::vector<uint8_t> file = ReadWholeFile(image);
  auto header = ParseHeader(file, file.size());
  ASSERT_TRUE(header.ok()) << header.status().ToString();
  ASSERT_EQ(header->cluster_bits, bits);
  auto l1 = DecodeL1Entry(LoadBE64(file.data() + header->l1_table_offset), g);
  ASSERT_TRUE(l1.ok()) << l1.status().ToString();
  ASSERT_NE(l1->l2_offset.value(), 0u);
  ASSERT_LE(l1->l2_offset.value() + c, file.size());
  auto l2_raw = [&](uint64_t i) { return LoadBE64(file.data() + l1->l2_offset.value() + i * 8); };

  int compressed = 0, crossing_sector = 0, crossing_cluster = 0;
  std::vector<uint8_t> cluster(c);
  for (uint64_t i = 0; i <= pattern_cluster; ++i) {
    SCOPED_TRACE("guest cluster " + std::to_string(i) + " of cluster_bits " + std::to_string(bits));
    const uint64_t raw = l2_raw(i);
    auto e = DecodeL2Entry(raw, g);
    ASSERT_TRUE(e.ok()) << e.status().ToString();
    const uint8_t* expected = i < n ? data.data() + i * c : nullptr;
    std::vector<uint8_t> pattern;
    if (expected == nullptr) {
      pattern.assign(c, 0x5a);
      expected = pattern.data();
    }
    if (e->kind == L2Entry::Kind::kNormal) {
      // QEMU stores clusters that do not compress as normal clusters.
      EXPECT_EQ(i % 5, 4u) << "a compressible cluster was stored uncompressed";
      ASSERT_LE(e->host_offset.value() + c, file.size());
      EXPECT_TRUE(std::equal(expected, expected + c, file.begin() + e->host_offset.value()));
      continue;
    }
    ASSERT_EQ(e->kind, L2Entry::Kind::kCompressed);
    ++compressed;
    const uint64_t off = e->host_offset.value();
    ASSERT_LT(off, file.size());
    const uint64_t available = std::min<uint64_t>(e->compressed_span, file.size() - off);
    const int64_t length = inflater.Inflate(file.data() + off, available, &cluster);
    ASSERT_GT(length, 0) << "stream at " << off << " does not inflate";
    EXPECT_TRUE(std::equal(cluster.begin(), cluster.end(), expected));
    // QEMU's sector count is derived from the exact length, and so is ours.
    EXPECT_EQ(EncodeCompressedL2Entry(HostOffset(off), static_cast<uint64_t>(length), g), raw);
    EXPECT_EQ((off + static_cast<uint64_t>(length) - 1) / 512,
              (off + e->compressed_span - 1) / 512);
    if (off / 512 != (off + e->compressed_span - 1) / 512) ++crossing_sector;
    HostClusterRange range = CompressedHostClusters(*e, g);
    EXPECT_EQ(range.first.value(), off >> bits);
    EXPECT_EQ(range.last.value(), (off + static_cast<uint64_t>(length) - 1) >> bits);
    if (range.first != range.last) ++crossing_cluster;
  }
  auto zero = DecodeL2Entry(l2_raw(zero_cluster), g);
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(zero->kind, L2Entry::Kind::kZero);
  auto unallocated = DecodeL2Entry(l2_raw(unallocated_cluster), g);
  ASSERT_TRUE(unallocated.ok());
  EXPECT_EQ(unallocated->kind, L2Entry::Kind::kUnallocated);
  // The data covers the boundary cases this test is about.
  EXPECT_GE(compressed, static_cast<int>(n * 4 / 5));
  EXPECT_GT(crossing_sector, 0);
  EXPECT_GT(crossing_cluster, 0);

  // qemu-img map agrees: it reports a host offset for normal clusters only (7.2 omits it for
  // compressed ones), and no data for zero and unallocated clusters.
  auto map = RunCommand("qemu-img map --output=json " + ShellQuote(image) + " 2>/dev/null");
  ASSERT_EQ(map.exit_code, 0) << map.output;
  uint64_t mapped = 0;
  for (const auto& extent : nlohmann::json::parse(map.output)) {
    const uint64_t start = extent["start"].get<uint64_t>();
    const uint64_t length = extent["length"].get<uint64_t>();
    for (uint64_t i = start / c; i < (start + length) / c; ++i, ++mapped) {
      auto e = DecodeL2Entry(l2_raw(i), g);
      ASSERT_TRUE(e.ok());
      if (!extent["data"].get<bool>()) {
        EXPECT_TRUE(e->kind == L2Entry::Kind::kZero || e->kind == L2Entry::Kind::kUnallocated) << i;
      } else if (extent.contains("offset")) {
        ASSERT_EQ(e->kind, L2Entry::Kind::kNormal) << i;
        EXPECT_EQ(e->host_offset.value(), extent["offset"].get<uint64_t>() + i * c - start) << i;
      } else {
        EXPECT_EQ(e->kind, L2Entry::Kind::kCompressed) << i;
      }
    }
  }
  EXPECT_EQ(mapped, n + 3);
}

TEST(ExtendedL2EntryTest, SubclusterRunsFollowTheBitmap) {
  const Geometry g{16, /*extended_l2=*/true};
  EXPECT_EQ(g.l2_entries(), 4096u);
  EXPECT_EQ(g.l2_bits(), 12u);
  const uint64_t host = 0x50000;
  // Subclusters 0-1 allocated, 2 zero, 3-31 unallocated (read the backing file).
  const uint64_t bitmap = 0x3ull | (0x4ull << 32);
  auto e = DecodeExtendedL2Entry(EncodeNormalL2Entry(HostOffset(host), true), bitmap, g);
  ASSERT_TRUE(e.ok()) << e.status().message();
  EXPECT_EQ(e->kind, L2Entry::Kind::kNormal);
  SubclusterRun run = SubclustersAt(*e, bitmap, 0);
  EXPECT_EQ(run.kind, L2Entry::Kind::kNormal);
  EXPECT_EQ(run.count, 2u);
  run = SubclustersAt(*e, bitmap, 1);
  EXPECT_EQ(run.count, 1u);
  run = SubclustersAt(*e, bitmap, 2);
  EXPECT_EQ(run.kind, L2Entry::Kind::kZero);
  EXPECT_EQ(run.count, 1u);
  run = SubclustersAt(*e, bitmap, 3);
  EXPECT_EQ(run.kind, L2Entry::Kind::kUnallocated);
  EXPECT_EQ(run.count, 29u);
  // No host cluster: zero subclusters are fine, allocated ones are not.
  auto plain = DecodeExtendedL2Entry(0, 0xffffffffull << 32, g);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(SubclustersAt(*plain, 0xffffffffull << 32, 0).kind, L2Entry::Kind::kZero);
  EXPECT_EQ(SubclustersAt(*plain, 0xffffffffull << 32, 0).count, 32u);
  EXPECT_EQ(DecodeExtendedL2Entry(0, 1, g).status().code(), Status::Code::kCorruption);
  // A subcluster both allocated and zero; the reserved zero flag.
  EXPECT_EQ(DecodeExtendedL2Entry(EncodeNormalL2Entry(HostOffset(host), true), 0x100000001ull, g)
                .status()
                .code(),
            Status::Code::kCorruption);
  EXPECT_EQ(DecodeExtendedL2Entry(EncodeZeroL2Entry(), 0, g).status().code(),
            Status::Code::kCorruption);
  // Compressed: the whole cluster, whatever the bitmap.
  const uint64_t compressed = EncodeCompressedL2Entry(HostOffset(0x60200), 1000, g);
  auto c = DecodeExtendedL2Entry(compressed, 0, g);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(SubclustersAt(*c, 0, 5).kind, L2Entry::Kind::kCompressed);
  EXPECT_EQ(SubclustersAt(*c, 0, 5).count, 27u);
}

INSTANTIATE_TEST_SUITE_P(ClusterBits, QemuL2Test,
                         ::testing::Range<uint32_t>(kMinClusterBits, kMaxClusterBits + 1));

}  // namespace
}  // namespace zqcow::format
