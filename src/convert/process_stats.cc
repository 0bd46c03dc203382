// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/process_stats.h"

#include <sys/resource.h>

namespace zqcow::convert {

namespace {

constexpr double kMicrosecondsPerSecond = 1e6;
constexpr uint64_t kBytesPerKiB = 1024;  // Linux reports ru_maxrss in KiB

double Seconds(const timeval& tv) {
  return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / kMicrosecondsPerSecond;
}

}  // namespace

double ProcessCpuSeconds() {
  rusage usage{};
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0;
  return Seconds(usage.ru_utime) + Seconds(usage.ru_stime);
}

uint64_t PeakRssBytes() {
  rusage usage{};
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0;
  return static_cast<uint64_t>(usage.ru_maxrss) * kBytesPerKiB;
}

}  // namespace zqcow::convert
