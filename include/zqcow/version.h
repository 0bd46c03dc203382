// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// What the library is and what it runs with: its version, the git commit it was built from,
// and the codec and I/O libraries it uses, as `zqcow --version` prints them.

#ifndef ZQCOW_VERSION_H_
#define ZQCOW_VERSION_H_

#include <string>
#include <vector>

#include "zqcow/export.h"

namespace zqcow {

// "0.1.0": project(VERSION) in CMakeLists.txt.
ZQCOW_EXPORT const char* Version();

// The output of `git describe --always --dirty` when the library was configured, "unknown"
// when it was built outside a git checkout.
ZQCOW_EXPORT const char* GitCommit();

// One library zqcow uses. `version` is what the library reports at run time when it has a
// call for that, else the version of the headers it was built with (`build_time`), else
// "unknown".
struct LibraryVersion {
  std::string name;
  std::string version;
  bool build_time = false;
};

// zlib, ISA-L, zstd, liburing and (when linked) libnbd.
ZQCOW_EXPORT std::vector<LibraryVersion> LibraryVersions();

}  // namespace zqcow

#endif  // ZQCOW_VERSION_H_
