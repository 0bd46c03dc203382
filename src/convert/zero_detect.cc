// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/zero_detect.h"

#include <cstddef>
#include <cstring>

namespace zqcow::convert {

namespace {

// Bytes OR-ed together before one test: large enough for the compiler to vectorise the
// loop, small enough that a non-zero byte early in a cluster stops the scan soon.
constexpr size_t kBlockBytes = 256;
constexpr size_t kWordBytes = sizeof(uint64_t);
constexpr size_t kWordsPerBlock = kBlockBytes / kWordBytes;

inline uint64_t LoadWord(const uint8_t* p) {
  uint64_t word;
  std::memcpy(&word, p, sizeof(word));  // unaligned-safe, compiles to one load
  return word;
}

}  // namespace

bool IsAllZero(std::span<const uint8_t> data) {
  const uint8_t* p = data.data();
  size_t left = data.size();
  while (left >= kBlockBytes) {
    uint64_t acc = 0;
    for (size_t i = 0; i < kWordsPerBlock; ++i) acc |= LoadWord(p + i * kWordBytes);
    if (acc != 0) return false;
    p += kBlockBytes;
    left -= kBlockBytes;
  }
  while (left >= kWordBytes) {
    if (LoadWord(p) != 0) return false;
    p += kWordBytes;
    left -= kWordBytes;
  }
  for (; left > 0; --left, ++p) {
    if (*p != 0) return false;
  }
  return true;
}

}  // namespace zqcow::convert
