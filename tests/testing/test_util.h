// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Helpers shared by the tests: scratch directories, running commands (qemu-img, qemu-io,
// the zqcow CLI), and deterministic data generators.

#ifndef ZQCOW_TESTS_TESTING_TEST_UTIL_H_
#define ZQCOW_TESTS_TESTING_TEST_UTIL_H_

#include <cstdint>
#include <string>
#include <vector>

namespace zqcow::testing {

// Sanitizer runtimes keep freed memory in quarantine and add shadow memory, so resident-
// memory bounds are only asserted in plain builds.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool kSanitizerBuild = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
inline constexpr bool kSanitizerBuild = true;
#else
inline constexpr bool kSanitizerBuild = false;
#endif
#else
inline constexpr bool kSanitizerBuild = false;
#endif

// A fresh directory under $TMPDIR (default /var/tmp, which is disk-backed so O_DIRECT
// works), removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = -1;   // -1 when killed by a signal
  std::string output;   // stdout and stderr together
};
// Runs `command` through /bin/sh, capturing stdout+stderr.
CommandResult RunCommand(const std::string& command);
// Single-quotes a string for the shell.
std::string ShellQuote(const std::string& s);

// Whether qemu-img and qemu-io are on PATH (tests that need them fail loudly if not:
// scripts/setup installs them).
bool HaveQemu();
// `qemu-img check` exit code (0 clean, 2 corruption, 3 leaks) with its output.
CommandResult QemuImgCheck(const std::string& image);
// `qemu-img compare` exit code: 0 identical. Formats: "raw" or "qcow2".
CommandResult QemuImgCompare(const std::string& a, const std::string& a_format,
                             const std::string& b, const std::string& b_format);
// Path of the zqcow CLI built with the tests.
std::string ZqcowBinary();

// Deterministic data of a given kind, reproducible from `seed`.
enum class DataKind { kZeros, kOnes, kRandom, kText, kMixed };
std::vector<uint8_t> MakeData(DataKind kind, size_t size, uint64_t seed);
// Writes a raw disk image of `size` bytes, `kind` data; kMixed interleaves compressible,
// incompressible and all-zero clusters (cluster_size granularity) and leaves holes.
void WriteRawImage(const std::string& path, uint64_t size, DataKind kind, uint64_t seed,
                   uint32_t cluster_size = 65536);
std::vector<uint8_t> ReadWholeFile(const std::string& path);
void WriteWholeFile(const std::string& path, const std::vector<uint8_t>& data);

}  // namespace zqcow::testing

#endif  // ZQCOW_TESTS_TESTING_TEST_UTIL_H_
