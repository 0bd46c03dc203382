// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Cluster codecs: raw deflate with a 4 KiB window (what QEMU's qcow2 reads as compression
// type 0) and zstd (type 1), behind one small interface.
//
// Threading: a Compressor/Decompressor object keeps per-stream state and is NOT thread-safe;
// each worker thread owns its own. Creating one is cheap enough to do once per thread.

#ifndef ZQCOW_CODEC_CODEC_H_
#define ZQCOW_CODEC_CODEC_H_

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
Result<CompressionType> ParseCompressionType(std::string_view name);

// Level semantics (the default is what kDefaultLevel returns):
// - deflate: 1..9. Levels served by ISA-L igzip (history limited to 12 bits, so every
//   back-reference stays inside QEMU's 4 KiB window) are the fast ones; the rest use zlib
//   with windowBits -12 at that zlib level. zlib level 6 reproduces QEMU's output size.
// - zstd: 1..19 (and negative "fast" levels down to -5); QEMU always uses 3.
int DefaultLevel(CompressionType type);
Status ValidateLevel(CompressionType type, int level);

class Compressor {
 public:
  virtual ~Compressor() = default;
  // Compresses `input` (one whole guest cluster) into `output`. Returns the compressed size,
  // or 0 when the result would not fit in output.size() bytes (the caller then stores the
  // cluster uncompressed). The output is one self-contained stream: raw deflate ending with
  // a final block, or exactly one zstd frame.
  virtual Result<size_t> Compress(std::span<const uint8_t> input, std::span<uint8_t> output) = 0;
};

class Decompressor {
 public:
  virtual ~Decompressor() = default;
  // Decompresses until `output` (one whole cluster) is full. `input` may carry trailing
  // garbage after the stream (the rest of the last 512-byte sector, or the next compressed
  // cluster): it is ignored, as QEMU does. Fails with kCorruption when the stream is
  // malformed or ends before output is full.
  virtual Status Decompress(std::span<const uint8_t> input, std::span<uint8_t> output) = 0;
};

Result<std::unique_ptr<Compressor>> MakeCompressor(CompressionType type, int level);
std::unique_ptr<Decompressor> MakeDecompressor(CompressionType type);

}  // namespace zqcow::codec

#endif  // ZQCOW_CODEC_CODEC_H_
