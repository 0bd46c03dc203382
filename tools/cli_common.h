// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Helpers shared by the zqcow subcommands: exit codes, one-line error printing, output
// format selection, JSON printing, human-readable sizes, size parsing, SIGINT/SIGTERM
// handling and the progress display.

#ifndef ZQCOW_TOOLS_CLI_COMMON_H_
#define ZQCOW_TOOLS_CLI_COMMON_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "zqcow/convert.h"
#include "zqcow/status.h"

namespace zqcow::cli {

// Exit codes shared by every subcommand (docs/CLI.md lists them per subcommand).
inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;
// check: findings.
inline constexpr int kExitCheckCorruption = 2;
inline constexpr int kExitCheckLeaksOrIncomplete = 3;
// compare: the images differ (1) or the comparison could not run (2).
inline constexpr int kExitCompareDifferent = 1;
inline constexpr int kExitCompareError = 2;
// 128 + signal number, as shells report a process killed by that signal.
inline constexpr int kExitSignalBase = 128;

// Prints "zqcow: <message>" as one line on stderr (newlines in `message` become spaces).
void PrintError(std::string_view message);
// PrintError(status.message()) and returns `exit_code`.
int ReportError(const Status& status, int exit_code = kExitError);

enum class OutputFormat { kHuman, kJson };
// Parses the value of --output ("human" or "json").
Result<OutputFormat> ParseOutputFormat(std::string_view text);

// Prints `value` indented on stdout, followed by a newline.
void PrintJson(const nlohmann::json& value);

// "512 B", "64 KiB", "1.5 MiB", "3.25 GiB" (binary units, at most 3 significant decimals).
std::string HumanSize(uint64_t bytes);
// Parses "65536", "64k", "64K", "2M", "1G", "1T" (binary multiples; an optional trailing
// "B"/"iB" is accepted). `what` names the value in the error message.
Result<uint64_t> ParseSize(std::string_view text, std::string_view what);
// Parses a decimal integer (optionally negative). `what` names it in the error message.
Result<int64_t> ParseInteger(std::string_view text, std::string_view what);

// qemu-img's full-backing-filename: a relative backing file name is relative to the
// directory of the image as named (`image`); an absolute one is itself.
std::string FullBackingName(const std::string& image, const std::string& backing);

// Image formats the CLI reads. Detection is qemu-img's (src/format/probe.h): DetectFormat
// returns whatever qemu-img would call the file ("qcow2", "raw", "vmdk", "vdi", ...).
inline constexpr std::string_view kFormatRaw = "raw";
inline constexpr std::string_view kFormatQcow2 = "qcow2";
Result<std::string> DetectFormat(const std::string& path);
// `requested` is "" (detect), "raw" or "qcow2"; anything else is kInvalidArgument. A file
// detected as a format zqcow does not read is kNotSupported naming the format; "raw" reads
// any file as raw.
Result<std::string> ResolveFormat(const std::string& path, const std::string& requested);

// SIGINT and SIGTERM handling for long operations. Install() makes both signals set the
// flag returned by cancel_flag() (and remember the signal) instead of killing the process.
// Signals arriving together (within half a second of the first: `timeout` signals the
// process and then its group) are one request; a later one kills the process the default
// way.
// Threading: call Install() from the main thread before starting worker threads.
class CancelSignals {
 public:
  static void Install();
  static const std::atomic<bool>* cancel_flag();
  // The signal that set the flag, 0 when none arrived.
  static int received_signal();
  static const char* SignalName(int signal_number);
};

// Progress display for `convert -p`. On a terminal: one line on stderr redrawn in place
// with percent, bytes done/total, MiB/s and ETA. Otherwise: a plain line on stderr at every
// 10% step. Threading: Update() and Finish() must not run concurrently (the pipeline calls
// Update() from one thread; Finish() runs after Convert returned).
class ProgressBar {
 public:
  explicit ProgressBar(bool enabled);
  void Update(const ConvertProgress& progress);
  // Ends the line on a terminal (after a last update).
  void Finish();

 private:
  bool enabled_;
  bool terminal_;
  bool drawn_ = false;
  int last_step_ = -1;  // non-terminal: last 10% step printed
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace zqcow::cli

#endif  // ZQCOW_TOOLS_CLI_COMMON_H_
