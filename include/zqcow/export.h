// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// ZQCOW_EXPORT marks the public API. libzqcow is compiled with -fvisibility=hidden, so a
// class or function declared in include/zqcow/ without it is not part of the shared
// library's interface (`nm -D --defined-only libzqcow.so.0` lists what is).

#ifndef ZQCOW_EXPORT_H_
#define ZQCOW_EXPORT_H_

#if defined(__GNUC__) || defined(__clang__)
#define ZQCOW_EXPORT __attribute__((visibility("default")))
#else
#define ZQCOW_EXPORT
#endif

#endif  // ZQCOW_EXPORT_H_
