// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// QEMU's image locks between two opens of one file in this process (OFD locks conflict
// between open file descriptions, whoever owns them). tests/lock_test.cc checks them
// against qemu-io, qemu-img and qemu-nbd.

#include "io/image_lock.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "io/file.h"
#include "testing/test_util.h"

namespace zqcow::io {
namespace {

using ::zqcow::testing::ReadWholeFile;
using ::zqcow::testing::TempDir;
using ::zqcow::testing::WriteWholeFile;

const std::string kWriteConflict = "Failed to get \"write\" lock";
const std::string kSharedWriteConflict = "Failed to get shared \"write\" lock";

FileOptions Options(ImageLock lock, bool writable = false) {
  FileOptions options;
  options.writable = writable;
  options.lock = lock;
  return options;
}

class ImageLockTest : public ::testing::Test {
 protected:
  void SetUp() override { WriteWholeFile(path_, std::vector<uint8_t>(4096, 0xab)); }

  std::unique_ptr<File> Open(const FileOptions& options) {
    Result<std::unique_ptr<File>> file = OpenFile(path_, options);
    EXPECT_TRUE(file.ok()) << file.status().ToString();
    return file.ok() ? std::move(file).value() : nullptr;
  }
  // The open fails with a message holding `conflict` and QEMU's question about the path.
  void ExpectRefused(const FileOptions& options, const std::string& conflict) {
    Result<std::unique_ptr<File>> file = OpenFile(path_, options);
    ASSERT_FALSE(file.ok());
    const std::string& message = file.status().message();
    EXPECT_NE(message.find(path_ + ": " + conflict), std::string::npos) << message;
    EXPECT_NE(message.find("Is another process using the image [" + path_ + "]?"),
              std::string::npos)
        << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }

  TempDir dir_;
  const std::string path_ = dir_.File("image");
};

TEST_F(ImageLockTest, ReadersShare) {
  auto a = Open(Options(ImageLock::kRead));
  auto b = Open(Options(ImageLock::kAuto));  // read-only: kRead
  EXPECT_NE(a, nullptr);
  EXPECT_NE(b, nullptr);
}

TEST_F(ImageLockTest, AWriterIsRefusedBesideAReader) {
  auto reader = Open(Options(ImageLock::kRead));
  ExpectRefused(Options(ImageLock::kWrite, true), kWriteConflict);
  ExpectRefused(Options(ImageLock::kAuto, true), kWriteConflict);  // writable: kWrite
}

TEST_F(ImageLockTest, AReaderIsRefusedBesideAWriterUnlessItShares) {
  auto writer = Open(Options(ImageLock::kAuto, true));
  ExpectRefused(Options(ImageLock::kRead), kSharedWriteConflict);
  ExpectRefused(Options(ImageLock::kAuto), kSharedWriteConflict);
  EXPECT_NE(Open(Options(ImageLock::kShared)), nullptr);
}

TEST_F(ImageLockTest, TwoWritersExcludeEachOther) {
  auto writer = Open(Options(ImageLock::kWrite, true));
  ExpectRefused(Options(ImageLock::kWrite, true), kWriteConflict);
}

TEST_F(ImageLockTest, ASharingReaderDoesNotStopAWriter) {
  auto shared = Open(Options(ImageLock::kShared));
  EXPECT_NE(Open(Options(ImageLock::kWrite, true)), nullptr);
}

TEST_F(ImageLockTest, ClosingReleasesTheLocks) {
  auto writer = Open(Options(ImageLock::kWrite, true));
  writer.reset();
  EXPECT_NE(Open(Options(ImageLock::kRead)), nullptr);
}

TEST_F(ImageLockTest, ARefusedTruncatingOpenLeavesTheFileAlone) {
  auto reader = Open(Options(ImageLock::kRead));
  FileOptions options = Options(ImageLock::kAuto, true);
  options.create = true;
  options.truncate = true;
  ExpectRefused(options, kWriteConflict);
  EXPECT_EQ(ReadWholeFile(path_), std::vector<uint8_t>(4096, 0xab));
  reader.reset();
  auto truncated = Open(options);
  ASSERT_NE(truncated, nullptr);
  Result<uint64_t> size = truncated->Size();
  ASSERT_TRUE(size.ok());
  EXPECT_EQ(*size, 0u);
}

TEST_F(ImageLockTest, CheckNotInUseSeesReadersAndWritersButNotSharingReaders) {
  EXPECT_TRUE(CheckNotInUse(path_).ok());
  EXPECT_TRUE(CheckNotInUse(dir_.File("missing")).ok());
  {
    auto shared = Open(Options(ImageLock::kShared));
    EXPECT_TRUE(CheckNotInUse(path_).ok());
  }
  {
    auto reader = Open(Options(ImageLock::kRead));
    Status status = CheckNotInUse(path_);
    EXPECT_NE(status.message().find(kWriteConflict), std::string::npos) << status.ToString();
  }
  {
    auto writer = Open(Options(ImageLock::kWrite, true));
    Status status = CheckNotInUse(path_);
    EXPECT_NE(status.message().find(kWriteConflict), std::string::npos) << status.ToString();
  }
  EXPECT_TRUE(CheckNotInUse(path_).ok());
}

TEST_F(ImageLockTest, LocksTheBytesQemuLocks) {
  // Byte 100 + i: permission i used; 200 + i: not shared (0 read, 1 write, 3 resize).
  auto held = [&](off_t byte) {
    int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    struct flock lock {};
    lock.l_type = F_WRLCK;
    lock.l_whence = SEEK_SET;
    lock.l_start = byte;
    lock.l_len = 1;
    EXPECT_EQ(::fcntl(fd, F_OFD_GETLK, &lock), 0);
    ::close(fd);
    return lock.l_type != F_UNLCK;
  };
  auto bytes_held = [&]() {
    std::vector<off_t> bytes;
    for (off_t byte = 100; byte < 205; ++byte) {
      if (byte == 105) byte = 200;
      if (held(byte)) bytes.push_back(byte);
    }
    return bytes;
  };
  {
    auto reader = Open(Options(ImageLock::kRead));
    EXPECT_EQ(bytes_held(), (std::vector<off_t>{100, 201, 203}));
  }
  {
    auto writer = Open(Options(ImageLock::kWrite, true));
    EXPECT_EQ(bytes_held(), (std::vector<off_t>{100, 101, 103, 201, 203}));
  }
  {
    auto shared = Open(Options(ImageLock::kShared));
    EXPECT_EQ(bytes_held(), (std::vector<off_t>{100}));
  }
}

}  // namespace
}  // namespace zqcow::io
