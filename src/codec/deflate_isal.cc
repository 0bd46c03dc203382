// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Raw deflate through ISA-L igzip with its history limited to 4 KiB (hist_bits 12), so the
// stream never refers back farther than QEMU's inflate window. Verified for every igzip
// level 0..3 by codec_test (one-byte-at-a-time inflate with windowBits -12).

#include <isa-l/igzip_lib.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "codec/codec.h"

namespace zqcow::codec::internal {
namespace {

// Level buffer size per igzip level (level 0 needs none).
size_t LevelBufferSize(int isal_level) {
  switch (isal_level) {
    case 1:
      return ISAL_DEF_LVL1_DEFAULT;
    case 2:
      return ISAL_DEF_LVL2_DEFAULT;
    case 3:
      return ISAL_DEF_LVL3_DEFAULT;
    default:
      return 0;
  }
}

class IsalDeflateCompressor final : public Compressor {
 public:
  explicit IsalDeflateCompressor(int isal_level)
      : level_(isal_level), level_buffer_(LevelBufferSize(isal_level)) {}

  Result<size_t> Compress(std::span<const uint8_t> input, std::span<uint8_t> output) override {
    constexpr size_t kMaxSize = std::numeric_limits<uint32_t>::max();
    if (input.size() > kMaxSize) {
      return Status::InvalidArgument("igzip deflate: input of " + std::to_string(input.size()) +
                                     " bytes is too large");
    }
    if (output.empty()) return size_t{0};
    isal_deflate_stateless_init(&stream_);
    stream_.level = static_cast<uint32_t>(level_);
    stream_.level_buf = level_buffer_.empty() ? nullptr : level_buffer_.data();
    stream_.level_buf_size = static_cast<uint32_t>(level_buffer_.size());
    stream_.hist_bits = kDeflateWindowBits;
    stream_.gzip_flag = IGZIP_DEFLATE;
    stream_.end_of_stream = 1;
    stream_.flush = NO_FLUSH;
    // igzip never writes through next_in; its API just lacks the const.
    stream_.next_in = const_cast<uint8_t*>(input.data());
    stream_.avail_in = static_cast<uint32_t>(input.size());
    stream_.next_out = output.data();
    stream_.avail_out = static_cast<uint32_t>(std::min(output.size(), kMaxSize));
    const int ret = isal_deflate_stateless(&stream_);
    if (ret == STATELESS_OVERFLOW) return size_t{0};
    if (ret != COMP_OK) {
      return Status::InvalidArgument("igzip deflate level " + std::to_string(level_) +
                                     ": isal_deflate_stateless failed with " + std::to_string(ret));
    }
    return static_cast<size_t>(stream_.total_out);
  }

 private:
  const int level_;
  std::vector<uint8_t> level_buffer_;
  isal_zstream stream_{};
};

}  // namespace

Result<std::unique_ptr<Compressor>> MakeIsalDeflateCompressor(int isal_level) {
  if (isal_level < ISAL_DEF_MIN_LEVEL || isal_level > ISAL_DEF_MAX_LEVEL) {
    return Status::InvalidArgument("igzip deflate level " + std::to_string(isal_level) +
                                   " is out of range");
  }
  return std::unique_ptr<Compressor>(std::make_unique<IsalDeflateCompressor>(isal_level));
}

}  // namespace zqcow::codec::internal
