// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Codec names, level validation and the factories that pick an engine for a level.

#include "codec/codec.h"

#include <string>

namespace zqcow::codec {

std::string_view CompressionTypeName(CompressionType type) {
  switch (type) {
    case CompressionType::kDeflate:
      return "zlib";
    case CompressionType::kZstd:
      return "zstd";
  }
  return "unknown";
}

Result<CompressionType> ParseCompressionType(std::string_view name) {
  if (name == "zlib" || name == "deflate") return CompressionType::kDeflate;
  if (name == "zstd") return CompressionType::kZstd;
  return Status::InvalidArgument("compression type '" + std::string(name) +
                                 "' is not one of zlib, deflate, zstd");
}

int DefaultLevel(CompressionType type) {
  return type == CompressionType::kZstd ? kDefaultZstdLevel : kDefaultDeflateLevel;
}

Status ValidateLevel(CompressionType type, int level) {
  switch (type) {
    case CompressionType::kDeflate:
      if (level >= kMinDeflateLevel && level <= kMaxDeflateLevel) return Status::OK();
      return Status::InvalidArgument("zlib compression level " + std::to_string(level) +
                                     " is out of range " + std::to_string(kMinDeflateLevel) + ".." +
                                     std::to_string(kMaxDeflateLevel));
    case CompressionType::kZstd:
      // zstd treats 0 as "default"; we ask for an explicit level instead.
      if (level != 0 && level >= kMinZstdLevel && level <= kMaxZstdLevel) return Status::OK();
      return Status::InvalidArgument("zstd compression level " + std::to_string(level) +
                                     " is out of range " + std::to_string(kMinZstdLevel) +
                                     "..-1, 1.." + std::to_string(kMaxZstdLevel));
  }
  return Status::InvalidArgument("compression type " + std::to_string(static_cast<int>(type)) +
                                 " is unknown");
}

Result<std::unique_ptr<Compressor>> MakeCompressor(CompressionType type, int level) {
  ZQ_RETURN_IF_ERROR(ValidateLevel(type, level));
  if (type == CompressionType::kZstd) return internal::MakeZstdCompressor(level);
  const DeflateLevelMapping& mapping = kDeflateLevels[level - kMinDeflateLevel];
  if (mapping.engine == DeflateEngine::kIsal) {
    return internal::MakeIsalDeflateCompressor(mapping.engine_level);
  }
  return internal::MakeZlibDeflateCompressor(mapping.engine_level);
}

std::unique_ptr<Decompressor> MakeDecompressor(CompressionType type) {
  if (type == CompressionType::kZstd) return internal::MakeZstdDecompressor();
  return internal::MakeDeflateDecompressor();
}

}  // namespace zqcow::codec
