// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The kAssemble ClusterStore (contract: cluster_store.h). Internal to the store: only
// cluster_store.cc creates it. Implemented in assembling_store.cc (pieces, cluster ends,
// reads, flush) and assembling_store_writer.cc (the writer thread, batch writes, buffers).
//
// Internals. Each held host cluster has one entry in `clusters_` (ordered by offset, for the
// admission rule) with a buffer of cluster size and its fill record. All bookkeeping and
// every copy into or out of a buffer happen under `mutex_`; file I/O never does. While a
// cluster is being written (`writing`), its buffer is only read: writers and SetClusterEnd
// for it wait, Read still copies from it, Discard waits. Nobody but the thread that set
// `writing` may erase or change the entry.
//
// A finished cluster is `ready`: queued in `ready_` (by offset) until a batch takes it. The
// writer thread takes the lowest ready clusters, up to kMaxBatchBytes, marks them writing and
// writes each run of back-to-back clusters with one write (copied into a join buffer); while
// it writes, more clusters finish, so batches grow with the load by themselves. A ready
// cluster that is discarded stops being ready.

#ifndef ZQCOW_QCOW2_ASSEMBLING_STORE_H_
#define ZQCOW_QCOW2_ASSEMBLING_STORE_H_

#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "io/aligned_buffer.h"
#include "qcow2/cluster_store.h"

namespace zqcow::qcow2 {

class AssemblingStore final : public ClusterStore {
 public:
  // REQUIRES: file->alignment() <= cluster_size.
  AssemblingStore(io::File* file, uint32_t cluster_size, const Options& options);
  ~AssemblingStore() override;

  Strategy strategy() const override { return Strategy::kAssemble; }
  Status Write(uint64_t host_offset, std::span<const uint8_t> data) override;
  Status WriteBatch(std::span<const CompressedCluster> clusters,
                    std::span<const format::HostOffset> hosts) override;
  Status Rewrite(uint64_t host_cluster_offset, std::span<const uint8_t> cluster) override;
  Status SetClusterEnd(uint64_t host_cluster_offset, uint32_t data_end) override;
  Status Flush() override;
  Status Read(uint64_t host_offset, std::span<uint8_t> out) override;
  void Discard(uint64_t host_cluster_offset) override;
  Status error() const override;
  Stats stats() const override;

 private:
  // Receipt of one host cluster's compressed bytes.
  struct Fill {
    uint32_t received = 0;  // bytes received (pieces never overlap)
    uint32_t data_end = 0;  // cluster size unless SetClusterEnd said less
    uint32_t high_end = 0;  // end of the highest piece received, relative to the cluster
    bool end_set = false;   // SetClusterEnd was called
    bool finished() const { return received == data_end; }
  };
  struct Held {
    io::AlignedBuffer buffer;  // cluster size, zero filled; allocated with the first piece
    Fill fill;
    bool writing = false;  // a write of this cluster is in flight (see the file comment)
    bool ready = false;    // finished and queued in ready_ for a batch write
    bool dirty = false;    // holds bytes that no write of this cluster has covered yet
  };

  Fill EmptyFill() const;
  // REQUIRES: mutex_ held. The oldest placement can always finish: a cluster below every
  // held cluster is admitted even when the store is full.
  bool Admissible(uint64_t cluster_offset, bool whole_cluster) const;
  // REQUIRES: mutex_ held, no entry at cluster_offset.
  Held* Insert(uint64_t cluster_offset, io::AlignedBuffer buffer);
  // One piece: REQUIRES it lies within one host cluster. `replace` (a whole cluster):
  // whatever the cluster held is overwritten; the old bytes stay held until then.
  Status WritePiece(uint64_t offset, std::span<const uint8_t> piece, bool replace = false);
  // REQUIRES: mutex_ held through `lock` (held again on return); *held changed and is not
  // being written. Queues it when it became finished (and, without a writer thread, writes
  // it at once: nothing else is ever queued then). Returns the sticky error.
  Status Changed(std::unique_lock<std::mutex>& lock, uint64_t cluster_offset, Held* held);

  // --- assembling_store_writer.cc ---
  // REQUIRES: mutex_ held. Starts the writer thread with the first finished cluster (an
  // image that is only read never has one). False when there is none: the option is off,
  // or no thread could be started (then finishing callers write their clusters).
  bool HaveWriterThread();
  void WriterMain();
  // REQUIRES: mutex_ held through `lock` (held again on return), ready_ not empty. Takes
  // the lowest ready clusters (up to kMaxBatchBytes), writes them with one batch outside
  // the lock, drops them and wakes waiters. After a sticky error they are dropped
  // unwritten: the image is failed anyway.
  void WriteReadyBatch(std::unique_lock<std::mutex>& lock);
  // REQUIRES: mutex_ held; the cluster holds received bytes. Bytes a write of it covers:
  // finished, up to its data end; unfinished, everything received so far (aligned up).
  size_t WriteLength(const Held& held) const;
  // Called without the lock; `held` is marked writing, so its buffer does not change.
  Status WriteHeld(uint64_t cluster_offset, size_t length, const Held& held);
  // A zero-filled cluster buffer: a recycled one when there is one. Clusters come and go
  // thousands of times per second from several threads; recycling their buffers keeps the
  // allocator from spreading them over its arenas and the kernel from faulting in and
  // zeroing fresh pages for each.
  io::AlignedBuffer TakeClusterBuffer();
  // Keeps at most as many buffers as the store may hold clusters; frees the rest.
  void ReturnClusterBuffer(io::AlignedBuffer buffer);
  // A buffer for joining clusters (kMaxBatchBytes), reused between batches; an empty one
  // when kMaxJoinBuffers exist and all are in use (memory stays bounded however many
  // threads write: the writer thread and every writer that finds the store full).
  io::AlignedBuffer TakeJoinBuffer();
  void ReturnJoinBuffer(io::AlignedBuffer buffer);

  io::File* const file_;
  const uint32_t cluster_size_;
  Options options_;
  const size_t alignment_;

  mutable std::mutex mutex_;
  // Signalled when a cluster leaves the store or a write of one ends (and on errors).
  std::condition_variable changed_;
  std::condition_variable work_;                        // ready_ got a cluster, or stopping_
  std::map<uint64_t, std::unique_ptr<Held>> clusters_;  // by host offset
  std::set<uint64_t> ready_;  // finished clusters waiting for a batch
  bool stopping_ = false;
  Status error_;  // sticky: the first failed write
  Stats stats_;

  std::mutex cluster_buffers_mutex_;
  std::vector<io::AlignedBuffer> cluster_buffers_;  // guarded by cluster_buffers_mutex_
  std::mutex join_buffers_mutex_;
  std::vector<io::AlignedBuffer> join_buffers_;  // guarded by join_buffers_mutex_
  size_t join_buffers_created_ = 0;              // guarded by join_buffers_mutex_
  std::thread writer_;          // the writer thread; guarded by mutex_ until joined
  bool writer_failed_ = false;  // guarded by mutex_
};

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_ASSEMBLING_STORE_H_
