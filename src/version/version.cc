// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "zqcow/version.h"

#include <isa-l.h>
#include <zlib.h>
#include <zstd.h>

#include <string>

// Set by CMakeLists.txt: ZQCOW_VERSION, ZQCOW_GIT_COMMIT, ZQCOW_LIBURING_VERSION (liburing
// 2.3 has no run-time version call) and, when libnbd is linked, ZQCOW_LIBNBD_VERSION.

#define ZQCOW_STRINGIFY_INNER_(x) #x
#define ZQCOW_STRINGIFY_(x) ZQCOW_STRINGIFY_INNER_(x)

namespace zqcow {

const char* Version() { return ZQCOW_VERSION; }

const char* GitCommit() { return ZQCOW_GIT_COMMIT; }

std::vector<LibraryVersion> LibraryVersions() {
  std::vector<LibraryVersion> libraries;
  libraries.push_back({"zlib", zlibVersion(), false});
  // ISA-L has no run-time version call; isa-l.h carries the version it was built with.
  libraries.push_back({"isa-l",
                       ZQCOW_STRINGIFY_(ISAL_MAJOR_VERSION) "." ZQCOW_STRINGIFY_(
                           ISAL_MINOR_VERSION) "." ZQCOW_STRINGIFY_(ISAL_PATCH_VERSION),
                       true});
  libraries.push_back({"zstd", ZSTD_versionString(), false});
  libraries.push_back({"liburing", ZQCOW_LIBURING_VERSION, true});
#ifdef ZQCOW_LIBNBD_VERSION
  libraries.push_back({"libnbd", ZQCOW_LIBNBD_VERSION, true});
#endif
  return libraries;
}

}  // namespace zqcow
