// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Cluster codec throughput and ratio, one core, per codec and level, on 64 KiB clusters of
// generated disk-like data (text, machine-code-like records, sparse blocks, incompressible
// media). Set ZQCOW_BENCH_CORPUS=DIR to use the files under DIR instead (the figures in
// src/codec/codec.h came from /usr/bin, /usr/lib/x86_64-linux-gnu and /usr/share).
//
//   ./build/codec_bench                      # all codecs and levels
//   ./build/codec_bench --benchmark_filter=Compress/zlib
//
// Counters: bytes_per_second is input (uncompressed) throughput; "out%" is the compressed
// size in percent of the input (clusters that do not fit count as stored whole, as the
// image writer does); "stored" is the number of such clusters.

#include <benchmark/benchmark.h>
#include <zstd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "codec/codec.h"

namespace zqcow::codec {
namespace {

constexpr size_t kClusterSize = 64 * 1024;
constexpr size_t kCorpusSize = 16 * 1024 * 1024;
constexpr size_t kClusters = kCorpusSize / kClusterSize;
// Per file of an external corpus: at most this many clusters from its start.
constexpr size_t kClustersPerFile = 8;

using Cluster = std::vector<uint8_t>;

// English-like text: words of a skewed vocabulary, numbers, punctuation, line breaks.
void FillText(Cluster& cluster, std::mt19937_64& rng) {
  static const char* const kWords[] = {
      "the",    "of",     "and",     "to",       "in",       "is",     "for",   "that",
      "with",   "on",     "as",      "are",      "this",     "be",     "by",    "from",
      "file",   "system", "return",  "value",    "error",    "config", "user",  "data",
      "kernel", "device", "package", "function", "argument", "string", "const", "struct"};
  std::geometric_distribution<int> word_rank(0.12);
  size_t i = 0;
  while (i < cluster.size()) {
    std::string token;
    const uint64_t pick = rng() % 16;
    if (pick == 0) {
      token = std::to_string(rng() % 100000);
    } else {
      token = kWords[std::min(word_rank(rng), 31)];
    }
    token += (pick == 1) ? ".\n" : (pick == 2 ? ", " : " ");
    for (char c : token) {
      if (i == cluster.size()) break;
      cluster[i++] = static_cast<uint8_t>(c);
    }
  }
}

// Machine-code/record-like binary: opcodes from a small alphabet, little-endian small
// integers and pointers sharing their high bytes, with repeats of recent sequences.
void FillBinary(Cluster& cluster, std::mt19937_64& rng) {
  static const uint8_t kOpcodes[] = {0x48, 0x89, 0x8b, 0xe8, 0x0f, 0x85, 0x84, 0xc3,
                                     0x41, 0x4c, 0x31, 0xc0, 0x83, 0xff, 0x74, 0x75};
  size_t i = 0;
  while (i < cluster.size()) {
    const uint64_t pick = rng() % 8;
    if (pick < 4) {
      cluster[i++] = kOpcodes[rng() % 16];
    } else if (pick < 6) {
      const uint64_t pointer = 0x00007f3a00000000ull | (rng() % 0x100000 * 8);
      for (int b = 0; b < 8 && i < cluster.size(); ++b) cluster[i++] = (pointer >> (8 * b)) & 0xff;
    } else if (pick == 6 && i > 4096) {
      const size_t back = 8 + rng() % 4000;
      const size_t length = 4 + rng() % 60;
      for (size_t k = 0; k < length && i < cluster.size(); ++k, ++i) cluster[i] = cluster[i - back];
    } else {
      const uint32_t small = static_cast<uint32_t>(rng() % 300);
      for (int b = 0; b < 4 && i < cluster.size(); ++b) cluster[i++] = (small >> (8 * b)) & 0xff;
    }
  }
}

std::vector<Cluster> GeneratedCorpus() {
  std::mt19937_64 rng(2026);
  std::vector<Cluster> corpus;
  for (size_t c = 0; c < kClusters; ++c) {
    Cluster cluster(kClusterSize, 0);
    switch (c % 10) {
      case 0:
      case 1:
      case 2:
      case 3:
        FillText(cluster, rng);
        break;
      case 4:
      case 5:
      case 6:
        FillBinary(cluster, rng);
        break;
      case 7: {  // a sparse cluster: one written 4 KiB block among zeros
        Cluster block(4096);
        FillBinary(block, rng);
        std::copy(block.begin(), block.end(), cluster.begin() + (rng() % 16) * 4096);
        break;
      }
      default:  // already compressed media
        for (auto& byte : cluster) byte = static_cast<uint8_t>(rng());
        break;
    }
    corpus.push_back(std::move(cluster));
  }
  return corpus;
}

std::vector<Cluster> FileCorpus(const char* directory) {
  namespace fs = std::filesystem;
  std::vector<std::string> files;
  std::error_code error;
  for (auto it = fs::recursive_directory_iterator(
           directory, fs::directory_options::skip_permission_denied, error);
       it != fs::recursive_directory_iterator(); it.increment(error)) {
    if (error) break;
    if (it->is_regular_file(error) && !it->is_symlink(error)) files.push_back(it->path());
  }
  std::sort(files.begin(), files.end());
  std::vector<Cluster> corpus;
  for (const auto& path : files) {
    std::ifstream in(path, std::ios::binary);
    for (size_t k = 0; k < kClustersPerFile && corpus.size() < kClusters; ++k) {
      Cluster cluster(kClusterSize, 0);
      in.read(reinterpret_cast<char*>(cluster.data()), kClusterSize);
      if (in.gcount() == 0) break;
      // All-zero clusters are never compressed by the image writer.
      if (std::any_of(cluster.begin(), cluster.end(), [](uint8_t b) { return b != 0; })) {
        corpus.push_back(std::move(cluster));
      }
      if (!in) break;
    }
    if (corpus.size() == kClusters) break;
  }
  return corpus;
}

const std::vector<Cluster>& Corpus() {
  static const std::vector<Cluster> corpus = [] {
    const char* directory = std::getenv("ZQCOW_BENCH_CORPUS");
    return directory != nullptr ? FileCorpus(directory) : GeneratedCorpus();
  }();
  return corpus;
}

// Times `compress(cluster, output)` over the corpus, as the image writer uses it: a cluster
// must shrink below its own size to be stored compressed, and a result of 0 means it did not
// (it is then stored as is). `compress` returns Result<size_t>; an error skips the benchmark.
template <typename CompressFn>
void TimeCompression(benchmark::State& state, CompressFn compress) {
  const auto& corpus = Corpus();
  std::vector<uint8_t> output(kClusterSize - 1);
  size_t out_bytes = 0;
  size_t stored = 0;
  for (auto _ : state) {
    out_bytes = 0;
    stored = 0;
    for (const auto& cluster : corpus) {
      Result<size_t> size = compress(cluster, output);
      if (!size.ok()) {
        state.SkipWithError(size.status().ToString().c_str());
        return;
      }
      if (*size == 0) ++stored;
      out_bytes += *size == 0 ? cluster.size() : *size;
    }
    benchmark::DoNotOptimize(out_bytes);
  }
  const size_t in_bytes = corpus.size() * kClusterSize;
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * in_bytes));
  state.counters["out%"] = 100.0 * static_cast<double>(out_bytes) / static_cast<double>(in_bytes);
  state.counters["stored"] = static_cast<double>(stored);
}

void BM_Compress(benchmark::State& state, CompressionType type, int level) {
  auto compressor = MakeCompressor(type, level);
  if (!compressor.ok()) {
    state.SkipWithError(compressor.status().ToString().c_str());
    return;
  }
  TimeCompression(state, [&](std::span<const uint8_t> cluster, std::span<uint8_t> output) {
    return (*compressor)->Compress(cluster, output);
  });
}

// Plain zstd at `level` with the parameters zstd picks for a cluster-sized input (what
// QEMU writes), to compare with our tuned default level.
void BM_CompressPlainZstd(benchmark::State& state, int level) {
  ZSTD_CCtx* context = ZSTD_createCCtx();
  TimeCompression(state, [&](std::span<const uint8_t> cluster, std::span<uint8_t> output) {
    const size_t size = ZSTD_compressCCtx(context, output.data(), output.size(), cluster.data(),
                                          cluster.size(), level);
    return Result<size_t>(ZSTD_isError(size) ? 0 : size);  // an error: does not fit
  });
  ZSTD_freeCCtx(context);
}

void BM_Decompress(benchmark::State& state, CompressionType type, int level) {
  const auto& corpus = Corpus();
  auto compressor = MakeCompressor(type, level);
  if (!compressor.ok()) {
    state.SkipWithError(compressor.status().ToString().c_str());
    return;
  }
  std::vector<std::vector<uint8_t>> streams;
  std::vector<uint8_t> output(kClusterSize - 1);
  for (const auto& cluster : corpus) {
    auto size = (*compressor)->Compress(cluster, output);
    if (size.ok() && *size > 0) streams.emplace_back(output.begin(), output.begin() + *size);
  }
  auto decompressor = MakeDecompressor(type);
  std::vector<uint8_t> cluster(kClusterSize);
  for (auto _ : state) {
    for (const auto& stream : streams) {
      Status status = decompressor->Decompress(stream, cluster);
      if (!status.ok()) {
        state.SkipWithError(status.ToString().c_str());
        return;
      }
    }
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * streams.size() * kClusterSize));
}

std::string LevelLabel(CompressionType type, int level) {
  std::string label = std::string(CompressionTypeName(type)) + "/" + std::to_string(level);
  if (type == CompressionType::kDeflate) {
    const DeflateLevelMapping& mapping = kDeflateLevels[level - kMinDeflateLevel];
    label += mapping.engine == DeflateEngine::kIsal ? "(igzip" : "(zlib";
    label += std::to_string(mapping.engine_level) + ")";
  }
  if (level == DefaultLevel(type)) label += "/default";
  return label;
}

void RegisterAll() {
  constexpr int kZstdLevels[] = {-5, 1, 2, 3, 4, 9};
  for (int level = kMinDeflateLevel; level <= kMaxDeflateLevel; ++level) {
    benchmark::RegisterBenchmark(
        ("Compress/" + LevelLabel(CompressionType::kDeflate, level)).c_str(), BM_Compress,
        CompressionType::kDeflate, level)
        ->Unit(benchmark::kMillisecond);
  }
  for (int level : kZstdLevels) {
    benchmark::RegisterBenchmark(("Compress/" + LevelLabel(CompressionType::kZstd, level)).c_str(),
                                 BM_Compress, CompressionType::kZstd, level)
        ->Unit(benchmark::kMillisecond);
  }
  benchmark::RegisterBenchmark(
      ("Compress/zstd/" + std::to_string(kZstdTunedLevel) + "-plain").c_str(), BM_CompressPlainZstd,
      kZstdTunedLevel)
      ->Unit(benchmark::kMillisecond);
  for (auto type : {CompressionType::kDeflate, CompressionType::kZstd}) {
    benchmark::RegisterBenchmark(("Decompress/" + LevelLabel(type, DefaultLevel(type))).c_str(),
                                 BM_Decompress, type, DefaultLevel(type))
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace
}  // namespace zqcow::codec

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  zqcow::codec::RegisterAll();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
