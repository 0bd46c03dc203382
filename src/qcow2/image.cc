// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The public entry points Image::Create / Image::Open: open the file with the requested
// I/O mode and hand it to the engine (qcow2_create.cc / qcow2_open.cc). Also the default
// Image::WriteCompressedBatch (one WriteCompressed per cluster) for other implementations.

#include "zqcow/image.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format/endian.h"
#include "format/types.h"
#include "io/file.h"
#include "qcow2/qcow2_image.h"

namespace zqcow {

namespace {

// Offset of cluster_bits in the header.
constexpr size_t kClusterBitsOffset = 20;
constexpr size_t kHeaderPrefix = 24;

// The cluster size an existing image declares (0 if unreadable; the engine then reports
// the real problem).
uint64_t PeekClusterSize(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  uint8_t prefix[kHeaderPrefix] = {};
  ssize_t got = ::pread(fd, prefix, sizeof(prefix), 0);
  ::close(fd);
  if (got != static_cast<ssize_t>(sizeof(prefix))) return 0;
  uint32_t bits = format::LoadBE32(prefix + kClusterBitsOffset);
  if (bits < format::kMinClusterBits || bits > format::kMaxClusterBits) return 0;
  return uint64_t{1} << bits;
}

}  // namespace

Result<std::unique_ptr<Image>> Image::Create(const std::string& path, const CreateOptions& options,
                                             const IoOptions& io) {
  // An image is created as a regular file: a block device cannot be truncated to the
  // image's size, and a failed create removes what it made, which must never be a device.
  struct stat existing {};
  if (::stat(path.c_str(), &existing) == 0 && !S_ISREG(existing.st_mode)) {
    return Status::NotSupported(path + ": not a regular file (images are created as files)");
  }
  io::FileOptions file_options;
  file_options.writable = true;
  file_options.create = true;
  file_options.exclusive = !options.overwrite;
  file_options.truncate = options.overwrite;
  file_options.direct_io = io.direct_io;
  file_options.sync_writes = io.sync_writes;
  file_options.use_io_uring = io.use_io_uring;
  ZQ_ASSIGN_OR_RETURN(auto file, io::OpenFile(path, file_options));
  if (file->direct_io() && file->alignment() > options.cluster_size) {
    // Clusters smaller than the device's block cannot be written with O_DIRECT alone:
    // fall back to buffered I/O for this image.
    file.reset();
    file_options.create = false;
    file_options.exclusive = false;
    file_options.truncate = false;
    file_options.direct_io = false;
    ZQ_ASSIGN_OR_RETURN(file, io::OpenFile(path, file_options));
  }
  auto image = qcow2::CreateImageOnFile(std::move(file), options, io);
  if (!image.ok()) ::unlink(path.c_str());
  return image;
}

Status Image::WriteCompressedBatch(std::span<const CompressedCluster> clusters) {
  for (const CompressedCluster& cluster : clusters) {
    ZQ_RETURN_IF_ERROR(WriteCompressed(cluster.guest_offset, cluster.data));
  }
  return Status::OK();
}

Result<std::unique_ptr<Image>> Image::Open(const std::string& path, const OpenOptions& options) {
  return qcow2::OpenImageChain(path, options, /*depth=*/0);
}

Result<std::unique_ptr<Image>> qcow2::OpenImageChain(const std::string& path,
                                                     const OpenOptions& options, int depth) {
  io::FileOptions file_options;
  file_options.writable = options.writable;
  file_options.direct_io = options.io.direct_io;
  file_options.sync_writes = options.writable && options.io.sync_writes;
  file_options.use_io_uring = options.io.use_io_uring;
  if (options.io.force_share) file_options.lock = io::ImageLock::kShared;
  ZQ_ASSIGN_OR_RETURN(auto file, io::OpenFile(path, file_options));
  if (file->direct_io()) {
    uint64_t cluster_size = PeekClusterSize(path);
    if (cluster_size != 0 && file->alignment() > cluster_size) {
      file.reset();
      file_options.direct_io = false;
      ZQ_ASSIGN_OR_RETURN(file, io::OpenFile(path, file_options));
    }
  }
  return qcow2::OpenImageOnFile(std::move(file), options, depth);
}

}  // namespace zqcow
