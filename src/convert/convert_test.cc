// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// zqcow::Convert end to end on real files, judged by qemu-img: `check` must be clean and
// `compare` against the source must say identical. Plus the error paths: missing source,
// existing target, wrong format, cancel, a full disk under the target.

#include "zqcow/convert.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <ostream>
#include <string>
#include <vector>

#include "io/fault_file.h"
#include "io/file.h"
#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow {
namespace {

using testing::DataKind;
using testing::TempDir;

constexpr uint64_t kMiB = uint64_t{1} << 20;

uint64_t Clusters(uint64_t size, uint32_t cluster_size) {
  return (size + cluster_size - 1) / cluster_size;
}

// Whatever the options, the stats must add up.
void ExpectConsistentStats(const ConvertStats& stats, uint64_t source_size, uint32_t cluster_size) {
  EXPECT_EQ(stats.virtual_size, source_size);
  EXPECT_EQ(stats.clusters_zero + stats.clusters_compressed + stats.clusters_uncompressed,
            Clusters(source_size, cluster_size));
  EXPECT_LE(stats.zero_bytes_skipped, source_size);
  EXPECT_GE(stats.zero_bytes_skipped, stats.clusters_zero > 0 ? 1u : 0u);
  EXPECT_LE(stats.bytes_read, source_size + cluster_size);
  EXPECT_LT(stats.compressed_bytes, uint64_t{cluster_size} * (stats.clusters_compressed + 1));
  EXPECT_GT(stats.output_file_size, 0u);
  EXPECT_GE(stats.wall_seconds, 0.0);
  EXPECT_GE(stats.cpu_seconds, 0.0);
  EXPECT_GT(stats.peak_rss_bytes, 0u);
}

void ExpectQemuAgrees(const std::string& source, const std::string& source_format,
                      const std::string& target) {
  testing::CommandResult check = testing::QemuImgCheck(target);
  EXPECT_EQ(check.exit_code, 0) << check.output;
  testing::CommandResult compare = testing::QemuImgCompare(source, source_format, target, "qcow2");
  EXPECT_EQ(compare.exit_code, 0) << compare.output;
  Result<ImageInfo> info = ReadImageInfo(target);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_FALSE(info->dirty);
}

struct Case {
  const char* name;
  DataKind kind;
  uint32_t cluster_size;
  bool compress;
  Compression compression;
  int level;  // 0: the codec default
  unsigned workers;
  bool out_of_order;
  bool source_direct;
  bool target_direct;
  IoOptions::WriteCache cache;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

using WC = IoOptions::WriteCache;
const Case kCases[] = {
    {"mixed_64k_zlib", DataKind::kMixed, 65536, true, Compression::kZlib, 0, 4, true, false, false,
     WC::kAuto},
    {"mixed_512_zstd_inorder_direct", DataKind::kMixed, 512, true, Compression::kZstd, 0, 4, false,
     true, true, WC::kOn},
    {"mixed_4k_zlib1_one_worker_nocache", DataKind::kMixed, 4096, true, Compression::kZlib, 1, 1,
     true, false, true, WC::kOff},
    {"mixed_2m_zstd1_direct", DataKind::kMixed, 2 << 20, true, Compression::kZstd, 1, 4, true, true,
     true, WC::kAuto},
    {"random_64k_inorder", DataKind::kRandom, 65536, true, Compression::kZlib, 0, 2, false, false,
     false, WC::kAuto},
    {"text_4k_zstd5_cache", DataKind::kText, 4096, true, Compression::kZstd, 5, 4, true, false,
     false, WC::kOn},
    {"ones_64k_zlib9_inorder_direct", DataKind::kOnes, 65536, true, Compression::kZlib, 9, 4, false,
     false, true, WC::kAuto},
    {"mixed_64k_uncompressed_direct", DataKind::kMixed, 65536, false, Compression::kZlib, 0, 2,
     true, true, true, WC::kAuto},
    {"mixed_512_uncompressed_inorder", DataKind::kMixed, 512, false, Compression::kZlib, 0, 4,
     false, false, false, WC::kAuto},
};

class ConvertMatrix : public ::testing::TestWithParam<Case> {};

TEST_P(ConvertMatrix, QemuImgReadsTheSameDisk) {
  ASSERT_TRUE(testing::HaveQemu());
  const Case& c = GetParam();
  TempDir dir;
  const std::string source = dir.File("source.raw");
  const std::string target = dir.File("target.qcow2");
  // Not a multiple of the cluster size (a multiple of the sector size, as qemu-img sizes
  // raw files).
  const uint64_t size = (c.cluster_size >= (1u << 20) ? 6 * kMiB : 3 * kMiB) + 3 * 512;
  testing::WriteRawImage(source, size, c.kind, /*seed=*/size + c.cluster_size, c.cluster_size);

  ConvertOptions options;
  options.compress = c.compress;
  options.compression = c.compression;
  options.compression_level = c.level;
  options.cluster_size = c.cluster_size;
  options.workers = c.workers;
  options.out_of_order = c.out_of_order;
  options.source_direct_io = c.source_direct;
  options.target_io.direct_io = c.target_direct;
  options.target_io.write_cache = c.cache;
  int progress_calls = 0;
  uint64_t last_done = 0;
  options.progress = [&](const ConvertProgress& p) {
    ++progress_calls;
    EXPECT_EQ(p.bytes_total, size);
    last_done = p.bytes_done;
  };

  Result<ConvertStats> stats = Convert(source, target, options);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  ExpectQemuAgrees(source, "raw", target);
  ExpectConsistentStats(*stats, size, c.cluster_size);
  EXPECT_GE(progress_calls, 1);
  EXPECT_EQ(last_done, size);
  if (!c.compress) {
    EXPECT_EQ(stats->clusters_compressed, 0u);
  } else if (c.kind == DataKind::kRandom) {
    EXPECT_GT(stats->clusters_uncompressed, 0u);  // incompressible
  } else if (c.kind == DataKind::kText || c.kind == DataKind::kOnes) {
    EXPECT_EQ(stats->clusters_compressed, Clusters(size, c.cluster_size));
    EXPECT_LT(stats->compressed_bytes, size / 2);
  }
  if (c.kind == DataKind::kMixed && c.cluster_size <= 65536) {
    EXPECT_GT(stats->clusters_zero, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(All, ConvertMatrix, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(ConvertTest, AllZeroSourceLeavesEveryClusterUnallocated) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  const std::string source = dir.File("zeros.raw");
  const std::string target = dir.File("zeros.qcow2");
  const uint64_t size = 2 * kMiB + 512;
  testing::WriteWholeFile(source, std::vector<uint8_t>(size, 0));  // written zeros, no holes
  Result<ConvertStats> stats = Convert(source, target, ConvertOptions());
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  ExpectQemuAgrees(source, "raw", target);
  EXPECT_EQ(stats->clusters_zero, Clusters(size, 65536));
  EXPECT_EQ(stats->zero_bytes_skipped, size);
  EXPECT_EQ(stats->bytes_read, size);  // the zeros had to be read to be seen
  EXPECT_EQ(stats->clusters_compressed + stats->clusters_uncompressed, 0u);
}

TEST(ConvertTest, EmptySourceGivesACleanEmptyImage) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  const std::string source = dir.File("empty.raw");
  const std::string target = dir.File("empty.qcow2");
  testing::WriteWholeFile(source, {});
  Result<ConvertStats> stats = Convert(source, target, ConvertOptions());
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_EQ(stats->virtual_size, 0u);
  // No L1 entries: no L1 cluster may be allocated (it would be a leak, exit 3).
  ExpectQemuAgrees(source, "raw", target);
}

TEST(ConvertTest, SourceSizeRoundsUpToWholeSectors) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  const std::string source = dir.File("odd.raw");
  const std::string target = dir.File("odd.qcow2");
  const uint64_t size = 100000;  // not a multiple of 512
  testing::WriteWholeFile(source, testing::MakeData(DataKind::kText, size, 5));
  ConvertOptions options;
  options.source_direct_io = true;
  Result<ConvertStats> stats = Convert(source, target, options);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  EXPECT_EQ(stats->virtual_size, (size + 511) / 512 * 512);
  ExpectQemuAgrees(source, "raw", target);
}

TEST(ConvertTest, Qcow2SourceConvertsEqual) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  const std::string raw = dir.File("source.raw");
  const std::string middle = dir.File("qemu.qcow2");
  const std::string target = dir.File("target.qcow2");
  const uint64_t size = 4 * kMiB + 1536;
  testing::WriteRawImage(raw, size, DataKind::kMixed, 77);
  // qemu-img leaves the holes and zero clusters unallocated; -c stores compressed clusters.
  for (const std::string qemu_flags : {"", "-c"}) {
    testing::CommandResult made =
        testing::RunCommand("qemu-img convert -f raw -O qcow2 " + qemu_flags + " " +
                            testing::ShellQuote(raw) + " " + testing::ShellQuote(middle));
    ASSERT_EQ(made.exit_code, 0) << made.output;
    for (bool direct : {false, true}) {
      SCOPED_TRACE("qemu-img convert " + qemu_flags + (direct ? ", direct source" : ""));
      ConvertOptions options;
      options.compression = Compression::kZstd;
      options.source_direct_io = direct;
      options.overwrite = true;
      Result<ConvertStats> stats = Convert(middle, target, options);  // format detected
      ASSERT_TRUE(stats.ok()) << stats.status().ToString();
      ExpectQemuAgrees(raw, "raw", target);
      ExpectQemuAgrees(middle, "qcow2", target);
      EXPECT_EQ(stats->virtual_size, size);
      EXPECT_LT(stats->bytes_read, size);  // unallocated ranges are not read
      EXPECT_GT(stats->clusters_zero, 0u);
    }
  }
}

// An overlay converts to a standalone image of what the guest sees through the chain (as
// qemu-img convert does); what is unallocated all the way down is neither read nor
// allocated.
TEST(ConvertTest, OverlaySourceConvertsTheWholeChain) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  const std::string raw = dir.File("base.raw");
  const std::string base = dir.File("base.qcow2");
  const std::string top = dir.File("top.qcow2");
  const std::string target = dir.File("target.qcow2");
  const uint64_t size = 4 * kMiB;
  testing::WriteRawImage(raw, size, DataKind::kMixed, 78);
  auto run = [](const std::string& command) {
    testing::CommandResult r = testing::RunCommand(command);
    ASSERT_EQ(r.exit_code, 0) << command << "\n" << r.output;
  };
  run("qemu-img convert -c -f raw -O qcow2 " + testing::ShellQuote(raw) + " " +
      testing::ShellQuote(base));
  // A larger overlay: its last 2 MiB lie beyond the backing file.
  run("qemu-img create -q -f qcow2 -F qcow2 -b " + testing::ShellQuote(base) + " " +
      testing::ShellQuote(top) + " 6M");
  run("qemu-io -f qcow2 -c 'write -P 0x5a 1M 192k' -c 'write -z 2M 128k' -c 'write -P 0x5b 5M "
      "64k' " +
      testing::ShellQuote(top));
  for (bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "direct source" : "buffered source");
    ConvertOptions options;
    options.compression = Compression::kZstd;
    options.source_direct_io = direct;
    options.overwrite = true;
    Result<ConvertStats> stats = Convert(top, target, options);
    ASSERT_TRUE(stats.ok()) << stats.status().ToString();
    ExpectQemuAgrees(top, "qcow2", target);
    auto info = Image::Open(target, OpenOptions());
    ASSERT_TRUE(info.ok());
    EXPECT_EQ((*info)->Info().backing_file, "");
    EXPECT_EQ(stats->virtual_size, 6 * kMiB);
    // Only the base's data and the overlay's 64 KiB past it are read.
    EXPECT_LT(stats->bytes_read, size + 64 * 1024);
  }
}

TEST(ConvertTest, HugeSparseSourceReadsAboutItsData) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  const std::string source = dir.File("sparse.raw");
  const std::string target = dir.File("sparse.qcow2");
  const uint64_t size = uint64_t{1} << 40;  // 1 TiB
  const std::vector<uint8_t> block = testing::MakeData(DataKind::kText, kMiB, 9);
  const uint64_t offsets[] = {0, 5 * kMiB, uint64_t{300} << 30, size - kMiB};
  {
    int fd = open(source.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0);
    for (uint64_t offset : offsets) {
      ASSERT_EQ(pwrite(fd, block.data(), block.size(), static_cast<off_t>(offset)),
                static_cast<ssize_t>(block.size()));
    }
    close(fd);
  }
  struct stat st {};
  ASSERT_EQ(stat(source.c_str(), &st), 0);
  // The premise: the file system keeps it sparse (else SEEK_DATA cannot help).
  ASSERT_LT(static_cast<uint64_t>(st.st_blocks) * 512, 64 * kMiB);

  Result<ConvertStats> stats = Convert(source, target, ConvertOptions());
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  const uint64_t data = std::size(offsets) * kMiB;
  EXPECT_GE(stats->bytes_read, data);
  EXPECT_LE(stats->bytes_read, 2 * data);
  EXPECT_EQ(stats->clusters_compressed, data / 65536);
  EXPECT_EQ(stats->zero_bytes_skipped, size - data);
  testing::CommandResult check = testing::QemuImgCheck(target);
  EXPECT_EQ(check.exit_code, 0) << check.output;
  // Spot-check the last megabyte through qemu-io's read pattern check is overkill here;
  // compare reads only the allocated parts of both.
  testing::CommandResult compare = testing::QemuImgCompare(source, "raw", target, "qcow2");
  EXPECT_EQ(compare.exit_code, 0) << compare.output;
}

TEST(ConvertTest, InOrderWritesStoreClustersInGuestOrder) {
  TempDir dir;
  const std::string source = dir.File("s.raw");
  const std::string target = dir.File("t.qcow2");
  constexpr uint32_t kClusterSize = 65536;
  const uint64_t size = 4 * kMiB;
  testing::WriteRawImage(source, size, DataKind::kText, 21);
  ConvertOptions options;
  options.workers = 4;
  options.out_of_order = false;
  Result<ConvertStats> stats = Convert(source, target, options);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  ASSERT_EQ(stats->clusters_compressed, size / kClusterSize);
  // Compressed data is packed by one bump allocator in the order of the writes, so guest
  // order in means host offsets increasing with guest offsets.
  Result<std::unique_ptr<Image>> image = Image::Open(target, OpenOptions());
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  uint64_t previous_host = 0;
  for (uint64_t offset = 0; offset < size; offset += kClusterSize) {
    Result<std::vector<MapExtent>> map = (*image)->Map(offset, kClusterSize);
    ASSERT_TRUE(map.ok()) << map.status().ToString();
    ASSERT_EQ(map->size(), 1u);
    ASSERT_EQ((*map)[0].kind, MapExtent::Kind::kCompressed);
    EXPECT_GT((*map)[0].host_offset, previous_host) << "guest offset " << offset;
    previous_host = (*map)[0].host_offset;
  }
  EXPECT_TRUE((*image)->Close().ok());
}

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
TEST(ConvertTest, DefaultConversionStaysFarBelow64MiBResident) {
  TempDir dir;
  const std::string source = dir.File("s.raw");
  const std::string target = dir.File("t.qcow2");
  testing::WriteRawImage(source, 16 * kMiB, DataKind::kMixed, 8);
  Result<ConvertStats> stats = Convert(source, target, ConvertOptions());
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  // The whole test process's peak, so it bounds the pipeline's buffers from above.
  EXPECT_LT(stats->peak_rss_bytes, 64 * kMiB);
}
#endif

TEST(ConvertTest, MissingSourceIsNotFoundNamingIt) {
  TempDir dir;
  const std::string source = dir.File("nope.raw");
  Result<ConvertStats> stats = Convert(source, dir.File("t.qcow2"), ConvertOptions());
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Status::Code::kNotFound) << stats.status().ToString();
  EXPECT_NE(stats.status().message().find(source), std::string::npos);
  struct stat st {};
  EXPECT_NE(stat(dir.File("t.qcow2").c_str(), &st), 0) << "no target for a missing source";
}

TEST(ConvertTest, ExistingTargetRefusedUnlessOverwrite) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  const std::string source = dir.File("s.raw");
  const std::string target = dir.File("t.qcow2");
  testing::WriteRawImage(source, kMiB, DataKind::kText, 1);
  testing::WriteWholeFile(target, {'k', 'e', 'e', 'p'});
  Result<ConvertStats> stats = Convert(source, target, ConvertOptions());
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Status::Code::kAlreadyExists);
  EXPECT_NE(stats.status().message().find(target), std::string::npos);
  EXPECT_NE(stats.status().message().find("--force"), std::string::npos);
  EXPECT_EQ(testing::ReadWholeFile(target), (std::vector<uint8_t>{'k', 'e', 'e', 'p'}));

  ConvertOptions options;
  options.overwrite = true;
  stats = Convert(source, target, options);
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  ExpectQemuAgrees(source, "raw", target);
}

TEST(ConvertTest, TargetSameAsSourceRefused) {
  TempDir dir;
  const std::string source = dir.File("s.raw");
  testing::WriteRawImage(source, kMiB, DataKind::kText, 1);
  const std::vector<uint8_t> before = testing::ReadWholeFile(source);
  ConvertOptions options;
  options.overwrite = true;
  Result<ConvertStats> stats = Convert(source, source, options);
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Status::Code::kInvalidArgument);
  EXPECT_EQ(testing::ReadWholeFile(source), before);
}

TEST(ConvertTest, WrongSourceFormatIsAClearError) {
  TempDir dir;
  const std::string source = dir.File("s.raw");
  testing::WriteRawImage(source, kMiB, DataKind::kText, 1);
  ConvertOptions options;
  options.source_format = "qcow2";
  Result<ConvertStats> stats = Convert(source, dir.File("t.qcow2"), options);
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Status::Code::kInvalidArgument);
  EXPECT_NE(stats.status().message().find(source), std::string::npos);
  EXPECT_NE(stats.status().message().find("qcow2"), std::string::npos);

  options.source_format = "vmdk";
  stats = Convert(source, dir.File("t.qcow2"), options);
  EXPECT_EQ(stats.status().code(), Status::Code::kInvalidArgument);
}

TEST(ConvertTest, BadOptionsRefusedBeforeTheTargetIsCreated) {
  TempDir dir;
  const std::string source = dir.File("s.raw");
  testing::WriteRawImage(source, kMiB, DataKind::kText, 1);
  ConvertOptions options;
  options.cluster_size = 3000;
  EXPECT_EQ(Convert(source, dir.File("a.qcow2"), options).status().code(),
            Status::Code::kInvalidArgument);
  options = ConvertOptions();
  options.compression_level = 99;
  EXPECT_FALSE(Convert(source, dir.File("b.qcow2"), options).ok());
  struct stat st {};
  EXPECT_NE(stat(dir.File("a.qcow2").c_str(), &st), 0);
  EXPECT_NE(stat(dir.File("b.qcow2").c_str(), &st), 0);
}

// Forwards to the real file and raises `cancel` after `writes` writes.
class CancellingFile final : public io::File {
 public:
  CancellingFile(std::unique_ptr<io::File> base, std::atomic<bool>* cancel, uint64_t writes)
      : base_(std::move(base)), cancel_(cancel), writes_left_(writes) {}
  Result<size_t> ReadAt(uint64_t o, void* b, size_t l) override { return base_->ReadAt(o, b, l); }
  Status WriteAt(uint64_t o, const void* b, size_t l) override {
    Count();
    return base_->WriteAt(o, b, l);
  }
  Status ReadBatch(std::span<const io::IoRequest> r) override { return base_->ReadBatch(r); }
  Status WriteBatch(std::span<const io::IoRequest> r) override {
    Count();
    return base_->WriteBatch(r);
  }
  Status Sync() override { return base_->Sync(); }
  Result<uint64_t> Size() override { return base_->Size(); }
  Status Truncate(uint64_t s) override { return base_->Truncate(s); }
  Status DropCache(uint64_t o, uint64_t l) override { return base_->DropCache(o, l); }
  Result<uint64_t> NextData(uint64_t o) override { return base_->NextData(o); }
  Result<uint64_t> NextHole(uint64_t o) override { return base_->NextHole(o); }
  bool direct_io() const override { return base_->direct_io(); }
  size_t alignment() const override { return base_->alignment(); }
  const std::string& path() const override { return base_->path(); }

 private:
  void Count() {
    if (writes_left_.fetch_sub(1) == 1) cancel_->store(true);
  }
  std::unique_ptr<io::File> base_;
  std::atomic<bool>* cancel_;
  std::atomic<int64_t> writes_left_;
};

TEST(ConvertTest, CancelMidWayLeavesNoTargetAndAConsistentIncompletePartialImage) {
  ASSERT_TRUE(testing::HaveQemu());
  TempDir dir;
  const std::string source = dir.File("s.raw");
  const std::string target = dir.File("t.qcow2");
  // Workers write runs of up to 1 MiB of guest clusters with one write each (the cache is
  // off): 32 MiB make far more writes than the 10 after which the cancel comes.
  const uint64_t size = 32 * kMiB;
  testing::WriteRawImage(source, size, DataKind::kText, 3);
  std::atomic<bool> cancel{false};
  ConvertOptions options;
  options.workers = 2;
  options.cancel = &cancel;
  options.target_io.write_cache = IoOptions::WriteCache::kOff;  // a write per run, no cache
  options.wrap_target_file = [&](std::unique_ptr<io::File> file) -> std::unique_ptr<io::File> {
    return std::make_unique<CancellingFile>(std::move(file), &cancel, 10);
  };
  Result<ConvertStats> stats = Convert(source, target, options);
  ASSERT_FALSE(stats.ok());
  EXPECT_EQ(stats.status().code(), Status::Code::kInterrupted) << stats.status().ToString();
  // Nothing at the target; the work so far in the partial image, marked incomplete.
  EXPECT_NE(access(target.c_str(), F_OK), 0) << "an interrupted conversion created the target";
  const std::string partial = PartialTargetPath(target);
  Result<ImageInfo> info = ReadImageInfo(partial);
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_TRUE(info->dirty);
  testing::CommandResult check = testing::QemuImgCheck(partial);
  EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.output;  // no corruption
}

TEST(ConvertTest, FullDiskUnderTheTargetFailsCleanly) {
  TempDir dir;
  const std::string source = dir.File("s.raw");
  const std::string target = dir.File("t.qcow2");
  testing::WriteRawImage(source, 8 * kMiB, DataKind::kMixed, 4);
  for (bool out_of_order : {true, false}) {
    auto controller = std::make_shared<io::FaultController>();
    controller->FailNth(io::FaultController::Op::kWrite, 5, ENOSPC);
    ConvertOptions options;
    options.workers = 4;
    options.out_of_order = out_of_order;
    options.overwrite = true;
    options.target_io.write_cache = IoOptions::WriteCache::kOff;
    options.wrap_target_file = [&](std::unique_ptr<io::File> file) {
      return io::MakeFaultInjectingFile(std::move(file), controller);
    };
    Result<ConvertStats> stats = Convert(source, target, options);
    ASSERT_FALSE(stats.ok());
    EXPECT_EQ(stats.status().code(), Status::Code::kNoSpace) << stats.status().ToString();
    EXPECT_NE(stats.status().message().find(target), std::string::npos);
    EXPECT_TRUE(controller->fired());
    // Nothing at the target; the partial image never looks complete: either its header is
    // not there or its dirty bit is set.
    EXPECT_NE(access(target.c_str(), F_OK), 0) << "a failed conversion created the target";
    Result<ImageInfo> info = ReadImageInfo(PartialTargetPath(target));
    if (info.ok()) {
      EXPECT_TRUE(info->dirty);
    }
  }
}

}  // namespace
}  // namespace zqcow
