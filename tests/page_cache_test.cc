// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// With O_DIRECT on both ends (-T none -t none) a conversion must not fill the page cache:
// afterwards, less than 1% of the target's and of the source's pages are resident. The
// buffered run is the control that shows the measurement can see cached pages at all.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "testing/test_util.h"

namespace zqcow {
namespace {

using testing::RunCommand;
using testing::ShellQuote;
using testing::TempDir;

constexpr uint64_t kMiB = 1 << 20;

// Fraction of the file's pages that are in the page cache (mincore), 0..1.
double ResidentFraction(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY);
  EXPECT_GE(fd, 0) << path;
  struct stat st {};
  fstat(fd, &st);
  const size_t size = static_cast<size_t>(st.st_size);
  if (size == 0) {
    close(fd);
    return 0;
  }
  void* map = mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  close(fd);
  EXPECT_NE(map, MAP_FAILED);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> vec((size + page - 1) / page);
  EXPECT_EQ(mincore(map, size, vec.data()), 0);
  munmap(map, size);
  size_t resident = 0;
  for (unsigned char v : vec) resident += v & 1;
  return static_cast<double>(resident) / static_cast<double>(vec.size());
}

// Writes the source, then pushes it to disk and out of the page cache.
void MakeUncachedSource(const std::string& path) {
  testing::WriteRawImage(path, 32 * kMiB, testing::DataKind::kMixed, /*seed=*/7);
  int fd = open(path.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(fdatasync(fd), 0);
  ASSERT_EQ(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
  close(fd);
}

TEST(PageCacheTest, DirectConversionLeavesAlmostNothingCached) {
  TempDir dir;
  const std::string source = dir.File("source.raw");
  const std::string target = dir.File("target.qcow2");
  MakeUncachedSource(source);
  ASSERT_LT(ResidentFraction(source), 0.01) << "the source did not leave the page cache";

  auto run = RunCommand(testing::ZqcowBinary() + " convert -c -T none -t none " +
                        ShellQuote(source) + " " + ShellQuote(target));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  EXPECT_LT(ResidentFraction(target), 0.01);
  EXPECT_LT(ResidentFraction(source), 0.01);
  EXPECT_EQ(testing::QemuImgCompare(source, "raw", target, "qcow2").exit_code, 0);
}

TEST(PageCacheTest, BufferedConversionIsSeenCachedControl) {
  TempDir dir;
  const std::string source = dir.File("source.raw");
  const std::string target = dir.File("target.qcow2");
  MakeUncachedSource(source);

  auto run = RunCommand(testing::ZqcowBinary() + " convert -c -T writeback -t writeback " +
                        ShellQuote(source) + " " + ShellQuote(target));
  ASSERT_EQ(run.exit_code, 0) << run.output;
  // The measurement sees what buffered I/O leaves behind.
  EXPECT_GT(ResidentFraction(target), 0.5);
}

}  // namespace
}  // namespace zqcow
