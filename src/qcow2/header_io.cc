// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "qcow2/header_io.h"

#include <algorithm>
#include <vector>

#include "format/endian.h"
#include "format/types.h"

namespace zqcow::qcow2 {
namespace {

// First read of a file: enough for any header field that says how big the header is.
constexpr uint64_t kHeaderProbeBytes = 4096;
constexpr size_t kOffClusterBits = 20;

// Reads the first cluster of the file (or the whole file when it is shorter).
Result<std::vector<uint8_t>> ReadHeaderBytes(io::File* file, uint64_t file_size) {
  std::vector<uint8_t> bytes(std::min(file_size, kHeaderProbeBytes));
  ZQ_RETURN_IF_ERROR(ReadExact(file, 0, bytes.data(), bytes.size()));
  if (bytes.size() >= kOffClusterBits + 4) {
    const uint32_t cluster_bits = format::LoadBE32(bytes.data() + kOffClusterBits);
    if (cluster_bits >= format::kMinClusterBits && cluster_bits <= format::kMaxClusterBits) {
      const uint64_t want = std::min(file_size, uint64_t{1} << cluster_bits);
      if (want > bytes.size()) {
        bytes.resize(want);
        ZQ_RETURN_IF_ERROR(ReadExact(file, 0, bytes.data(), bytes.size()));
      }
    }
  }
  return bytes;
}

}  // namespace

Result<std::unique_ptr<io::File>> OpenForReading(const std::string& path, bool force_share) {
  io::FileOptions options;
  if (force_share) options.lock = io::ImageLock::kShared;
  options.use_io_uring = false;  // a handful of sequential reads
  return io::OpenFile(path, options);
}

Status ReadExact(io::File* file, uint64_t offset, void* buffer, size_t length) {
  auto read = file->ReadAt(offset, buffer, length);
  return read.ok() ? Status::OK() : read.status();
}

format::ReadAtFunction ReaderOf(io::File* file) {
  return [file](uint64_t offset, std::span<uint8_t> buffer) {
    return ReadExact(file, offset, buffer.data(), buffer.size());
  };
}

Result<format::Header> ReadHeader(io::File* file, uint64_t file_size,
                                  bool refcount_table_may_pass_eof) {
  ZQ_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, ReadHeaderBytes(file, file_size));
  auto header = format::ParseHeader(bytes, file_size, refcount_table_may_pass_eof);
  if (!header.ok()) return header.status().WithPrefix(file->path());
  return header;
}

}  // namespace zqcow::qcow2
