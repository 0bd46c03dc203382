// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Process-wide resource figures for ConvertStats: CPU time and peak resident memory.

#ifndef ZQCOW_CONVERT_PROCESS_STATS_H_
#define ZQCOW_CONVERT_PROCESS_STATS_H_

#include <cstdint>

namespace zqcow::convert {

// User + system CPU seconds used so far by the whole process (all threads).
double ProcessCpuSeconds();

// Peak resident set size of the process so far, in bytes (getrusage ru_maxrss).
uint64_t PeakRssBytes();

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_PROCESS_STATS_H_
