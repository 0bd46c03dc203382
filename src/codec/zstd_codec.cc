// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// zstd clusters (qcow2 compression type 1): one frame per cluster on write; on read, frames
// are decoded until the cluster is full, the way QEMU reads them.

#include <zstd.h>
#include <zstd_errors.h>

#include <string>

#include "codec/codec.h"

namespace zqcow::codec::internal {
namespace {

std::string ZstdError(const char* what, size_t ret) {
  return std::string("zstd ") + what + ": " + ZSTD_getErrorName(ret);
}

class ZstdCompressor final : public Compressor {
 public:
  ZstdCompressor() = default;
  ~ZstdCompressor() override { ZSTD_freeCCtx(context_); }
  ZstdCompressor(const ZstdCompressor&) = delete;
  ZstdCompressor& operator=(const ZstdCompressor&) = delete;

  Status Init(int level) {
    context_ = ZSTD_createCCtx();
    if (context_ == nullptr) return Status::IOError("zstd: cannot allocate a compression context");
    size_t ret = ZSTD_CCtx_setParameter(context_, ZSTD_c_compressionLevel, level);
    if (ZSTD_isError(ret)) return Status::InvalidArgument(ZstdError("compression level", ret));
    if (level != kZstdTunedLevel) return Status::OK();
    // See codec.h: level 3 keeps zstd's large-input table sizes on small clusters. zstd
    // still clamps them to the input's size (hashLog <= log2(input) + 1).
    ret = ZSTD_CCtx_setParameter(context_, ZSTD_c_hashLog, kZstdTunedHashLog);
    if (ZSTD_isError(ret)) return Status::InvalidArgument(ZstdError("hash log", ret));
    ret = ZSTD_CCtx_setParameter(context_, ZSTD_c_chainLog, kZstdTunedChainLog);
    if (ZSTD_isError(ret)) return Status::InvalidArgument(ZstdError("chain log", ret));
    return Status::OK();
  }

  Result<size_t> Compress(std::span<const uint8_t> input, std::span<uint8_t> output) override {
    if (output.empty()) return size_t{0};
    // ZSTD_compress2 starts a new frame (resetting the session, keeping the parameters) and
    // records the content size, so the frame's window never exceeds the cluster.
    const size_t ret =
        ZSTD_compress2(context_, output.data(), output.size(), input.data(), input.size());
    if (!ZSTD_isError(ret)) return ret;
    if (ZSTD_getErrorCode(ret) == ZSTD_error_dstSize_tooSmall) return size_t{0};
    return Status::InvalidArgument(ZstdError("compress", ret));
  }

 private:
  ZSTD_CCtx* context_ = nullptr;
};

class ZstdDecompressor final : public Decompressor {
 public:
  ZstdDecompressor() : context_(ZSTD_createDCtx()) {}
  ~ZstdDecompressor() override { ZSTD_freeDCtx(context_); }
  ZstdDecompressor(const ZstdDecompressor&) = delete;
  ZstdDecompressor& operator=(const ZstdDecompressor&) = delete;

  Status Decompress(std::span<const uint8_t> input, std::span<uint8_t> output) override {
    if (context_ == nullptr)
      return Status::IOError("zstd: cannot allocate a decompression context");
    // Forget any frame left half-read by the previous cluster.
    size_t ret = ZSTD_DCtx_reset(context_, ZSTD_reset_session_only);
    if (ZSTD_isError(ret)) return Status::IOError(ZstdError("reset", ret));
    ZSTD_inBuffer in{input.data(), input.size(), 0};
    ZSTD_outBuffer out{output.data(), output.size(), 0};
    // Several frames may follow each other; bytes after the one that fills the cluster are
    // never looked at.
    while (out.pos < out.size) {
      const size_t in_before = in.pos;
      const size_t out_before = out.pos;
      ret = ZSTD_decompressStream(context_, &out, &in);
      if (ZSTD_isError(ret)) return Status::Corruption(ZstdError("decompress", ret));
      if (in.pos == in_before && out.pos == out_before) {
        return Status::Corruption("zstd stream is truncated after " + std::to_string(out.pos) +
                                  " of " + std::to_string(out.size) + " bytes");
      }
    }
    return Status::OK();
  }

 private:
  ZSTD_DCtx* context_;
};

}  // namespace

Result<std::unique_ptr<Compressor>> MakeZstdCompressor(int level) {
  auto compressor = std::make_unique<ZstdCompressor>();
  ZQ_RETURN_IF_ERROR(compressor->Init(level));
  return std::unique_ptr<Compressor>(std::move(compressor));
}

std::unique_ptr<Decompressor> MakeZstdDecompressor() {
  return std::make_unique<ZstdDecompressor>();
}

}  // namespace zqcow::codec::internal
