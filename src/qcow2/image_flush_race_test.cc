// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Regression: Flush extends the file so the last compressed sector can be read. It once did
// so with Size() then Truncate(high water), which could SHRINK the file below a normal
// cluster whose write (outside the metadata lock) extended the file in between: the L2
// entry then pointed at a hole. A wrapper file widens that window deterministically.

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "io/file.h"
#include "qcow2/qcow2_image.h"
#include "testing/test_util.h"

namespace zqcow::qcow2 {
namespace {

using namespace std::chrono_literals;

// Delays data writes and Size() while `widen` is set, so that a data write is in flight
// between Flush's Size() and its Truncate().
class DelayingFile : public io::File {
 public:
  DelayingFile(std::unique_ptr<io::File> base, std::atomic<bool>* widen)
      : base_(std::move(base)), widen_(widen) {}
  Result<size_t> ReadAt(uint64_t o, void* p, size_t n) override { return base_->ReadAt(o, p, n); }
  Status WriteAt(uint64_t o, const void* p, size_t n) override {
    if (*widen_ && n == kCluster) std::this_thread::sleep_for(100ms);
    return base_->WriteAt(o, p, n);
  }
  Status Sync() override { return base_->Sync(); }
  Result<uint64_t> Size() override {
    auto size = base_->Size();
    if (*widen_) std::this_thread::sleep_for(300ms);
    return size;
  }
  Status Truncate(uint64_t s) override { return base_->Truncate(s); }
  Status DropCache(uint64_t o, uint64_t l) override { return base_->DropCache(o, l); }
  Result<uint64_t> NextData(uint64_t o) override { return base_->NextData(o); }
  Result<uint64_t> NextHole(uint64_t o) override { return base_->NextHole(o); }
  bool direct_io() const override { return base_->direct_io(); }
  size_t alignment() const override { return base_->alignment(); }
  const std::string& path() const override { return base_->path(); }

  static constexpr size_t kCluster = 65536;

 private:
  std::unique_ptr<io::File> base_;
  std::atomic<bool>* widen_;
};

TEST(ImageFlushRaceTest, FlushNeverCutsOffANormalClusterWriteInFlight) {
  testing::TempDir dir;
  const std::string path = dir.File("race.qcow2");
  io::FileOptions file_options;
  file_options.writable = file_options.create = file_options.truncate = true;
  auto file = io::OpenFile(path, file_options);
  ASSERT_TRUE(file.ok()) << file.status().ToString();

  std::atomic<bool> widen{false};
  CreateOptions create;
  create.virtual_size = 4 << 20;
  create.cluster_size = DelayingFile::kCluster;
  auto image = CreateImageOnFile(std::make_unique<DelayingFile>(std::move(*file), &widen), create,
                                 IoOptions());
  ASSERT_TRUE(image.ok()) << image.status().ToString();

  // A compressed cluster whose data ends mid-sector, so Flush has to extend the file.
  std::vector<uint8_t> compressed(100, 0x5a);
  ASSERT_TRUE((*image)->WriteCompressed(0, compressed).ok());

  std::vector<uint8_t> data(DelayingFile::kCluster, 0xab);
  widen = true;
  Status write_status;
  std::thread writer([&] { write_status = (*image)->Write(DelayingFile::kCluster, data); });
  std::this_thread::sleep_for(20ms);  // the writer has its cluster and is writing it
  Status flush_status = (*image)->Flush();
  writer.join();
  widen = false;
  ASSERT_TRUE(write_status.ok()) << write_status.ToString();
  ASSERT_TRUE(flush_status.ok()) << flush_status.ToString();
  ASSERT_TRUE((*image)->Close().ok());

  auto reopened = Image::Open(path, OpenOptions());
  ASSERT_TRUE(reopened.ok()) << reopened.status().ToString();
  std::vector<uint8_t> back(DelayingFile::kCluster);
  ASSERT_TRUE((*reopened)->Read(DelayingFile::kCluster, back).ok());
  EXPECT_EQ(back, data);
  EXPECT_EQ(testing::QemuImgCheck(path).exit_code, 0) << testing::QemuImgCheck(path).output;
}

}  // namespace
}  // namespace zqcow::qcow2
