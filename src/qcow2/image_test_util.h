// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Helpers for the image engine's tests (header only; tests include it).

#ifndef ZQCOW_QCOW2_IMAGE_TEST_UTIL_H_
#define ZQCOW_QCOW2_IMAGE_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "codec/codec.h"
#include "io/fault_file.h"
#include "io/file.h"
#include "qcow2/qcow2_image.h"
#include "testing/test_util.h"
#include "zqcow/image.h"

namespace zqcow::qcow2::testing {

// Create options for an image of `size` bytes with the given geometry (other fields default).
inline CreateOptions ImageOptions(uint64_t size, uint32_t cluster_size, Compression compression) {
  CreateOptions options;
  options.virtual_size = size;
  options.cluster_size = cluster_size;
  options.compression = compression;
  return options;
}

// A raw twin of an image: every write goes to both; Save() writes it to disk.
class RawTwin {
 public:
  RawTwin(const std::string& path, uint64_t size) : path_(path), data_(size, 0) {}
  void Write(uint64_t offset, const std::vector<uint8_t>& bytes) {
    std::copy(bytes.begin(), bytes.end(), data_.begin() + static_cast<ptrdiff_t>(offset));
  }
  void Zero(uint64_t offset, uint64_t length) {
    std::fill_n(data_.begin() + static_cast<ptrdiff_t>(offset), length, 0);
  }
  void Save() const { zqcow::testing::WriteWholeFile(path_, data_); }
  const std::string& path() const { return path_; }
  const std::vector<uint8_t>& data() const { return data_; }

 private:
  std::string path_;
  std::vector<uint8_t> data_;
};

inline codec::CompressionType CodecOf(Compression c) {
  return static_cast<codec::CompressionType>(c);
}

// Compresses one cluster (padded with zeros to the cluster size); empty when it does not
// compress below the cluster size.
inline std::vector<uint8_t> CompressCluster(codec::Compressor* compressor,
                                            std::vector<uint8_t> cluster, uint32_t cluster_size) {
  cluster.resize(cluster_size, 0);
  std::vector<uint8_t> out(cluster_size - 1);
  auto n = compressor->Compress(cluster, out);
  EXPECT_TRUE(n.ok()) << n.status().ToString();
  out.resize(n.ok() ? *n : 0);
  return out;
}

inline std::unique_ptr<codec::Compressor> NewCompressor(Compression c) {
  auto compressor = codec::MakeCompressor(CodecOf(c), codec::DefaultLevel(CodecOf(c)));
  EXPECT_TRUE(compressor.ok()) << compressor.status().ToString();
  return compressor.ok() ? std::move(compressor).value() : nullptr;
}

// Writes `data` into the cluster at `offset`: compressed when it compresses, else normal.
inline Status WriteCluster(Image* image, codec::Compressor* compressor, uint64_t offset,
                           const std::vector<uint8_t>& data) {
  auto compressed = CompressCluster(compressor, data, image->cluster_size());
  if (compressed.empty()) return image->Write(offset, data);
  return image->WriteCompressed(offset, compressed);
}

// A new image at `path` on a file whose operations `controller` counts and can fail.
inline std::unique_ptr<Image> CreateFaultyImage(
    const std::string& path, const CreateOptions& options, const IoOptions& io,
    const std::shared_ptr<io::FaultController>& controller) {
  io::FileOptions file_options;
  file_options.writable = true;
  file_options.create = true;
  auto file = io::OpenFile(path, file_options);
  EXPECT_TRUE(file.ok()) << file.status().ToString();
  if (!file.ok()) return nullptr;
  auto created = CreateImageOnFile(io::MakeFaultInjectingFile(std::move(file).value(), controller),
                                   options, io);
  EXPECT_TRUE(created.ok()) << created.status().ToString();
  return created.ok() ? std::move(created).value() : nullptr;
}

// `incomplete`: the image is expected to carry the dirty bit (CloseIncomplete).
inline void ExpectCleanAndEqual(const std::string& image, const RawTwin& raw,
                                bool incomplete = false) {
  auto check = zqcow::testing::QemuImgCheck(image);
  EXPECT_EQ(check.exit_code, 0) << check.output;
  // zqcow's own checker must agree with qemu-img.
  auto own = CheckImage(image);
  EXPECT_TRUE(own.ok()) << own.status().ToString();
  if (own.ok()) {
    EXPECT_EQ(own->corruptions, 0u);
    EXPECT_EQ(own->leaks, 0u);
    EXPECT_EQ(own->incomplete, incomplete);
    for (const auto& m : own->messages) ADD_FAILURE() << m;
  }
  raw.Save();
  auto compare = zqcow::testing::QemuImgCompare(raw.path(), "raw", image, "qcow2");
  EXPECT_EQ(compare.exit_code, 0) << compare.output;
}

}  // namespace zqcow::qcow2::testing

#endif  // ZQCOW_QCOW2_IMAGE_TEST_UTIL_H_
