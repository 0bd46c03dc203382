// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The kWriteThrough ClusterStore (contract: cluster_store.h): every piece goes to the file
// at once, as QEMU writes compressed clusters. Holds nothing: Flush, SetClusterEnd and
// Discard only report the sticky error.

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>

#include "io/aligned_buffer.h"
#include "qcow2/cluster_store.h"

namespace zqcow::qcow2 {

namespace {

class WriteThroughStore final : public ClusterStore {
 public:
  WriteThroughStore(io::File* file, uint32_t cluster_size, const Options& options)
      : file_(file),
        cluster_size_(cluster_size),
        options_(options),
        alignment_(std::max<size_t>(file->alignment(), 1)) {}

  Strategy strategy() const override { return Strategy::kWriteThrough; }

  Status Write(uint64_t host_offset, std::span<const uint8_t> data) override {
    {
      std::lock_guard lock(mutex_);
      if (!error_.ok() || data.empty()) return error_;
      const uint64_t first = host_offset / cluster_size_;
      const uint64_t last = (host_offset + data.size() - 1) / cluster_size_;
      stats_.pieces += last - first + 1;
    }
    Status status;
    if (!file_->direct_io()) {
      status = file_->WriteAt(host_offset, data.data(), data.size());
    } else {
      // Read-modify-write of the covering blocks; serialised, because two pieces may share
      // a block and the later write would otherwise undo the earlier one.
      const uint64_t start = io::AlignDown(host_offset, alignment_);
      const uint64_t end = io::AlignUp(host_offset + data.size(), alignment_);
      io::AlignedBuffer block(end - start, std::max(alignment_, io::kBufferAlignment));
      std::lock_guard rmw_lock(read_modify_write_mutex_);
      Result<size_t> read = file_->ReadAt(start, block.data(), block.size());
      if (read.ok()) {
        std::memcpy(block.data() + (host_offset - start), data.data(), data.size());
        status = file_->WriteAt(start, block.data(), block.size());
      } else {
        status = read.status();
      }
    }
    if (status.ok() && options_.drop_page_cache) {
      (void)file_->DropCache(host_offset, data.size());  // a hint only
    }
    if (!status.ok()) {
      std::lock_guard lock(mutex_);
      if (error_.ok()) error_ = status;
      return error_;
    }
    return Status::OK();
  }

  // One write per piece: combining pieces is what the kAssemble store adds.
  Status WriteBatch(std::span<const CompressedCluster> clusters,
                    std::span<const format::HostOffset> hosts) override {
    for (size_t i = 0; i < clusters.size(); ++i) {
      ZQ_RETURN_IF_ERROR(Write(hosts[i].value(), clusters[i].data));
    }
    return Status::OK();
  }

  Status Rewrite(uint64_t host_cluster_offset, std::span<const uint8_t> cluster) override {
    return Write(host_cluster_offset, cluster);
  }
  Status SetClusterEnd(uint64_t, uint32_t) override { return error(); }
  Status Flush() override { return error(); }
  Status Read(uint64_t host_offset, std::span<uint8_t> out) override {
    ZQ_RETURN_IF_ERROR(error());
    return io::ReadAnyRange(*file_, host_offset, out);
  }
  void Discard(uint64_t) override {}

  Status error() const override {
    std::lock_guard lock(mutex_);
    return error_;
  }
  Stats stats() const override {
    std::lock_guard lock(mutex_);
    return stats_;
  }

 private:
  io::File* const file_;
  const uint32_t cluster_size_;
  const Options options_;
  const size_t alignment_;
  mutable std::mutex mutex_;
  Status error_;  // sticky: the first failed write
  Stats stats_;
  std::mutex read_modify_write_mutex_;  // on an O_DIRECT file
};

}  // namespace

std::unique_ptr<ClusterStore> MakeWriteThroughStore(io::File* file, uint32_t cluster_size,
                                                    const ClusterStore::Options& options) {
  return std::make_unique<WriteThroughStore>(file, cluster_size, options);
}

}  // namespace zqcow::qcow2
