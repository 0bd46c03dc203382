// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Fuzzes the whole read path with hostile image files: the input is written to an in-memory
// file (memfd), opened read-only with Image::Open, then every cluster of the first few MiB
// of the virtual disk is read (at least two clusters per call), mapped, and the image is checked
// (CheckImage) and its header read (ReadImageInfo). Nothing may crash, hang or allocate without
// bound; run with -rss_limit_mb=512 -timeout=10. Failures must be clean Status values naming the
// file.

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "fuzz_require.h"
#include "zqcow/image.h"

namespace {

// How much of the virtual disk one input may read: keeps every run well inside the timeout
// however large the claimed virtual size.
constexpr uint64_t kMaxBytesRead = 4ull << 20;
constexpr uint64_t kReadChunk = 64ull << 10;

int MemFd() {
  static const int fd = memfd_create("zqcow-image-fuzz", 0);
  FUZZ_REQUIRE(fd >= 0);
  return fd;
}

void FuzzImage(const std::string& path) {
  zqcow::OpenOptions options;
  options.writable = false;
  auto image = zqcow::Image::Open(path, options);
  if (!image.ok()) {
    FUZZ_REQUIRE(!image.status().message().empty());
    return;
  }
  const uint64_t virtual_size = (*image)->virtual_size();
  const uint64_t cluster_size = (*image)->cluster_size();
  FUZZ_REQUIRE(cluster_size >= 512 && (cluster_size & (cluster_size - 1)) == 0);
  const uint64_t limit = std::min(virtual_size, kMaxBytesRead);
  // At least two clusters per read: whole clusters read together take the grouped path
  // (several compressed clusters' data with one request), large clusters included.
  const uint64_t chunk = std::max(kReadChunk, 2 * cluster_size);
  std::vector<uint8_t> buffer(chunk);
  for (uint64_t offset = 0; offset < limit; offset += chunk) {
    const uint64_t length = std::min(chunk, limit - offset);
    zqcow::Status status = (*image)->Read(offset, std::span<uint8_t>(buffer.data(), length));
    if (!status.ok()) FUZZ_REQUIRE(!status.message().empty());
  }
  // A read that straddles a cluster boundary, and the last byte of the disk.
  if (virtual_size > cluster_size) {
    (void)(*image)->Read(cluster_size - 1, std::span<uint8_t>(buffer.data(), 2));
  }
  if (virtual_size > 0) {
    (void)(*image)->Read(virtual_size - 1, std::span<uint8_t>(buffer.data(), 1));
  }
  auto extents = (*image)->Map(0, limit);
  if (extents.ok()) {
    uint64_t expected = 0;
    for (const zqcow::MapExtent& extent : *extents) {
      FUZZ_REQUIRE(extent.guest_offset == expected);
      expected += extent.length;
    }
    FUZZ_REQUIRE(expected == limit);
  }
  zqcow::ImageInfo info = (*image)->Info();
  FUZZ_REQUIRE(info.virtual_size == virtual_size);
  (void)(*image)->Close();  // read-only: nothing to lose, only must not crash
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = MemFd();
  FUZZ_REQUIRE(ftruncate(fd, 0) == 0);
  size_t written = 0;
  while (written < size) {
    ssize_t n = pwrite(fd, data + written, size - written, static_cast<off_t>(written));
    FUZZ_REQUIRE(n > 0);
    written += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);

  FuzzImage(path);
  (void)zqcow::ReadImageInfo(path);
  auto check = zqcow::CheckImage(path);
  if (check.ok()) {
    for (const std::string& message : check->messages) FUZZ_REQUIRE(!message.empty());
  }
  return 0;
}
