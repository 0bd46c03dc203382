// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <vector>

#include "convert/source.h"

namespace zqcow::convert {
namespace {

// Bytes equal to their offset (mod 251); any read that touches [bad_begin, bad_end) fails.
class FakeSource final : public Source {
 public:
  FakeSource(uint64_t bad_begin, uint64_t bad_end) : bad_begin_(bad_begin), bad_end_(bad_end) {}
  const std::string& path() const override { return path_; }
  const char* format() const override { return "raw"; }
  uint64_t size() const override { return 1u << 20; }
  size_t read_alignment() const override { return 1; }
  Result<std::vector<ByteRange>> DataRanges(uint64_t offset, uint64_t length) override {
    return std::vector<ByteRange>{{offset, length}};
  }
  Status Read(std::span<const io::IoRequest> requests) override {
    for (const io::IoRequest& r : requests) {
      if (r.offset < bad_end_ && r.offset + r.length > bad_begin_) {
        return Status::IOError("fake: unreadable", 5);
      }
      auto* out = static_cast<uint8_t*>(r.buffer);
      for (size_t i = 0; i < r.length; ++i) out[i] = static_cast<uint8_t>((r.offset + i) % 251);
    }
    return Status::OK();
  }
  Status Close() override { return Status::OK(); }

 private:
  const std::string path_ = "fake";
  const uint64_t bad_begin_;
  const uint64_t bad_end_;
};

TEST(SalvageReadErrorsTest, ZeroesOnlyTheUnreadableSectorsAndCountsThem) {
  SalvageCounters counters;
  auto source = SalvageReadErrors(std::make_unique<FakeSource>(1000, 1600), &counters);
  std::vector<uint8_t> a(4096, 0xaa);
  std::vector<uint8_t> b(512, 0xaa);
  const io::IoRequest requests[] = {{0, a.data(), a.size()}, {8192, b.data(), b.size()}};
  ASSERT_TRUE(source->Read(requests).ok());
  EXPECT_EQ(counters.errors.load(), 1u);
  EXPECT_EQ(counters.bytes.load(), 1536u);  // sectors 1, 2 and 3
  for (size_t i = 0; i < a.size(); ++i) {
    const bool lost = i >= 512 && i < 2048;
    ASSERT_EQ(a[i], lost ? 0 : static_cast<uint8_t>(i % 251)) << i;
  }
  for (size_t i = 0; i < b.size(); ++i) ASSERT_EQ(b[i], static_cast<uint8_t>((8192 + i) % 251));
}

TEST(LimitReadRateTest, ReadsFromSeveralThreadsTakeAtLeastBytesOverRate) {
  constexpr uint64_t kRate = 4u << 20;  // 4 MiB/s
  auto source = LimitReadRate(std::make_unique<FakeSource>(0, 0), kRate);
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&source] {
      std::vector<uint8_t> buffer(256u << 10);
      for (int i = 0; i < 2; ++i) {
        const io::IoRequest request{0, buffer.data(), buffer.size()};
        ASSERT_TRUE(source->Read(std::span<const io::IoRequest>(&request, 1)).ok());
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // 1 MiB at 4 MiB/s with no initial credit: at least 0.25 s (a lower bound only).
  EXPECT_GE(seconds, 0.24);
}

}  // namespace
}  // namespace zqcow::convert
