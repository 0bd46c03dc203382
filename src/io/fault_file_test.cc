// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "io/fault_file.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "io/aligned_buffer.h"
#include "io/file.h"
#include "testing/test_util.h"

namespace zqcow::io {
namespace {

using Op = FaultController::Op;
using ::zqcow::testing::DataKind;
using ::zqcow::testing::MakeData;
using ::zqcow::testing::ReadWholeFile;
using ::zqcow::testing::TempDir;
using ::zqcow::testing::WriteWholeFile;

constexpr size_t kKiB = 1024;

std::unique_ptr<File> OpenBase(const std::string& path, bool direct) {
  FileOptions options;
  options.writable = true;
  options.create = true;
  options.direct_io = direct;
  Result<std::unique_ptr<File>> file = OpenFile(path, options);
  EXPECT_TRUE(file.ok()) << file.status().ToString();
  return file.ok() ? std::move(file).value() : nullptr;
}

struct Wrapped {
  std::shared_ptr<FaultController> controller = std::make_shared<FaultController>();
  std::unique_ptr<File> file;
};

Wrapped OpenWrapped(const std::string& path, bool direct = false) {
  Wrapped wrapped;
  std::unique_ptr<File> base = OpenBase(path, direct);
  if (base != nullptr) wrapped.file = MakeFaultInjectingFile(std::move(base), wrapped.controller);
  return wrapped;
}

TEST(FaultFileTest, FailNthWriteFailsThatOneAndEveryLaterOne) {
  TempDir dir;
  const std::string path = dir.File("writes.bin");
  Wrapped wrapped = OpenWrapped(path);
  ASSERT_NE(wrapped.file, nullptr);
  File& file = *wrapped.file;
  FaultController& controller = *wrapped.controller;

  const uint8_t byte = 0x5A;
  ASSERT_TRUE(file.WriteAt(0, &byte, 1).ok());  // before arming: not counted towards n
  controller.FailNth(Op::kWrite, 3, EIO);
  EXPECT_TRUE(file.WriteAt(1, &byte, 1).ok());
  EXPECT_TRUE(file.WriteAt(2, &byte, 1).ok());
  EXPECT_FALSE(controller.fired());
  Status third = file.WriteAt(3, &byte, 1);
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.code(), Status::Code::kIOError);
  EXPECT_EQ(third.error_number(), EIO);
  EXPECT_NE(third.message().find(path + ": write of 1 bytes at offset 3 failed"), std::string::npos)
      << third.message();
  EXPECT_TRUE(controller.fired());
  EXPECT_FALSE(file.WriteAt(4, &byte, 1).ok());
  EXPECT_EQ(controller.count(Op::kWrite), 5u);
  EXPECT_EQ(ReadWholeFile(path), std::vector<uint8_t>(3, byte));

  controller.FailNth(Op::kWrite, 0, 0);  // disarm
  EXPECT_TRUE(file.WriteAt(3, &byte, 1).ok());
  // Reads and syncs were never armed.
  uint8_t back = 0;
  EXPECT_TRUE(file.ReadAt(3, &back, 1).ok());
  EXPECT_EQ(back, byte);
  EXPECT_TRUE(file.Sync().ok());
  EXPECT_EQ(controller.count(Op::kRead), 1u);
  EXPECT_EQ(controller.count(Op::kSync), 1u);
}

TEST(FaultFileTest, NoSpaceMapsToNoSpaceCode) {
  TempDir dir;
  Wrapped wrapped = OpenWrapped(dir.File("full.bin"));
  ASSERT_NE(wrapped.file, nullptr);
  wrapped.controller->FailNth(Op::kWrite, 1, ENOSPC);
  const std::vector<uint8_t> data(100, 1);
  Status status = wrapped.file->WriteAt(0, data.data(), data.size());
  EXPECT_EQ(status.code(), Status::Code::kNoSpace);
  EXPECT_TRUE(status.IsNoSpace());

  wrapped.controller->FailNth(Op::kRead, 2, ENOSPC);
  std::vector<uint8_t> back(10);
  EXPECT_TRUE(wrapped.file->ReadAt(0, back.data(), back.size()).ok());
  Result<size_t> read = wrapped.file->ReadAt(0, back.data(), back.size());
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), Status::Code::kNoSpace);
}

TEST(FaultFileTest, FailNthReadAndSyncWithEio) {
  TempDir dir;
  const std::string path = dir.File("read-sync.bin");
  Wrapped wrapped = OpenWrapped(path);
  ASSERT_NE(wrapped.file, nullptr);
  wrapped.controller->FailNth(Op::kRead, 1, EIO);
  wrapped.controller->FailNth(Op::kSync, 2, EIO);
  uint8_t byte = 0;
  Result<size_t> read = wrapped.file->ReadAt(0, &byte, 1);
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().error_number(), EIO);
  EXPECT_NE(read.status().message().find(path), std::string::npos);
  EXPECT_TRUE(wrapped.file->Sync().ok());
  Status sync = wrapped.file->Sync();
  ASSERT_FALSE(sync.ok());
  EXPECT_EQ(sync.code(), Status::Code::kIOError);
  EXPECT_NE(sync.message().find(path), std::string::npos);
}

TEST(FaultFileTest, BatchRequestsCountOneEach) {
  TempDir dir;
  const std::string path = dir.File("batch.bin");
  Wrapped wrapped = OpenWrapped(path);
  ASSERT_NE(wrapped.file, nullptr);
  constexpr size_t kRequests = 5;
  constexpr size_t kLength = 100;
  std::vector<std::vector<uint8_t>> data;
  std::vector<IoRequest> requests;
  for (size_t i = 0; i < kRequests; ++i) {
    data.emplace_back(kLength, static_cast<uint8_t>(i + 1));
    requests.push_back({i * kLength, data.back().data(), kLength});
  }
  wrapped.controller->FailNth(Op::kWrite, 3, EIO);
  Status status = wrapped.file->WriteBatch(requests);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("offset 200"), std::string::npos) << status.message();
  EXPECT_EQ(wrapped.controller->count(Op::kWrite), 3u);
  // The two requests before the failing one reached the file.
  std::vector<uint8_t> expected(kLength, 1);
  expected.insert(expected.end(), kLength, 2);
  EXPECT_EQ(ReadWholeFile(path), expected);

  wrapped.controller->FailNth(Op::kWrite, 0, 0);
  ASSERT_TRUE(wrapped.file->WriteBatch(requests).ok());
  EXPECT_EQ(wrapped.controller->count(Op::kWrite), 3u + kRequests);
  std::vector<uint8_t> back(kRequests * kLength);
  std::vector<IoRequest> reads;
  for (size_t i = 0; i < kRequests; ++i)
    reads.push_back({i * kLength, &back[i * kLength], kLength});
  ASSERT_TRUE(wrapped.file->ReadBatch(reads).ok());
  EXPECT_EQ(wrapped.controller->count(Op::kRead), kRequests);
  EXPECT_EQ(back[4 * kLength], 5);
}

// Random writes, truncates and syncs through the wrapper, mirrored in a model of the file
// as of the last successful sync; Crash() must bring the file back to exactly that model.
void RunCrashModel(bool direct, uint64_t seed) {
  TempDir dir;
  const std::string path = dir.File("crash.bin");
  const std::vector<uint8_t> initial = MakeData(DataKind::kRandom, 40 * kKiB + 123, seed);
  WriteWholeFile(path, initial);
  Wrapped wrapped = OpenWrapped(path, direct);
  ASSERT_NE(wrapped.file, nullptr);
  wrapped.controller->TrackUnsynced(true);
  const size_t unit = direct ? wrapped.file->alignment() : 1;

  std::mt19937_64 random(seed);
  std::vector<uint8_t> current = initial;
  std::vector<uint8_t> synced = initial;
  constexpr int kOperations = 60;
  constexpr uint64_t kMaxOffset = 96 * kKiB;
  for (int op = 0; op < kOperations; ++op) {
    const uint64_t choice = random() % 10;
    if (choice < 6) {
      const uint64_t offset = AlignDown(random() % kMaxOffset, unit);
      const size_t length = std::max<size_t>(unit, AlignDown(1 + random() % (12 * kKiB), unit));
      std::vector<uint8_t> data = MakeData(DataKind::kRandom, length, seed * 1000 + op);
      AlignedBuffer buffer(length);
      std::memcpy(buffer.data(), data.data(), length);
      Status status = wrapped.file->WriteAt(offset, buffer.data(), length);
      ASSERT_TRUE(status.ok()) << status.ToString();
      if (current.size() < offset + length) current.resize(offset + length, 0);
      std::memcpy(current.data() + offset, data.data(), length);
    } else if (choice < 8) {
      const uint64_t size = random() % kMaxOffset;
      ASSERT_TRUE(wrapped.file->Truncate(size).ok());
      current.resize(size, 0);
    } else {
      ASSERT_TRUE(wrapped.file->Sync().ok());
      synced = current;
    }
  }
  // Make sure something is left to undo: a write past the end and a shrink.
  const uint64_t tail = AlignUp(current.size(), unit) + unit;
  AlignedBuffer tail_data(unit);
  std::memset(tail_data.data(), 0xEE, unit);
  ASSERT_TRUE(wrapped.file->WriteAt(tail, tail_data.data(), unit).ok());
  current.resize(tail + unit, 0);
  std::memset(current.data() + tail, 0xEE, unit);
  ASSERT_TRUE(wrapped.file->Truncate(tail + 1).ok());
  current.resize(tail + 1);
  ASSERT_NE(current, synced);
  ASSERT_EQ(ReadWholeFile(path), current);
  wrapped.file.reset();  // the controller outlives the wrapper
  Status crash = wrapped.controller->Crash();
  ASSERT_TRUE(crash.ok()) << crash.ToString();
  EXPECT_EQ(ReadWholeFile(path), synced);
}

TEST(FaultFileTest, CrashRestoresContentAndSizeAtLastSyncBuffered) {
  for (uint64_t seed = 1; seed <= 4; ++seed) {
    SCOPED_TRACE(seed);
    RunCrashModel(/*direct=*/false, seed);
  }
}

TEST(FaultFileTest, CrashRestoresContentAndSizeAtLastSyncDirect) {
  for (uint64_t seed = 11; seed <= 13; ++seed) {
    SCOPED_TRACE(seed);
    RunCrashModel(/*direct=*/true, seed);
  }
}

TEST(FaultFileTest, FailedSyncKeepsWritesUndoable) {
  TempDir dir;
  const std::string path = dir.File("failed-sync.bin");
  Wrapped wrapped = OpenWrapped(path);
  ASSERT_NE(wrapped.file, nullptr);
  wrapped.controller->TrackUnsynced(true);
  const std::vector<uint8_t> first(1000, 1);
  const std::vector<uint8_t> second(500, 2);
  ASSERT_TRUE(wrapped.file->WriteAt(0, first.data(), first.size()).ok());
  ASSERT_TRUE(wrapped.file->Sync().ok());
  wrapped.controller->FailNth(Op::kSync, 1, EIO);
  ASSERT_TRUE(wrapped.file->WriteAt(800, second.data(), second.size()).ok());
  ASSERT_FALSE(wrapped.file->Sync().ok());
  ASSERT_TRUE(wrapped.controller->Crash().ok());
  EXPECT_EQ(ReadWholeFile(path), first);
}

TEST(FaultFileTest, EveryOperationFailsAfterCrash) {
  TempDir dir;
  Wrapped wrapped = OpenWrapped(dir.File("after-crash.bin"));
  ASSERT_NE(wrapped.file, nullptr);
  ASSERT_TRUE(wrapped.controller->Crash().ok());
  File& file = *wrapped.file;
  uint8_t byte = 0;
  EXPECT_EQ(file.WriteAt(0, &byte, 1).error_number(), EIO);
  EXPECT_EQ(file.ReadAt(0, &byte, 1).status().error_number(), EIO);
  EXPECT_EQ(file.Sync().error_number(), EIO);
  EXPECT_EQ(file.Truncate(0).error_number(), EIO);
  EXPECT_EQ(file.Size().status().error_number(), EIO);
  EXPECT_EQ(file.NextData(0).status().error_number(), EIO);
  EXPECT_EQ(file.NextHole(0).status().error_number(), EIO);
  EXPECT_EQ(file.DropCache(0, 0).error_number(), EIO);
  const IoRequest request{0, &byte, 1};
  EXPECT_EQ(file.WriteBatch(std::span<const IoRequest>(&request, 1)).error_number(), EIO);
  EXPECT_EQ(file.ReadBatch(std::span<const IoRequest>(&request, 1)).error_number(), EIO);
  EXPECT_FALSE(wrapped.controller->fired());
}

TEST(FaultFileTest, ConcurrentTrackedWritersThenCrash) {
  TempDir dir;
  const std::string path = dir.File("concurrent.bin");
  Wrapped wrapped = OpenWrapped(path, /*direct=*/true);
  ASSERT_NE(wrapped.file, nullptr);
  wrapped.controller->TrackUnsynced(true);
  constexpr size_t kThreads = 4;
  constexpr size_t kWritesPerThread = 16;
  constexpr size_t kChunk = 4 * kKiB;

  // Phase 1 (synced afterwards) writes value 1 + thread; phase 2 (never synced) overwrites
  // with 100 + thread and extends the file. Threads own disjoint chunks.
  auto run_phase = [&](uint8_t base_value, size_t chunk_offset) {
    std::vector<std::thread> threads;
    std::vector<Status> results(kThreads);
    for (size_t t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        AlignedBuffer buffer(kChunk);
        std::memset(buffer.data(), base_value + static_cast<int>(t), kChunk);
        for (size_t i = 0; i < kWritesPerThread; ++i) {
          const uint64_t offset = (chunk_offset + i * kThreads + t) * kChunk;
          Status status = wrapped.file->WriteAt(offset, buffer.data(), kChunk);
          if (!status.ok()) results[t] = status;
          if (i % 4 == 0) (void)wrapped.controller->count(Op::kWrite);  // racing reader
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    for (const Status& status : results) EXPECT_TRUE(status.ok()) << status.ToString();
  };
  run_phase(1, 0);
  ASSERT_TRUE(wrapped.file->Sync().ok());
  const std::vector<uint8_t> synced = ReadWholeFile(path);
  ASSERT_EQ(synced.size(), kThreads * kWritesPerThread * kChunk);
  run_phase(100, 0);
  run_phase(100, kThreads * kWritesPerThread);  // beyond the synced end
  EXPECT_EQ(wrapped.controller->count(Op::kWrite), 3 * kThreads * kWritesPerThread);
  ASSERT_TRUE(wrapped.controller->Crash().ok());
  EXPECT_EQ(ReadWholeFile(path), synced);
}

}  // namespace
}  // namespace zqcow::io
