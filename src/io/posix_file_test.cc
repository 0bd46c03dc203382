// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "io/aligned_buffer.h"
#include "io/file.h"
#include "io/uring_batch.h"
#include "testing/test_util.h"

namespace zqcow::io {
namespace {

using ::zqcow::testing::DataKind;
using ::zqcow::testing::MakeData;
using ::zqcow::testing::ReadWholeFile;
using ::zqcow::testing::TempDir;
using ::zqcow::testing::WriteWholeFile;

constexpr size_t kKiB = 1024;
constexpr size_t kMiB = 1024 * kKiB;

FileOptions WriteOptions(bool direct) {
  FileOptions options;
  options.writable = true;
  options.create = true;
  options.truncate = true;
  options.direct_io = direct;
  return options;
}

std::unique_ptr<File> Open(const std::string& path, const FileOptions& options) {
  Result<std::unique_ptr<File>> file = OpenFile(path, options);
  EXPECT_TRUE(file.ok()) << file.status().ToString();
  return file.ok() ? std::move(file).value() : nullptr;
}

// Sets or clears ZQCOW_DISABLE_IO_URING for the lifetime of the object.
class ScopedDisableIoUring {
 public:
  ScopedDisableIoUring() { setenv("ZQCOW_DISABLE_IO_URING", "1", 1); }
  ~ScopedDisableIoUring() { unsetenv("ZQCOW_DISABLE_IO_URING"); }
};

// The open flags (fdinfo "flags:", octal) of this process's descriptor for `path`.
long OpenFlagsOf(const std::string& path) {
  for (int fd = 0; fd < 1024; ++fd) {
    char link[4096];
    const std::string proc = "/proc/self/fd/" + std::to_string(fd);
    const ssize_t n = readlink(proc.c_str(), link, sizeof(link) - 1);
    if (n <= 0 || std::string(link, static_cast<size_t>(n)) != path) continue;
    const std::vector<uint8_t> info = ReadWholeFile("/proc/self/fdinfo/" + std::to_string(fd));
    const std::string text(info.begin(), info.end());
    const size_t at = text.find("flags:");
    if (at != std::string::npos) return std::strtol(text.c_str() + at + 6, nullptr, 8);
  }
  return -1;
}

TEST(PosixFileTest, SyncWritesOpensWithODsync) {
  TempDir dir;
  const std::string path = dir.File("sync.bin");
  FileOptions options = WriteOptions(false);
  auto plain = Open(path, options);
  ASSERT_NE(plain, nullptr);
  EXPECT_EQ(OpenFlagsOf(path) & O_DSYNC, 0);
  plain.reset();
  options.sync_writes = true;
  auto synced = Open(path, options);
  ASSERT_NE(synced, nullptr);
  EXPECT_EQ(OpenFlagsOf(path) & O_DSYNC, O_DSYNC);
}

TEST(PosixFileTest, BufferedRoundTripAtUnalignedOffsets) {
  TempDir dir;
  const std::string path = dir.File("buffered.bin");
  auto file = Open(path, WriteOptions(false));
  ASSERT_NE(file, nullptr);
  EXPECT_FALSE(file->direct_io());
  EXPECT_EQ(file->alignment(), 1u);
  EXPECT_EQ(file->path(), path);

  const std::vector<uint8_t> first = MakeData(DataKind::kRandom, 1000, 1);
  const std::vector<uint8_t> second = MakeData(DataKind::kText, 3333, 2);
  ASSERT_TRUE(file->WriteAt(7, first.data(), first.size()).ok());
  ASSERT_TRUE(file->WriteAt(5000, second.data(), second.size()).ok());
  ASSERT_TRUE(file->Sync().ok());
  Result<uint64_t> size = file->Size();
  ASSERT_TRUE(size.ok());
  EXPECT_EQ(*size, 5000u + second.size());

  std::vector<uint8_t> expected(5000 + second.size(), 0);
  std::memcpy(expected.data() + 7, first.data(), first.size());
  std::memcpy(expected.data() + 5000, second.data(), second.size());
  EXPECT_EQ(ReadWholeFile(path), expected);

  std::vector<uint8_t> back(second.size());
  Result<size_t> read = file->ReadAt(5000, back.data(), back.size());
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  EXPECT_EQ(*read, second.size());
  EXPECT_EQ(back, second);
}

TEST(PosixFileTest, DirectRoundTripDiscoversAlignment) {
  TempDir dir;
  const std::string path = dir.File("direct.bin");
  auto file = Open(path, WriteOptions(true));
  ASSERT_NE(file, nullptr);
  EXPECT_TRUE(file->direct_io());
  const size_t alignment = file->alignment();
  EXPECT_GT(alignment, 1u);
  EXPECT_EQ(alignment & (alignment - 1), 0u) << "alignment must be a power of two";
  EXPECT_LE(alignment, kBufferAlignment);

  const std::vector<uint8_t> data = MakeData(DataKind::kMixed, 256 * kKiB, 3);
  AlignedBuffer buffer(data.size());
  std::memcpy(buffer.data(), data.data(), data.size());
  ASSERT_TRUE(file->WriteAt(64 * kKiB, buffer.data(), buffer.size()).ok());
  ASSERT_TRUE(file->Sync().ok());

  AlignedBuffer back(data.size());
  Result<size_t> read = file->ReadAt(64 * kKiB, back.data(), back.size());
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  EXPECT_EQ(*read, data.size());
  EXPECT_EQ(std::memcmp(back.data(), data.data(), data.size()), 0);

  std::vector<uint8_t> expected(64 * kKiB, 0);
  expected.insert(expected.end(), data.begin(), data.end());
  EXPECT_EQ(ReadWholeFile(path), expected);
  EXPECT_TRUE(file->DropCache(0, 0).ok());
}

TEST(PosixFileDeathTest, UnalignedDirectTransferAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  TempDir dir;
  auto file = Open(dir.File("unaligned.bin"), WriteOptions(true));
  ASSERT_NE(file, nullptr);
  AlignedBuffer buffer(2 * kBufferAlignment);
  EXPECT_DEATH((void)file->WriteAt(1, buffer.data(), kBufferAlignment), "unaligned O_DIRECT write");
  EXPECT_DEATH((void)file->WriteAt(0, buffer.data(), kBufferAlignment - 1),
               "unaligned O_DIRECT write");
  EXPECT_DEATH((void)file->WriteAt(0, buffer.data() + 1, kBufferAlignment),
               "unaligned O_DIRECT write");
  EXPECT_DEATH((void)file->ReadAt(0, buffer.data() + 1, kBufferAlignment),
               "unaligned O_DIRECT read");
  const IoRequest request{1, buffer.data(), kBufferAlignment};
  EXPECT_DEATH((void)file->WriteBatch(std::span<const IoRequest>(&request, 1)),
               "unaligned O_DIRECT write");
}

TEST(PosixFileTest, ReadPastEndOfFileZeroFills) {
  TempDir dir;
  const std::string path = dir.File("short.bin");
  const std::vector<uint8_t> data = MakeData(DataKind::kRandom, 6000, 4);
  WriteWholeFile(path, data);

  for (bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "direct" : "buffered");
    FileOptions options;
    options.direct_io = direct;
    auto file = Open(path, options);
    ASSERT_NE(file, nullptr);
    AlignedBuffer buffer(8192);
    std::memset(buffer.data(), 0xAA, buffer.size());
    Result<size_t> read = file->ReadAt(4096, buffer.data(), buffer.size());
    ASSERT_TRUE(read.ok()) << read.status().ToString();
    EXPECT_EQ(*read, data.size() - 4096);
    EXPECT_EQ(std::memcmp(buffer.data(), data.data() + 4096, *read), 0);
    for (size_t i = *read; i < buffer.size(); ++i) ASSERT_EQ(buffer.data()[i], 0) << i;

    std::memset(buffer.data(), 0xAA, buffer.size());
    read = file->ReadAt(16384, buffer.data(), buffer.size());
    ASSERT_TRUE(read.ok()) << read.status().ToString();
    EXPECT_EQ(*read, 0u);
    for (size_t i = 0; i < buffer.size(); ++i) ASSERT_EQ(buffer.data()[i], 0) << i;
  }
}

TEST(PosixFileTest, ReadBatchPastEndOfFileZeroFills) {
  TempDir dir;
  const std::string path = dir.File("short-batch.bin");
  const std::vector<uint8_t> data = MakeData(DataKind::kRandom, 6000, 6);
  WriteWholeFile(path, data);
  constexpr size_t kLength = 8192;

  for (bool direct : {false, true}) {
    for (bool use_io_uring : {false, true}) {
      SCOPED_TRACE(std::string(direct ? "direct" : "buffered") +
                   (use_io_uring ? " io_uring" : " loop"));
      FileOptions options;
      options.direct_io = direct;
      options.use_io_uring = use_io_uring;
      auto file = Open(path, options);
      ASSERT_NE(file, nullptr);
      // Straddling end of file at an unaligned size, and wholly past it.
      AlignedBuffer straddle(kLength);
      AlignedBuffer past(kLength);
      std::memset(straddle.data(), 0xAA, kLength);
      std::memset(past.data(), 0xAA, kLength);
      const std::vector<IoRequest> requests = {{4096, straddle.data(), kLength},
                                               {16384, past.data(), kLength}};
      Status status = file->ReadBatch(requests);
      ASSERT_TRUE(status.ok()) << status.ToString();
      const size_t from_file = data.size() - 4096;
      EXPECT_EQ(std::memcmp(straddle.data(), data.data() + 4096, from_file), 0);
      for (size_t i = from_file; i < kLength; ++i) ASSERT_EQ(straddle.data()[i], 0) << i;
      for (size_t i = 0; i < kLength; ++i) ASSERT_EQ(past.data()[i], 0) << i;
    }
  }
}

TEST(PosixFileTest, NextDataAndNextHoleFindDataIsland) {
  TempDir dir;
  auto file = Open(dir.File("sparse.bin"), WriteOptions(false));
  ASSERT_NE(file, nullptr);
  constexpr uint64_t kSize = 16 * kMiB;
  constexpr uint64_t kIsland = 8 * kMiB;
  constexpr size_t kIslandLength = 1 * kMiB;
  ASSERT_TRUE(file->Truncate(kSize).ok());
  const std::vector<uint8_t> data = MakeData(DataKind::kRandom, kIslandLength, 5);
  ASSERT_TRUE(file->WriteAt(kIsland, data.data(), data.size()).ok());
  ASSERT_TRUE(file->Sync().ok());

  auto at = [](Result<uint64_t> result) {
    EXPECT_TRUE(result.ok()) << result.status().ToString();
    return result.ok() ? *result : UINT64_MAX;
  };
  EXPECT_EQ(at(file->NextData(0)), kIsland);
  EXPECT_EQ(at(file->NextHole(0)), 0u);
  EXPECT_EQ(at(file->NextData(kIsland + 4096)), kIsland + 4096);
  EXPECT_EQ(at(file->NextHole(kIsland)), kIsland + kIslandLength);
  // No data after the island: the answer is end of file.
  EXPECT_EQ(at(file->NextData(kIsland + kIslandLength)), kSize);
  EXPECT_EQ(at(file->NextData(kSize)), kSize);
  EXPECT_EQ(at(file->NextHole(kSize)), kSize);
}

// Non-overlapping requests of varying sizes in shuffled order; some extend the file.
struct BatchPlan {
  std::vector<IoRequest> requests;
  std::vector<AlignedBuffer> buffers;
  uint64_t end = 0;
};

BatchPlan MakeBatchPlan(size_t count, size_t unit, uint64_t seed) {
  std::mt19937_64 random(seed);
  BatchPlan plan;
  uint64_t offset = 0;
  for (size_t i = 0; i < count; ++i) {
    offset += unit * (random() % 3);  // leave gaps now and then
    const size_t length = unit * (1 + random() % 8);
    std::vector<uint8_t> data = MakeData(DataKind::kRandom, length, seed * 1000 + i);
    AlignedBuffer buffer(length);
    std::memcpy(buffer.data(), data.data(), length);
    plan.requests.push_back({offset, buffer.data(), length});
    plan.buffers.push_back(std::move(buffer));
    offset += length;
  }
  plan.end = offset;
  std::shuffle(plan.requests.begin(), plan.requests.end(), random);
  return plan;
}

std::vector<uint8_t> ExpectedContent(const BatchPlan& plan) {
  std::vector<uint8_t> content(plan.end, 0);
  for (const IoRequest& request : plan.requests) {
    std::memcpy(content.data() + request.offset, request.buffer, request.length);
  }
  return content;
}

// Writes the plan, then reads it back (plus requests past end of file) in one batch.
void RunBatches(const std::string& path, bool direct, bool use_io_uring, const BatchPlan& plan) {
  FileOptions options = WriteOptions(direct);
  options.use_io_uring = use_io_uring;
  auto file = Open(path, options);
  ASSERT_NE(file, nullptr);
  Status written = file->WriteBatch(plan.requests);
  ASSERT_TRUE(written.ok()) << written.ToString();
  ASSERT_TRUE(file->Sync().ok());

  std::vector<AlignedBuffer> back;
  std::vector<IoRequest> reads;
  for (const IoRequest& request : plan.requests) {
    back.emplace_back(request.length);
    std::memset(back.back().data(), 0xCC, request.length);
    reads.push_back({request.offset, back.back().data(), request.length});
  }
  // Straddling end of file, and wholly past it.
  constexpr size_t kTail = 16 * kKiB;
  back.emplace_back(kTail);
  std::memset(back.back().data(), 0xCC, kTail);
  reads.push_back({plan.end - kTail / 2, back.back().data(), kTail});
  back.emplace_back(kTail);
  std::memset(back.back().data(), 0xCC, kTail);
  reads.push_back({plan.end + kTail, back.back().data(), kTail});

  Status read = file->ReadBatch(reads);
  ASSERT_TRUE(read.ok()) << read.ToString();
  for (size_t i = 0; i < plan.requests.size(); ++i) {
    ASSERT_EQ(std::memcmp(back[i].data(), plan.requests[i].buffer, plan.requests[i].length), 0)
        << "request " << i;
  }
  const std::vector<uint8_t> expected = ExpectedContent(plan);
  const uint8_t* straddle = back[plan.requests.size()].data();
  EXPECT_EQ(std::memcmp(straddle, expected.data() + plan.end - kTail / 2, kTail / 2), 0);
  for (size_t i = kTail / 2; i < kTail; ++i) ASSERT_EQ(straddle[i], 0) << i;
  const uint8_t* past = back[plan.requests.size() + 1].data();
  for (size_t i = 0; i < kTail; ++i) ASSERT_EQ(past[i], 0) << i;
}

TEST(PosixFileTest, IoUringAvailabilityFollowsEnvironment) {
  {
    ScopedDisableIoUring disable;
    EXPECT_FALSE(IoUringAvailable());
  }
  if (!IoUringAvailable()) GTEST_SKIP() << "io_uring cannot be set up on this kernel";
  EXPECT_TRUE(IoUringAvailable());
}

TEST(PosixFileTest, BatchesGiveSameFilesThroughIoUringAndFallback) {
  if (!IoUringAvailable()) GTEST_SKIP() << "io_uring cannot be set up on this kernel";
  TempDir dir;
  // More requests than the ring holds, so the io_uring path goes in rounds.
  constexpr size_t kRequests = kUringQueueDepth * 3 + 5;
  for (bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "direct" : "buffered");
    const BatchPlan plan = MakeBatchPlan(kRequests, direct ? 4096 : 1000, direct ? 7 : 8);
    const std::string uring_path = dir.File(direct ? "uring-direct" : "uring-buffered");
    const std::string option_path = dir.File(direct ? "loop-direct" : "loop-buffered");
    const std::string env_path = dir.File(direct ? "env-direct" : "env-buffered");
    RunBatches(uring_path, direct, /*use_io_uring=*/true, plan);
    RunBatches(option_path, direct, /*use_io_uring=*/false, plan);
    {
      ScopedDisableIoUring disable;
      RunBatches(env_path, direct, /*use_io_uring=*/true, plan);
    }
    const std::vector<uint8_t> expected = ExpectedContent(plan);
    EXPECT_EQ(ReadWholeFile(uring_path), expected);
    EXPECT_EQ(ReadWholeFile(option_path), expected);
    EXPECT_EQ(ReadWholeFile(env_path), expected);
  }
}

TEST(PosixFileTest, OpenErrorsNameThePath) {
  TempDir dir;
  const std::string missing = dir.File("missing.bin");
  Result<std::unique_ptr<File>> file = OpenFile(missing, FileOptions{});
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), Status::Code::kNotFound);
  EXPECT_NE(file.status().message().find(missing), std::string::npos) << file.status().message();

  const std::string existing = dir.File("existing.bin");
  WriteWholeFile(existing, {1, 2, 3});
  FileOptions exclusive = WriteOptions(false);
  exclusive.truncate = false;
  exclusive.exclusive = true;
  file = OpenFile(existing, exclusive);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), Status::Code::kAlreadyExists);
  EXPECT_NE(file.status().message().find(existing), std::string::npos);
  EXPECT_EQ(ReadWholeFile(existing), (std::vector<uint8_t>{1, 2, 3}));

  file = OpenFile(dir.path(), FileOptions{});
  ASSERT_FALSE(file.ok());
  EXPECT_NE(file.status().message().find(dir.path()), std::string::npos);
}

TEST(PosixFileTest, DirectIoRefusedByFileSystemIsNotSupported) {
  // procfs refuses O_DIRECT at open with EINVAL, like any file system without direct I/O.
  const std::string path = "/proc/version";
  FileOptions options;
  options.direct_io = true;
  Result<std::unique_ptr<File>> file = OpenFile(path, options);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), Status::Code::kNotSupported);
  EXPECT_NE(file.status().message().find(path), std::string::npos) << file.status().message();
  EXPECT_NE(file.status().message().find("O_DIRECT"), std::string::npos);
  options.direct_io = false;
  EXPECT_TRUE(OpenFile(path, options).ok());
}

TEST(PosixFileTest, WriteToReadOnlyFileFails) {
  TempDir dir;
  const std::string path = dir.File("readonly.bin");
  WriteWholeFile(path, std::vector<uint8_t>(4096, 7));
  for (bool use_io_uring : {false, true}) {
    SCOPED_TRACE(use_io_uring ? "io_uring" : "loop");
    FileOptions options;
    options.use_io_uring = use_io_uring;
    auto file = Open(path, options);
    ASSERT_NE(file, nullptr);
    std::vector<uint8_t> data(512, 1);
    Status status = file->WriteAt(100, data.data(), data.size());
    ASSERT_FALSE(status.ok());
    EXPECT_EQ(status.error_number(), EBADF);
    EXPECT_NE(status.message().find(path + ": write of 512 bytes at offset 100 failed"),
              std::string::npos)
        << status.message();

    std::vector<IoRequest> requests(kUringQueueDepth + 1, IoRequest{0, data.data(), data.size()});
    for (size_t i = 0; i < requests.size(); ++i) requests[i].offset = i * data.size();
    status = file->WriteBatch(requests);
    ASSERT_FALSE(status.ok());
    EXPECT_EQ(status.error_number(), EBADF);
    EXPECT_NE(status.message().find(path), std::string::npos) << status.message();
  }
  EXPECT_EQ(ReadWholeFile(path), std::vector<uint8_t>(4096, 7));
}

TEST(PosixFileTest, TruncateResizes) {
  TempDir dir;
  auto file = Open(dir.File("resize.bin"), WriteOptions(false));
  ASSERT_NE(file, nullptr);
  ASSERT_TRUE(file->Truncate(123457).ok());
  EXPECT_EQ(*file->Size(), 123457u);
  ASSERT_TRUE(file->Truncate(10).ok());
  EXPECT_EQ(*file->Size(), 10u);
}

TEST(PosixFileTest, ConcurrentWritersAndReaders) {
  TempDir dir;
  const std::string path = dir.File("concurrent.bin");
  auto file = Open(path, WriteOptions(true));
  ASSERT_NE(file, nullptr);
  constexpr size_t kThreads = 4;
  constexpr size_t kChunk = 64 * kKiB;
  constexpr size_t kChunksPerThread = 8;
  std::vector<std::thread> threads;
  std::vector<Status> results(kThreads);
  for (size_t t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      // Thread t owns chunks t, t + kThreads, ...: half written alone, half in one batch.
      std::vector<AlignedBuffer> buffers;
      std::vector<IoRequest> batch;
      for (size_t i = 0; i < kChunksPerThread; ++i) {
        const uint64_t offset = (i * kThreads + t) * kChunk;
        buffers.emplace_back(kChunk);
        std::memset(buffers.back().data(), static_cast<int>(1 + t * kChunksPerThread + i), kChunk);
        if (i % 2 == 0) {
          Status status = file->WriteAt(offset, buffers.back().data(), kChunk);
          if (!status.ok()) results[t] = status;
        } else {
          batch.push_back({offset, buffers.back().data(), kChunk});
        }
      }
      Status status = file->WriteBatch(batch);
      if (!status.ok()) results[t] = status;
      AlignedBuffer back(kChunk);
      for (size_t i = 0; i < kChunksPerThread && results[t].ok(); ++i) {
        Result<size_t> read = file->ReadAt((i * kThreads + t) * kChunk, back.data(), kChunk);
        if (!read.ok()) {
          results[t] = read.status();
        } else if (std::memcmp(back.data(), buffers[i].data(), kChunk) != 0) {
          results[t] = Status::Corruption("chunk read back differs");
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (const Status& status : results) EXPECT_TRUE(status.ok()) << status.ToString();
  const std::vector<uint8_t> content = ReadWholeFile(path);
  ASSERT_EQ(content.size(), kThreads * kChunksPerThread * kChunk);
  for (size_t chunk = 0; chunk < kThreads * kChunksPerThread; ++chunk) {
    const size_t t = chunk % kThreads;
    const size_t i = chunk / kThreads;
    EXPECT_EQ(content[chunk * kChunk], 1 + t * kChunksPerThread + i);
    EXPECT_EQ(content[chunk * kChunk + kChunk - 1], 1 + t * kChunksPerThread + i);
  }
}

}  // namespace
}  // namespace zqcow::io
