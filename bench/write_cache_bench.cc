// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Compressed-write throughput of the cluster store's strategies (src/qcow2/cluster_store.h):
// kAssemble ("cache") and the kWriteThrough baseline ("no cache"), on a real file in
// /var/tmp (O_DIRECT needs a disk-backed file system), opened O_DIRECT or buffered.
//
// N threads write compressed-size pieces (random 2..20 KiB) that a bump pointer laid out one
// after another in 64 KiB host clusters. Each thread takes the next few allocations and
// delivers them in reverse order, so host clusters receive their pieces out of order as with
// parallel compression workers. A run ends with Flush + fdatasync; MB/s covers all of it.
//
//   ./build/write_cache_bench --benchmark_filter=Direct
//
// Rows: DirectCache, DirectNoCache (per-piece read-modify-write, what QEMU does with
// O_DIRECT), DirectCacheFallocated (file blocks reserved first), BufferedCache,
// BufferedNoCache (pwrite per piece); argument = threads. On a shared machine, run with
// --benchmark_repetitions=3: the figures are noisy.

#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "io/file.h"
#include "qcow2/cluster_store.h"

namespace zqcow {
namespace {

constexpr uint32_t kClusterSize = 64 * 1024;
constexpr uint64_t kTotalBytes = 24ULL << 20;  // per run; small enough for a shared machine
constexpr uint32_t kMinPiece = 2 * 1024;
constexpr uint32_t kMaxPiece = 20 * 1024;
constexpr uint32_t kPiecesPerGrab = 4;  // allocations a thread takes, then writes in reverse
constexpr size_t kCacheClusters = 64;
constexpr uint64_t kSeed = 42;

struct Piece {
  uint64_t offset;
  uint32_t length;
};

// The bump-pointer layout and the bytes, shared by every run.
struct Workload {
  std::vector<Piece> pieces;
  std::vector<uint8_t> data;  // data[offset] is the byte stored at host offset `offset`
};

const Workload& GetWorkload() {
  static const Workload workload = [] {
    Workload w;
    std::mt19937_64 rng(kSeed);
    uint64_t bump = kClusterSize;  // cluster 0 stands for the image header
    while (bump < kTotalBytes + kClusterSize) {
      const uint32_t length =
          kMinPiece + static_cast<uint32_t>(rng() % (kMaxPiece - kMinPiece + 1));
      w.pieces.push_back({bump, length});
      bump += length;
    }
    w.data.resize(bump);
    for (uint8_t& byte : w.data) byte = static_cast<uint8_t>(rng());
    return w;
  }();
  return workload;
}

std::string BenchPath() {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir != nullptr ? dir : "/var/tmp") + "/zqcow-write-cache-bench-" +
         std::to_string(::getpid()) + ".img";
}

// Reserves the file's blocks up front. On ext4, O_DIRECT writes that extend the file or
// fill holes serialise on the inode; writes into reserved space run in parallel.
Status Preallocate(const std::string& path, uint64_t size) {
  const int fd = ::open(path.c_str(), O_RDWR);
  if (fd < 0) return Status::FromErrno(errno, path + ": open for fallocate failed");
  const int err = ::posix_fallocate(fd, 0, static_cast<off_t>(size));
  ::close(fd);
  if (err != 0) return Status::FromErrno(err, path + ": posix_fallocate failed");
  return Status::OK();
}

void RunWrites(benchmark::State& state, bool direct, bool cache_enabled, bool preallocate = false) {
  const int threads = static_cast<int>(state.range(0));
  const Workload& workload = GetWorkload();
  const std::string path = BenchPath();
  uint64_t bytes = 0;
  for (auto _ : state) {
    io::FileOptions file_options;
    file_options.writable = true;
    file_options.create = true;
    file_options.truncate = true;
    file_options.direct_io = direct;
    Result<std::unique_ptr<io::File>> file = io::OpenFile(path, file_options);
    if (!file.ok()) {
      state.SkipWithError(file.status().ToString().c_str());
      return;
    }
    if (preallocate) {
      const Status status = Preallocate(path, workload.data.size() + kClusterSize);
      if (!status.ok()) {
        state.SkipWithError(status.ToString().c_str());
        return;
      }
    }
    qcow2::ClusterStore::Options options;
    options.strategy = cache_enabled ? qcow2::ClusterStore::Strategy::kAssemble
                                     : qcow2::ClusterStore::Strategy::kWriteThrough;
    options.max_clusters = kCacheClusters;
    auto cache = qcow2::ClusterStore::Create(file->get(), kClusterSize, options);
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&] {
        for (;;) {
          const size_t first = next.fetch_add(kPiecesPerGrab);
          if (first >= workload.pieces.size()) return;
          const size_t last = std::min<size_t>(first + kPiecesPerGrab, workload.pieces.size());
          for (size_t i = last; i-- > first;) {
            const Piece& piece = workload.pieces[i];
            if (!cache->Write(piece.offset, {workload.data.data() + piece.offset, piece.length})
                     .ok()) {
              failed = true;
              return;
            }
          }
        }
      });
    }
    for (std::thread& worker : workers) worker.join();
    Status status = failed ? cache->error() : cache->Flush();
    if (status.ok()) status = (*file)->Sync();
    if (!status.ok()) {
      state.SkipWithError(status.ToString().c_str());
      break;
    }
    bytes += workload.data.size() - kClusterSize;
    if (cache_enabled) {
      const auto stats = cache->stats();
      state.counters["clusters_whole"] = static_cast<double>(stats.clusters_written_whole);
      state.counters["waits"] = static_cast<double>(stats.waits);
      state.counters["peak_clusters"] = static_cast<double>(stats.peak_clusters);
    }
  }
  std::remove(path.c_str());
  state.SetBytesProcessed(static_cast<int64_t>(bytes));
  state.counters["MB/s"] =
      benchmark::Counter(static_cast<double>(bytes) / 1e6, benchmark::Counter::kIsRate);
}

void BM_DirectCache(benchmark::State& state) { RunWrites(state, true, true); }
void BM_DirectNoCache(benchmark::State& state) { RunWrites(state, true, false); }
void BM_DirectCacheFallocated(benchmark::State& state) { RunWrites(state, true, true, true); }
void BM_BufferedCache(benchmark::State& state) { RunWrites(state, false, true); }
void BM_BufferedNoCache(benchmark::State& state) { RunWrites(state, false, false); }

#define ZQ_WRITE_CACHE_BENCH(name)                                                     \
  BENCHMARK(name)->Arg(1)->Arg(2)->Arg(4)->Arg(8)->Iterations(2)->UseRealTime()->Unit( \
      benchmark::kMillisecond)

ZQ_WRITE_CACHE_BENCH(BM_DirectCache);
ZQ_WRITE_CACHE_BENCH(BM_DirectNoCache);
ZQ_WRITE_CACHE_BENCH(BM_DirectCacheFallocated);
ZQ_WRITE_CACHE_BENCH(BM_BufferedCache);
ZQ_WRITE_CACHE_BENCH(BM_BufferedNoCache);

}  // namespace
}  // namespace zqcow

BENCHMARK_MAIN();
