// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Finding all-zero clusters, which the pipeline leaves unallocated instead of storing.

#ifndef ZQCOW_CONVERT_ZERO_DETECT_H_
#define ZQCOW_CONVERT_ZERO_DETECT_H_

#include <cstdint>
#include <span>

namespace zqcow::convert {

// True when every byte of `data` is zero (true for an empty span). Reads memory word-wise
// in blocks and stops at the first block holding a non-zero byte. Any alignment.
bool IsAllZero(std::span<const uint8_t> data);

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_ZERO_DETECT_H_
