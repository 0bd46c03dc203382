// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Cluster codecs: raw deflate with a 4 KiB window (what QEMU's qcow2 reads as compression
// type 0) and zstd (type 1), behind one small interface.
//
// Threading: a Compressor/Decompressor object keeps per-stream state and is NOT thread-safe;
// each worker thread owns its own. Creating one is cheap enough to do once per thread; its
// buffers are allocated once and reused for every cluster.

#ifndef ZQCOW_CODEC_CODEC_H_
#define ZQCOW_CODEC_CODEC_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "zqcow/status.h"

namespace zqcow::codec {

// Values are the qcow2 header's compression type byte (offset 104).
enum class CompressionType : uint8_t { kDeflate = 0, kZstd = 1 };

// "zlib" / "zstd" (qemu-img's spelling of the option values).
std::string_view CompressionTypeName(CompressionType type);
// Accepts "zlib", "deflate" (alias of "zlib") and "zstd"; anything else is kInvalidArgument.
Result<CompressionType> ParseCompressionType(std::string_view name);

// Log2 of the deflate window QEMU inflates with (raw deflate, windowBits -12): no
// back-reference in a stream we write reaches farther than 1 << kDeflateWindowBits bytes.
inline constexpr int kDeflateWindowBits = 12;

// ---- Level semantics ----------------------------------------------------------------------
// deflate: levels 1..9. Levels 1..4 are ISA-L igzip (history limited to kDeflateWindowBits)
// at igzip levels 0..3; levels 5..9 are zlib (windowBits -12, memLevel 8) at the same zlib
// level. Every level writes a stream QEMU reads.
//
// The default (3 = igzip L2) trades a few percent of size against QEMU's zlib 6 for about
// ten times the speed; zlib level 1 is never used (igzip L1 gives the same size faster).
// Figures: docs/BENCHMARKS.md, "Design measurements".
//
// zstd: levels 1..19 and the "fast" levels -5..-1; the default is 3, QEMU's fixed level.
// Every level except 3 is the plain zstd level. Level 3 is zstd level 3 (double-fast, min
// match 5) with the larger match-finder tables zstd gives level 3 on inputs over 256 KiB:
// for a 64 KiB cluster zstd would shrink them to hashLog 16 / chainLog 15, which costs
// both speed and size here because the context is reused for every cluster. The frames
// stay plain zstd frames. Figures (and the settings tried and rejected): docs/BENCHMARKS.md,
// "Design measurements".
inline constexpr int kZstdTunedLevel = 3;      // the level that gets the tables below
inline constexpr int kZstdTunedHashLog = 17;   // ZSTD_c_hashLog (double-fast long table)
inline constexpr int kZstdTunedChainLog = 16;  // ZSTD_c_chainLog (double-fast short table)

enum class DeflateEngine : uint8_t { kIsal, kZlib };
struct DeflateLevelMapping {
  DeflateEngine engine;
  int engine_level;  // igzip level 0..3 or zlib level 1..9
};
inline constexpr int kMinDeflateLevel = 1;
inline constexpr int kMaxDeflateLevel = 9;
inline constexpr int kDefaultDeflateLevel = 3;
// Indexed by level - kMinDeflateLevel.
inline constexpr std::array<DeflateLevelMapping, kMaxDeflateLevel - kMinDeflateLevel + 1>
    kDeflateLevels = {{
        {DeflateEngine::kIsal, 0},  // 1
        {DeflateEngine::kIsal, 1},  // 2
        {DeflateEngine::kIsal, 2},  // 3 (default)
        {DeflateEngine::kIsal, 3},  // 4
        {DeflateEngine::kZlib, 5},  // 5
        {DeflateEngine::kZlib, 6},  // 6: QEMU's level
        {DeflateEngine::kZlib, 7},  // 7
        {DeflateEngine::kZlib, 8},  // 8
        {DeflateEngine::kZlib, 9},  // 9
    }};

inline constexpr int kMinZstdLevel = -5;
inline constexpr int kMaxZstdLevel = 19;
inline constexpr int kDefaultZstdLevel = 3;

// kDefaultDeflateLevel or kDefaultZstdLevel.
int DefaultLevel(CompressionType type);
// kInvalidArgument ("zstd level 0 is out of range -5..-1, 1..19") unless `level` is valid.
Status ValidateLevel(CompressionType type, int level);

class Compressor {
 public:
  virtual ~Compressor() = default;
  // Compresses `input` (one whole guest cluster) into `output`. Returns the compressed size,
  // or 0 when the result would not fit in output.size() bytes (the caller then stores the
  // cluster uncompressed). The output is one self-contained stream: raw deflate ending with
  // a final block, or exactly one zstd frame.
  // REQUIRES: input.size() and output.size() < 4 GiB.
  virtual Result<size_t> Compress(std::span<const uint8_t> input, std::span<uint8_t> output) = 0;
};

class Decompressor {
 public:
  virtual ~Decompressor() = default;
  // Decompresses until `output` (one whole cluster) is full. `input` may carry trailing
  // garbage after the stream (the rest of the last 512-byte sector, or the next compressed
  // cluster): it is ignored, as QEMU does. zstd input may hold several frames. Fails with
  // kCorruption when the stream is malformed or ends before output is full.
  // REQUIRES: input.size() and output.size() < 4 GiB.
  virtual Status Decompress(std::span<const uint8_t> input, std::span<uint8_t> output) = 0;
};

// kInvalidArgument when ValidateLevel(type, level) fails.
Result<std::unique_ptr<Compressor>> MakeCompressor(CompressionType type, int level);
// Never null. Should the codec library fail to allocate its state, every Decompress call
// reports that failure.
std::unique_ptr<Decompressor> MakeDecompressor(CompressionType type);

// Engine factories behind MakeCompressor/MakeDecompressor (one per source file).
namespace internal {
Result<std::unique_ptr<Compressor>> MakeIsalDeflateCompressor(int isal_level);
Result<std::unique_ptr<Compressor>> MakeZlibDeflateCompressor(int zlib_level);
std::unique_ptr<Decompressor> MakeDeflateDecompressor();
Result<std::unique_ptr<Compressor>> MakeZstdCompressor(int level);
std::unique_ptr<Decompressor> MakeZstdDecompressor();
}  // namespace internal

}  // namespace zqcow::codec

#endif  // ZQCOW_CODEC_CODEC_H_
