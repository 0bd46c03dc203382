// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// `zqcow --version` names the version, the commit and every library in use, as the library
// reports them (zqcow/version.h).

#include "zqcow/version.h"

#include <gtest/gtest.h>
#include <zlib.h>
#include <zstd.h>

#include <string>

#include "testing/test_util.h"

namespace zqcow {
namespace {

TEST(VersionTest, LibraryListsItsCodecsWithRunTimeVersions) {
  EXPECT_NE(std::string(Version()).find('.'), std::string::npos) << Version();
  EXPECT_STRNE(GitCommit(), "");
  bool zlib = false, zstd = false, isal = false, uring = false;
  for (const LibraryVersion& library : LibraryVersions()) {
    EXPECT_FALSE(library.version.empty()) << library.name;
    if (library.name == "zlib") zlib = library.version == zlibVersion() && !library.build_time;
    if (library.name == "zstd") {
      zstd = library.version == ZSTD_versionString() && !library.build_time;
    }
    if (library.name == "isa-l") isal = true;
    if (library.name == "liburing") uring = true;
  }
  EXPECT_TRUE(zlib && zstd && isal && uring);
}

TEST(VersionTest, CliPrintsVersionCommitAndLibraries) {
  testing::CommandResult result = testing::RunCommand(testing::ZqcowBinary() + " --version");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  const std::string first_line = result.output.substr(0, result.output.find('\n'));
  EXPECT_EQ(first_line, std::string("zqcow ") + Version() + " (commit " + GitCommit() + ")");
  for (const LibraryVersion& library : LibraryVersions()) {
    EXPECT_NE(result.output.find(library.name + " " + library.version), std::string::npos)
        << result.output;
  }
}

}  // namespace
}  // namespace zqcow
