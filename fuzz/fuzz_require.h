// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// FUZZ_REQUIRE(condition): a property every fuzz target checks besides "no crash". When it
// does not hold, names the property and aborts, which libFuzzer reports as a crash and saves
// the input.

#ifndef ZQCOW_FUZZ_FUZZ_REQUIRE_H_
#define ZQCOW_FUZZ_FUZZ_REQUIRE_H_

#include <cstdio>
#include <cstdlib>

#define FUZZ_REQUIRE(condition)                                                                    \
  do {                                                                                             \
    if (!(condition)) {                                                                            \
      std::fprintf(stderr, "%s:%d: property does not hold: %s\n", __FILE__, __LINE__, #condition); \
      std::abort();                                                                                \
    }                                                                                              \
  } while (0)

#endif  // ZQCOW_FUZZ_FUZZ_REQUIRE_H_
