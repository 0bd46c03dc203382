// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Using libzqcow from outside: creates a qcow2 image, has several threads compress clusters
// (raw deflate with a 4 KiB window, what QEMU reads for compression_type=zlib) and hand them
// to Image::WriteCompressed in whatever order they finish, flushes, closes, then opens the
// image again, reads every cluster back and checks the image.
// Usage: write_compressed IMAGE   (exit 0 when everything read back matches)

#include <zlib.h>
#include <zqcow/image.h>
#include <zqcow/version.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr uint32_t kClusterSize = 65536;
constexpr uint64_t kClusters = 64;
constexpr unsigned kThreads = 4;
constexpr int kRawDeflate4KiBWindow = -12;

// Guest cluster `index`: text that compresses well and differs from cluster to cluster.
std::vector<uint8_t> ClusterContent(uint64_t index) {
  std::vector<uint8_t> data(kClusterSize);
  const std::string line = "cluster " + std::to_string(index) + " of the example image\n";
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(line[i % line.size()]);
  return data;
}

// Raw deflate of `data`; empty when it does not fit in less than a cluster.
std::vector<uint8_t> Deflate(const std::vector<uint8_t>& data) {
  z_stream stream{};
  if (deflateInit2(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, kRawDeflate4KiBWindow, 9,
                   Z_DEFAULT_STRATEGY) != Z_OK) {
    return {};
  }
  std::vector<uint8_t> out(kClusterSize - 1);
  stream.next_in = const_cast<uint8_t*>(data.data());
  stream.avail_in = static_cast<uInt>(data.size());
  stream.next_out = out.data();
  stream.avail_out = static_cast<uInt>(out.size());
  const int ret = deflate(&stream, Z_FINISH);
  out.resize(out.size() - stream.avail_out);
  deflateEnd(&stream);
  if (ret != Z_STREAM_END) return {};
  return out;
}

int Fail(const std::string& what, const zqcow::Status& status) {
  std::fprintf(stderr, "write_compressed: %s: %s\n", what.c_str(), status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: write_compressed IMAGE\n");
    return 2;
  }
  const std::string path = argv[1];
  std::printf("libzqcow %s (commit %s)\n", zqcow::Version(), zqcow::GitCommit());

  zqcow::CreateOptions create;
  create.virtual_size = kClusters * kClusterSize;
  create.cluster_size = kClusterSize;
  create.compression = zqcow::Compression::kZlib;
  create.overwrite = true;
  auto image = zqcow::Image::Create(path, create);
  if (!image.ok()) return Fail("create", image.status());

  // Workers take the next cluster, compress it and store it; WriteCompressed may be called
  // from all of them at once.
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < kThreads; ++t) {
    workers.emplace_back([&] {
      for (uint64_t index = next++; index < kClusters && !failed; index = next++) {
        std::vector<uint8_t> compressed = Deflate(ClusterContent(index));
        zqcow::Status status = compressed.empty()
                                   ? zqcow::Status::InvalidArgument("cluster did not compress")
                                   : (*image)->WriteCompressed(index * kClusterSize, compressed);
        if (!status.ok()) {
          Fail("cluster " + std::to_string(index), status);
          failed = true;
        }
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
  if (failed) return 1;
  if (zqcow::Status status = (*image)->Flush(); !status.ok()) return Fail("flush", status);
  if (zqcow::Status status = (*image)->Close(); !status.ok()) return Fail("close", status);

  auto reopened = zqcow::Image::Open(path, zqcow::OpenOptions());
  if (!reopened.ok()) return Fail("open", reopened.status());
  std::vector<uint8_t> cluster(kClusterSize);
  for (uint64_t index = 0; index < kClusters; ++index) {
    if (zqcow::Status status = (*reopened)->Read(index * kClusterSize, cluster); !status.ok()) {
      return Fail("read", status);
    }
    if (cluster != ClusterContent(index)) {
      std::fprintf(stderr, "write_compressed: cluster %llu reads back different data\n",
                   static_cast<unsigned long long>(index));
      return 1;
    }
  }
  (void)(*reopened)->Close();

  auto check = zqcow::CheckImage(path);
  if (!check.ok()) return Fail("check", check.status());
  if (check->corruptions != 0 || check->leaks != 0 || check->incomplete) {
    std::fprintf(stderr, "write_compressed: %s: check found %llu corruptions, %llu leaks%s\n",
                 path.c_str(), static_cast<unsigned long long>(check->corruptions),
                 static_cast<unsigned long long>(check->leaks),
                 check->incomplete ? ", incomplete" : "");
    return 1;
  }
  std::printf("%s: %llu compressed clusters written by %u threads, read back and checked clean\n",
              path.c_str(), static_cast<unsigned long long>(check->compressed_clusters), kThreads);
  return 0;
}
