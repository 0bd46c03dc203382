// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Hostile images: a valid small image made by qemu-img/qemu-io, patched bytewise (big-endian)
// in one header field or table entry at a time. Image::Open, reading all data, Map and
// CheckImage must give a clear error (the right code, a message naming the file and the
// field) or correct data, never a crash, garbage, or an unbounded allocation. Allocations
// are bounded for the whole binary by the operator new replacement below (any single
// allocation above kMaxSingleAllocation aborts the test). Run it under ASan too.

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <new>
#include <ostream>
#include <string>
#include <vector>

#include "format/endian.h"
#include "testing/test_util.h"
#include "zqcow/image.h"

// ---- Bounded allocation ---------------------------------------------------------------
// A hostile header must never make zqcow allocate in proportion to a field's value. Nothing
// legitimate in this test needs more than this in one piece (the base image is 1 MiB).
namespace {
constexpr size_t kMaxSingleAllocation = 64u << 20;

void* CheckedAlloc(size_t size, size_t alignment) {
  if (size > kMaxSingleAllocation) {
    std::fprintf(stderr, "hostile_image_test: unbounded allocation of %zu bytes\n", size);
    std::abort();
  }
  if (size == 0) size = 1;
  void* p = alignment <= alignof(std::max_align_t)
                ? std::malloc(size)
                : std::aligned_alloc(alignment, (size + alignment - 1) / alignment * alignment);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(size_t size) { return CheckedAlloc(size, 0); }
void* operator new[](size_t size) { return CheckedAlloc(size, 0); }
void* operator new(size_t size, std::align_val_t al) {
  return CheckedAlloc(size, static_cast<size_t>(al));
}
void* operator new[](size_t size, std::align_val_t al) {
  return CheckedAlloc(size, static_cast<size_t>(al));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { std::free(p); }

namespace zqcow {
namespace {

using testing::ReadWholeFile;
using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;
using testing::WriteWholeFile;
using Code = Status::Code;

constexpr uint64_t kClusterSize = 65536;
constexpr uint64_t kVirtualSize = 1 << 20;
// The base image's guest layout (see MakeBaseImage).
constexpr uint64_t kNormalGuest = 0;          // 0x11, a normal cluster
constexpr uint64_t kCompressedGuest = 65536;  // 0x22, a compressed cluster
constexpr uint64_t kZeroGuest = 131072;       // a zero cluster
constexpr uint8_t kNormalPattern = 0x11;
constexpr uint8_t kCompressedPattern = 0x22;

// Header field offsets (format/header.h).
constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 4;
constexpr size_t kOffBackingFileOffset = 8;
constexpr size_t kOffBackingFileSize = 16;
constexpr size_t kOffClusterBits = 20;
constexpr size_t kOffSize = 24;
constexpr size_t kOffL1Size = 36;
constexpr size_t kOffL1TableOffset = 40;
constexpr size_t kOffRefcountTableOffset = 48;
constexpr size_t kOffRefcountTableClusters = 56;
constexpr size_t kOffIncompatible = 72;
constexpr size_t kOffRefcountOrder = 96;
constexpr size_t kOffHeaderLength = 100;
constexpr size_t kOffCompressionType = 104;

constexpr uint64_t kCopied = 1ull << 63;
constexpr uint64_t kCompressedFlag = 1ull << 62;
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

// Where things are in the base image, read from its own bytes.
struct Layout {
  uint64_t file_size = 0;
  uint64_t l1_offset = 0;
  uint64_t l2_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint64_t compressed_entry = 0;  // raw L2 entry of kCompressedGuest
  uint64_t end_cluster = 0;       // first cluster-aligned offset at or past EOF
};

Layout ReadLayout(const std::vector<uint8_t>& bytes) {
  Layout layout;
  layout.file_size = bytes.size();
  layout.l1_offset = format::LoadBE64(&bytes[kOffL1TableOffset]);
  layout.refcount_table_offset = format::LoadBE64(&bytes[kOffRefcountTableOffset]);
  layout.l2_offset = format::LoadBE64(&bytes[layout.l1_offset]) & kOffsetMask;
  layout.compressed_entry =
      format::LoadBE64(&bytes[layout.l2_offset + 8 * (kCompressedGuest / kClusterSize)]);
  layout.end_cluster = (bytes.size() + kClusterSize - 1) / kClusterSize * kClusterSize;
  return layout;
}

void Put32(std::vector<uint8_t>& b, size_t off, uint32_t v) { format::StoreBE32(&b[off], v); }
void Put64(std::vector<uint8_t>& b, size_t off, uint64_t v) { format::StoreBE64(&b[off], v); }

// Compressed descriptor fields for 64 KiB clusters: x = 62 - (16 - 8) = 54 offset bits.
constexpr int kCompressedOffsetBits = 54;
constexpr uint64_t kCompressedOffsetMask = (1ull << kCompressedOffsetBits) - 1;
constexpr uint64_t kCompressedSectorsMask = (1ull << 8) - 1;

uint64_t WithCompressedOffset(uint64_t entry, uint64_t offset) {
  return (entry & ~kCompressedOffsetMask) | offset;
}
uint64_t WithCompressedSectors(uint64_t entry, uint64_t sectors) {
  return (entry & ~(kCompressedSectorsMask << kCompressedOffsetBits)) |
         (sectors << kCompressedOffsetBits);
}

enum class Expect {
  kOpenFails,         // Image::Open must fail with one of `codes`, naming file and field
  kReadFails,         // Open may succeed; reading `guest` must then fail (never return data)
  kReadExactOrFails,  // reading `guest` returns the original bytes, or fails cleanly
  kCheckCorrupt,      // Open/Read must not crash (errors allowed); CheckImage finds corruption
};

struct HostileCase {
  std::string name;
  std::function<void(std::vector<uint8_t>&, const Layout&)> patch;
  Expect expect;
  std::vector<Code> codes;            // acceptable error codes
  std::vector<std::string> keywords;  // the message names one of these (case-insensitive)
  uint64_t guest = 0;                 // kRead*: the guest cluster concerned
  uint8_t pattern = 0;                // kReadExactOrFails: the original content
};
void PrintTo(const HostileCase& c, std::ostream* os) { *os << c.name; }

const std::vector<Code> kMalformed = {Code::kCorruption, Code::kNotSupported};
const std::vector<Code> kUnsupported = {Code::kNotSupported};
const std::vector<Code> kReadError = {Code::kCorruption, Code::kIOError};

std::vector<HostileCase> Cases() {
  std::vector<HostileCase> cases;
  auto add = [&](std::string name, auto patch, Expect expect, std::vector<Code> codes,
                 std::vector<std::string> keywords, uint64_t guest = 0, uint8_t pattern = 0) {
    cases.push_back(
        {std::move(name), patch, expect, std::move(codes), std::move(keywords), guest, pattern});
  };
  using B = std::vector<uint8_t>;
  // Header fields.
  add("bad_magic", [](B& b, const Layout&) { Put32(b, kOffMagic, 0x514649fa); }, Expect::kOpenFails,
      {Code::kCorruption, Code::kInvalidArgument, Code::kNotSupported},
      {"magic", "qcow2", "not a"});
  add("version_4", [](B& b, const Layout&) { Put32(b, kOffVersion, 4); }, Expect::kOpenFails,
      kMalformed, {"version"});
  add("huge_l1_size", [](B& b, const Layout&) { Put32(b, kOffL1Size, 0x7fffffff); },
      Expect::kOpenFails, kMalformed, {"l1"});
  add("max_l1_size", [](B& b, const Layout&) { Put32(b, kOffL1Size, 0xffffffff); },
      Expect::kOpenFails, kMalformed, {"l1"});
  add("l1_too_small_for_size", [](B& b, const Layout&) { Put64(b, kOffSize, 1ull << 50); },
      Expect::kOpenFails, kMalformed, {"l1", "size"});
  add("l1_overlaps_header", [](B& b, const Layout&) { Put64(b, kOffL1TableOffset, 0); },
      Expect::kOpenFails, kMalformed, {"l1"});
  add("l1_past_eof",
      [](B& b, const Layout& l) { Put64(b, kOffL1TableOffset, l.end_cluster + 16 * kClusterSize); },
      Expect::kOpenFails, kMalformed, {"l1"});
  add("l1_far_past_eof", [](B& b, const Layout&) { Put64(b, kOffL1TableOffset, 1ull << 55); },
      Expect::kOpenFails, kMalformed, {"l1"});
  add("l1_unaligned", [](B& b, const Layout& l) { Put64(b, kOffL1TableOffset, l.l1_offset + 512); },
      Expect::kOpenFails, kMalformed, {"l1"});
  add("refcount_table_overlaps_header",
      [](B& b, const Layout&) { Put64(b, kOffRefcountTableOffset, 0); }, Expect::kOpenFails,
      kMalformed, {"refcount"});
  add("refcount_table_past_eof",
      [](B& b, const Layout& l) {
        Put64(b, kOffRefcountTableOffset, l.end_cluster + 16 * kClusterSize);
      },
      Expect::kOpenFails, kMalformed, {"refcount"});
  add("huge_refcount_table",
      [](B& b, const Layout&) { Put32(b, kOffRefcountTableClusters, 0x00ffffff); },
      Expect::kOpenFails, kMalformed, {"refcount"});
  add("cluster_bits_8", [](B& b, const Layout&) { Put32(b, kOffClusterBits, 8); },
      Expect::kOpenFails, kMalformed, {"cluster"});
  add("cluster_bits_22", [](B& b, const Layout&) { Put32(b, kOffClusterBits, 22); },
      Expect::kOpenFails, kMalformed, {"cluster"});
  add("cluster_bits_63", [](B& b, const Layout&) { Put32(b, kOffClusterBits, 63); },
      Expect::kOpenFails, kMalformed, {"cluster"});
  add("refcount_order_7", [](B& b, const Layout&) { Put32(b, kOffRefcountOrder, 7); },
      Expect::kOpenFails, kMalformed, {"refcount"});
  add("header_length_odd", [](B& b, const Layout&) { Put32(b, kOffHeaderLength, 105); },
      Expect::kOpenFails, kMalformed, {"header"});
  add("header_length_past_cluster",
      [](B& b, const Layout&) { Put32(b, kOffHeaderLength, 0x20000); }, Expect::kOpenFails,
      kMalformed, {"header"});
  add("unknown_compression_type",
      [](B& b, const Layout&) {
        b[kOffCompressionType] = 7;
        Put64(b, kOffIncompatible, format::LoadBE64(&b[kOffIncompatible]) | (1ull << 3));
      },
      Expect::kOpenFails, kMalformed, {"compression"});
  add("compression_bit_without_type",
      [](B& b, const Layout&) {
        Put64(b, kOffIncompatible, format::LoadBE64(&b[kOffIncompatible]) | (1ull << 3));
      },
      Expect::kOpenFails, kMalformed, {"compression"});
  add("unknown_incompatible_bit",
      [](B& b, const Layout&) {
        Put64(b, kOffIncompatible, format::LoadBE64(&b[kOffIncompatible]) | (1ull << 10));
      },
      Expect::kOpenFails, kUnsupported, {"incompatible", "feature"});
  add("external_data_file_bit",
      [](B& b, const Layout&) {
        Put64(b, kOffIncompatible, format::LoadBE64(&b[kOffIncompatible]) | (1ull << 2));
      },
      Expect::kOpenFails, kUnsupported, {"incompatible", "feature", "external", "data file"});
  add("backing_file",
      [](B& b, const Layout&) {
        const std::string name = "base.raw";
        constexpr size_t kNameOffset = 0x800;  // inside the header cluster, past extensions
        std::copy(name.begin(), name.end(), b.begin() + kNameOffset);
        Put64(b, kOffBackingFileOffset, kNameOffset);
        Put32(b, kOffBackingFileSize, static_cast<uint32_t>(name.size()));
      },
      // The backing file is followed, and it is not there.
      Expect::kOpenFails, {Code::kNotFound}, {"backing file", "base.raw"});
  add("truncated_header", [](B& b, const Layout&) { b.resize(50); }, Expect::kOpenFails,
      {Code::kCorruption, Code::kInvalidArgument, Code::kNotSupported},
      {"header", "short", "truncated", "small", "end of file", "not a", "magic"});
  add("empty_file", [](B& b, const Layout&) { b.clear(); }, Expect::kOpenFails,
      {Code::kCorruption, Code::kInvalidArgument, Code::kNotSupported},
      {"header", "short", "truncated", "small", "empty", "end of file", "not a", "magic"});

  // Table entries.
  add(
      "compressed_data_past_eof",
      [](B& b, const Layout& l) {
        Put64(b, l.l2_offset + 8 * (kCompressedGuest / kClusterSize),
              WithCompressedOffset(l.compressed_entry, l.end_cluster + 10 * kClusterSize));
      },
      Expect::kReadFails, kReadError, {"compress", "end of file", "eof", "past", "beyond"},
      kCompressedGuest);
  add(
      "compressed_data_cut_by_eof",
      [](B& b, const Layout& l) {
        Put64(b, l.l2_offset + 8 * (kCompressedGuest / kClusterSize),
              WithCompressedOffset(l.compressed_entry, l.file_size - 10));
      },
      Expect::kReadFails, kReadError, {"compress", "end of file", "eof", "past", "beyond"},
      kCompressedGuest);
  add(
      "compressed_sectors_max",
      [](B& b, const Layout& l) {
        Put64(b, l.l2_offset + 8 * (kCompressedGuest / kClusterSize),
              WithCompressedSectors(l.compressed_entry, kCompressedSectorsMask));
      },
      Expect::kReadExactOrFails, kReadError, {"compress", "end of file", "eof", "past"},
      kCompressedGuest, kCompressedPattern);
  add(
      "compressed_garbage_stream",
      [](B& b, const Layout& l) {
        const uint64_t data = l.compressed_entry & kCompressedOffsetMask;
        for (uint64_t i = 0; i < 64; ++i) b[data + i] = static_cast<uint8_t>(0xff - i);
      },
      Expect::kReadFails, kReadError, {"compress", "decompress", "corrupt", "stream"},
      kCompressedGuest);
  add(
      "l2_table_past_eof",
      [](B& b, const Layout& l) {
        Put64(b, l.l1_offset, kCopied | (l.end_cluster + 64 * kClusterSize));
      },
      Expect::kReadFails, {Code::kCorruption, Code::kIOError}, {"l2", "end of file", "past"},
      kNormalGuest);
  add(
      "l2_table_unaligned",
      [](B& b, const Layout& l) { Put64(b, l.l1_offset, kCopied | (l.l2_offset + 512)); },
      Expect::kReadFails, kMalformed, {"l2", "l1", "align"}, kNormalGuest);
  add("l2_table_is_the_l1_table",
      [](B& b, const Layout& l) { Put64(b, l.l1_offset, kCopied | l.l1_offset); },
      Expect::kCheckCorrupt, {}, {});
  add("l2_table_is_the_refcount_table",
      [](B& b, const Layout& l) { Put64(b, l.l1_offset, kCopied | l.refcount_table_offset); },
      Expect::kCheckCorrupt, {}, {});
  add("data_cluster_is_the_refcount_table",
      [](B& b, const Layout& l) { Put64(b, l.l2_offset, kCopied | l.refcount_table_offset); },
      Expect::kCheckCorrupt, {}, {});
  add("compressed_and_copied",
      [](B& b, const Layout& l) {
        Put64(b, l.l2_offset + 8 * (kCompressedGuest / kClusterSize), l.compressed_entry | kCopied);
      },
      Expect::kCheckCorrupt, {}, {});
  add("l2_reserved_bits",
      [](B& b, const Layout& l) {
        Put64(b, l.l2_offset, format::LoadBE64(&b[l.l2_offset]) | 0x100);
      },
      Expect::kCheckCorrupt, {}, {});
  add("refcount_zero_for_used_cluster",
      [](B& b, const Layout& l) {
        // The refcount block is the first entry of the refcount table; zero every refcount.
        const uint64_t block = format::LoadBE64(&b[l.refcount_table_offset]) & ~511ull;
        std::fill(b.begin() + block, b.begin() + block + kClusterSize, 0);
      },
      Expect::kCheckCorrupt, {}, {});
  return cases;
}

class HostileImageTest : public ::testing::TestWithParam<HostileCase> {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(testing::HaveQemu()) << "qemu-img/qemu-io missing: run scripts/setup";
    base_dir_ = new TempDir();
    base_ = base_dir_->File("base.qcow2");
    // 1 MiB, 64 KiB clusters: a normal, a compressed and a zero cluster.
    auto r = RunCommand("qemu-img create -q -f qcow2 -o cluster_size=65536 " + ShellQuote(base_) +
                        " 1M && qemu-io -f qcow2" +
                        " -c 'write -P 0x11 0 64k' -c 'write -c -P 0x22 64k 64k'" +
                        " -c 'write -z 128k 64k' " + ShellQuote(base_));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  static void TearDownTestSuite() {
    delete base_dir_;
    base_dir_ = nullptr;
  }

  static TempDir* base_dir_;
  static std::string base_;
  TempDir dir_;
};
TempDir* HostileImageTest::base_dir_ = nullptr;
std::string HostileImageTest::base_;

// Opens, reads everything, maps and checks; returns the Open status and records the status
// of reading `guest`'s cluster in *guest_read (with its data in *guest_data).
Status Exercise(const std::string& path, uint64_t guest, Status* guest_read,
                std::vector<uint8_t>* guest_data) {
  auto image = Image::Open(path, OpenOptions{});
  if (!image.ok()) return image.status();
  const uint64_t size = std::min<uint64_t>((*image)->virtual_size(), kVirtualSize);
  std::vector<uint8_t> chunk(kClusterSize);
  for (uint64_t off = 0; off < size; off += kClusterSize) {
    const uint64_t len = std::min<uint64_t>(kClusterSize, size - off);
    Status s = (*image)->Read(off, std::span<uint8_t>(chunk.data(), len));
    if (!s.ok()) {
      EXPECT_FALSE(s.message().empty());
    }
    if (off == guest) {
      *guest_read = s;
      guest_data->assign(chunk.begin(), chunk.begin() + len);
    }
  }
  (void)(*image)->Map(0, size);
  EXPECT_TRUE((*image)->Close().ok());
  return Status::OK();
}

void ExpectClearError(const Status& status, const std::string& path, const HostileCase& c) {
  ASSERT_FALSE(status.ok());
  EXPECT_NE(std::find(c.codes.begin(), c.codes.end(), status.code()), c.codes.end())
      << "unexpected code " << static_cast<int>(status.code()) << ": " << status.message();
  EXPECT_NE(status.message().find(path), std::string::npos)
      << "message does not name the file: " << status.message();
  const std::string lower = Lower(status.message());
  bool named = false;
  for (const std::string& k : c.keywords) named = named || lower.find(k) != std::string::npos;
  EXPECT_TRUE(named) << "message does not name the field: " << status.message();
  EXPECT_EQ(status.message().find('\n'), std::string::npos) << "not one line: " << status.message();
}

TEST_F(HostileImageTest, BaseImageIsValid) {
  // The control: the unpatched image opens and reads back what qemu-io wrote.
  Status read;
  std::vector<uint8_t> data;
  ASSERT_TRUE(Exercise(base_, kCompressedGuest, &read, &data).ok());
  ASSERT_TRUE(read.ok()) << read.message();
  EXPECT_EQ(data, std::vector<uint8_t>(kClusterSize, kCompressedPattern));
  auto image = Image::Open(base_, OpenOptions{});
  ASSERT_TRUE(image.ok()) << image.status().message();
  std::vector<uint8_t> normal(kClusterSize), zero(kClusterSize, 0xee);
  ASSERT_TRUE((*image)->Read(kNormalGuest, normal).ok());
  ASSERT_TRUE((*image)->Read(kZeroGuest, zero).ok());
  EXPECT_EQ(normal, std::vector<uint8_t>(kClusterSize, kNormalPattern));
  EXPECT_EQ(zero, std::vector<uint8_t>(kClusterSize, 0));
  auto check = CheckImage(base_);
  ASSERT_TRUE(check.ok()) << check.status().message();
  EXPECT_EQ(check->corruptions, 0u);
  EXPECT_EQ(check->leaks, 0u);
}

TEST_P(HostileImageTest, FailsCleanly) {
  const HostileCase& c = GetParam();
  std::vector<uint8_t> bytes = ReadWholeFile(base_);
  ASSERT_GT(bytes.size(), 3 * kClusterSize);
  const Layout layout = ReadLayout(bytes);
  c.patch(bytes, layout);
  const std::string path = dir_.File(c.name + ".qcow2");
  WriteWholeFile(path, bytes);

  Status guest_read = Status::Interrupted("not read");
  std::vector<uint8_t> guest_data;
  const Status open = Exercise(path, c.guest, &guest_read, &guest_data);
  // The checker must survive every case too (a non-OK Status is fine when the header is bad).
  auto check = CheckImage(path);

  switch (c.expect) {
    case Expect::kOpenFails:
      ExpectClearError(open, path, c);
      break;
    case Expect::kReadFails:
      if (!open.ok()) {
        ExpectClearError(open, path, c);
      } else {
        ASSERT_FALSE(guest_read.ok()) << "read of a broken cluster returned data";
        EXPECT_NE(std::find(c.codes.begin(), c.codes.end(), guest_read.code()), c.codes.end())
            << guest_read.message();
        EXPECT_NE(guest_read.message().find(path), std::string::npos) << guest_read.message();
      }
      break;
    case Expect::kReadExactOrFails:
      ASSERT_TRUE(open.ok()) << open.message();
      if (guest_read.ok()) {
        EXPECT_EQ(guest_data, std::vector<uint8_t>(kClusterSize, c.pattern)) << "garbage read";
      } else {
        EXPECT_NE(guest_read.message().find(path), std::string::npos) << guest_read.message();
      }
      break;
    case Expect::kCheckCorrupt: {
      // QEMU agrees this image is corrupt ...
      auto qemu = testing::QemuImgCheck(path);
      ASSERT_EQ(qemu.exit_code, 2) << "test case is not corrupt for QEMU: " << qemu.output;
      // ... and so must zqcow's checker (or it refuses the image with a clear error).
      if (check.ok()) {
        EXPECT_GT(check->corruptions, 0u) << "CheckImage missed the corruption";
      } else {
        EXPECT_NE(check.status().message().find(path), std::string::npos);
      }
      break;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Patched, HostileImageTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<HostileCase>& info) {
                           return info.param.name;
                         });

// Images with internal snapshots and overlays are read (the active state, through the
// backing chain) but never written: writing would have to share clusters with snapshots
// or copy on write from the backing file.
TEST_F(HostileImageTest, SnapshotsAreReadButNotWritten) {
  const std::string path = dir_.File("snap.qcow2");
  auto r = RunCommand("cp " + ShellQuote(base_) + " " + ShellQuote(path) +
                      " && qemu-img snapshot -c snap1 " + ShellQuote(path));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto image = Image::Open(path, OpenOptions{});
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  EXPECT_TRUE((*image)->Close().ok());
  OpenOptions writable;
  writable.writable = true;
  image = Image::Open(path, writable);
  ASSERT_FALSE(image.ok()) << "an image with internal snapshots was opened for writing";
  ExpectClearError(
      image.status(), path,
      HostileCase{"snapshots", nullptr, Expect::kOpenFails, kUnsupported, {"snapshot"}});
}

// Overlays open writable too (src/qcow2/overlay_test.cc tests what writing them does).
TEST_F(HostileImageTest, OverlayIsReadAndWritable) {
  const std::string backing = dir_.File("backing.raw");
  const std::string path = dir_.File("overlay.qcow2");
  auto r = RunCommand("qemu-img create -q -f raw " + ShellQuote(backing) +
                      " 1M && qemu-img create -q -f qcow2 -F raw -b " + ShellQuote(backing) + " " +
                      ShellQuote(path));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto image = Image::Open(path, OpenOptions{});
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  EXPECT_TRUE((*image)->Close().ok());
  OpenOptions writable;
  writable.writable = true;
  image = Image::Open(path, writable);
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  EXPECT_TRUE((*image)->Close().ok());
}

// Grouped reads of compressed clusters (Image::Read of several whole clusters) read the data
// of neighbouring compressed clusters with one request into a buffer sized for one group.
// With cluster_bits >= 18 a descriptor may claim more sectors than a group holds (QEMU
// accepts an overstated sector count: it decompresses until the cluster is full), so a first
// entry with the largest span followed by a second entry at the same host offset once made
// the grouped read write past its buffer. Both clusters must read as QEMU reads them.
class OversizedSpanTest : public ::testing::TestWithParam<uint32_t> {};

TEST_P(OversizedSpanTest, GroupedReadMatchesQemu) {
  ASSERT_TRUE(testing::HaveQemu()) << "qemu-img/qemu-io missing: run scripts/setup";
  const uint32_t cluster_size = GetParam();
  int cluster_bits = 0;
  while ((1u << cluster_bits) < cluster_size) ++cluster_bits;
  TempDir dir;
  const std::string path = dir.File("span.qcow2");
  const std::string c = std::to_string(cluster_size);
  auto r = RunCommand("qemu-img create -q -f qcow2 -o cluster_size=" + c + " " + ShellQuote(path) +
                      " " + std::to_string(4ull * cluster_size) + " && qemu-io -f qcow2" +
                      " -c 'write -c -P 0x33 0 " + c + "' -c 'write -c -P 0x44 " + c + " " + c +
                      "' " + ShellQuote(path));
  ASSERT_EQ(r.exit_code, 0) << r.output;

  std::vector<uint8_t> bytes = ReadWholeFile(path);
  const uint64_t l1_offset = format::LoadBE64(&bytes[kOffL1TableOffset]);
  const uint64_t l2_offset = format::LoadBE64(&bytes[l1_offset]) & kOffsetMask;
  const int offset_bits = 62 - (cluster_bits - 8);
  const uint64_t offset_mask = (1ull << offset_bits) - 1;
  const uint64_t sectors_max = (1ull << (cluster_bits - 8)) - 1;
  const uint64_t first = format::LoadBE64(&bytes[l2_offset]);
  ASSERT_NE(first & kCompressedFlag, 0u) << "qemu-io did not write a compressed cluster";
  const uint64_t host = first & offset_mask;
  // The first entry claims every sector the descriptor can express; the second points at
  // the first one's data with its honest span.
  Put64(bytes, l2_offset, kCompressedFlag | (sectors_max << offset_bits) | host);
  Put64(bytes, l2_offset + 8, first);
  // The file reaches past the largest span, so the oversized read is not cut by EOF.
  const uint64_t span_end = host + (sectors_max + 1) * 512;
  if (bytes.size() < span_end) bytes.resize(span_end, 0);
  WriteWholeFile(path, bytes);

  const std::string raw = dir.File("qemu.raw");
  r = RunCommand("qemu-img convert -f qcow2 -O raw " + ShellQuote(path) + " " + ShellQuote(raw));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<uint8_t> expected = ReadWholeFile(raw);
  ASSERT_EQ(expected.size(), 4ull * cluster_size);
  ASSERT_EQ(expected[cluster_size], 0x33) << "QEMU reads the second cluster differently";

  auto image = Image::Open(path, OpenOptions{});
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  std::vector<uint8_t> data(expected.size(), 0xee);
  Status read = (*image)->Read(0, data);
  ASSERT_TRUE(read.ok()) << read.ToString();
  EXPECT_TRUE(data == expected) << "zqcow reads the image differently from QEMU";
  EXPECT_TRUE((*image)->Close().ok());
  auto check = CheckImage(path);
  EXPECT_TRUE(check.ok()) << check.status().ToString();
}

INSTANTIATE_TEST_SUITE_P(ClusterSizes, OversizedSpanTest,
                         ::testing::Values(256u << 10, 512u << 10, 2u << 20),
                         [](const ::testing::TestParamInfo<uint32_t>& info) {
                           return std::to_string(info.param >> 10) + "k";
                         });

TEST_F(HostileImageTest, MissingFileIsNotFound) {
  const std::string path = dir_.File("missing.qcow2");
  auto image = Image::Open(path, OpenOptions{});
  ASSERT_FALSE(image.ok());
  EXPECT_EQ(image.status().code(), Code::kNotFound) << image.status().message();
  EXPECT_NE(image.status().message().find(path), std::string::npos);
}

}  // namespace
}  // namespace zqcow
