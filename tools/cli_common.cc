// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "cli_common.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <span>

#include "format/probe.h"

namespace zqcow::cli {
namespace {

constexpr uint64_t kKiB = 1024;
constexpr int kJsonIndent = 4;
constexpr int kProgressSteps = 10;  // non-terminal: one line per 10%
constexpr auto kRedrawInterval = std::chrono::milliseconds(100);
constexpr double kBytesPerMiB = 1024.0 * 1024.0;

// Signals closer together than this are one request to stop: `timeout` sends SIGTERM to
// the process and then to its process group, a terminal's Ctrl-C reaches every process of
// the foreground group, and the second copy must not kill the process before its final
// flush. Only a signal that comes later is an impatient user's "kill it now".
constexpr int64_t kSameRequestNanoseconds = 500'000'000;

std::atomic<bool> g_cancel{false};
volatile sig_atomic_t g_signal = 0;
std::atomic<int64_t> g_first_signal_ns{0};
static_assert(std::atomic<int64_t>::is_always_lock_free, "used in a signal handler");

int64_t MonotonicNanoseconds() {
  struct timespec now {};
  clock_gettime(CLOCK_MONOTONIC, &now);  // async-signal-safe
  return int64_t{now.tv_sec} * 1'000'000'000 + now.tv_nsec;
}

void OnCancelSignal(int signal_number) {
  const int saved_errno = errno;
  const int64_t now = MonotonicNanoseconds();
  if (!g_cancel.load(std::memory_order_relaxed)) {
    g_first_signal_ns.store(now, std::memory_order_relaxed);
    g_signal = signal_number;
    g_cancel.store(true, std::memory_order_relaxed);
  } else if (now - g_first_signal_ns.load(std::memory_order_relaxed) > kSameRequestNanoseconds) {
    // A separate, later request: die the default way. The signal is blocked while its
    // handler runs, so the raised one arrives on return, with the default action.
    struct sigaction default_action {};
    default_action.sa_handler = SIG_DFL;
    sigemptyset(&default_action.sa_mask);
    sigaction(signal_number, &default_action, nullptr);
    raise(signal_number);
  }
  errno = saved_errno;
}

std::string FormatEta(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  auto total = static_cast<uint64_t>(seconds + 0.5);
  uint64_t hours = total / 3600, minutes = total / 60 % 60, secs = total % 60;
  if (hours > 0) return fmt::format("{}:{:02}:{:02}", hours, minutes, secs);
  return fmt::format("{:02}:{:02}", minutes, secs);
}

}  // namespace

void PrintError(std::string_view message) {
  std::string line(message);
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  std::cout.flush();
  std::fprintf(stderr, "zqcow: %s\n", line.c_str());
}

int ReportError(const Status& status, int exit_code) {
  PrintError(status.message());
  return exit_code;
}

Result<OutputFormat> ParseOutputFormat(std::string_view text) {
  if (text == "human") return OutputFormat::kHuman;
  if (text == "json") return OutputFormat::kJson;
  return Status::InvalidArgument(
      fmt::format("--output: unknown format '{}' (expected 'human' or 'json')", text));
}

void PrintJson(const nlohmann::json& value) { std::cout << value.dump(kJsonIndent) << "\n"; }

std::string HumanSize(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < kKiB) return fmt::format("{} B", bytes);
  double value = static_cast<double>(bytes);
  size_t unit = 0;
  while (value >= static_cast<double>(kKiB) && unit + 1 < std::size(kUnits)) {
    value /= static_cast<double>(kKiB);
    ++unit;
  }
  // Two decimals at most, trailing zeros dropped: "1.5 MiB", "64 KiB", "1000 MiB".
  std::string text = fmt::format("{:.2f}", value);
  while (text.back() == '0') text.pop_back();
  if (text.back() == '.') text.pop_back();
  return fmt::format("{} {}", text, kUnits[unit]);
}

Result<int64_t> ParseInteger(std::string_view text, std::string_view what) {
  int64_t value = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end) {
    return Status::InvalidArgument(fmt::format("{}: '{}' is not an integer", what, text));
  }
  return value;
}

Result<uint64_t> ParseSize(std::string_view text, std::string_view what) {
  uint64_t number = 0;
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(begin, end, number);
  if (text.empty() || ec != std::errc() || ptr == begin) {
    return Status::InvalidArgument(fmt::format("{}: '{}' is not a size", what, text));
  }
  std::string_view suffix(ptr, static_cast<size_t>(end - ptr));
  if (suffix.ends_with("iB")) {
    suffix.remove_suffix(2);
  } else if (suffix.size() == 2 && (suffix.back() == 'B' || suffix.back() == 'b')) {
    suffix.remove_suffix(1);
  } else if (suffix == "B" || suffix == "b") {
    suffix = "";
  }
  int shift = 0;
  if (suffix.size() > 1) {
    return Status::InvalidArgument(fmt::format("{}: '{}' has an unknown size suffix", what, text));
  }
  if (suffix.size() == 1) {
    switch (suffix[0]) {
      case 'k':
      case 'K':
        shift = 10;
        break;
      case 'm':
      case 'M':
        shift = 20;
        break;
      case 'g':
      case 'G':
        shift = 30;
        break;
      case 't':
      case 'T':
        shift = 40;
        break;
      default:
        return Status::InvalidArgument(
            fmt::format("{}: '{}' has an unknown size suffix", what, text));
    }
  }
  if (shift > 0 && number > (UINT64_MAX >> shift)) {
    return Status::InvalidArgument(fmt::format("{}: '{}' is too large", what, text));
  }
  return number << shift;
}

Result<std::string> DetectFormat(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, path);
  struct stat st {};
  uint64_t size = 0;
  std::array<uint8_t, format::kProbeBytes> head{};
  size_t got = 0;
  int err = 0;
  if (fstat(fd, &st) != 0) {
    err = errno;
  } else if (S_ISBLK(st.st_mode)) {
    const off_t end = lseek(fd, 0, SEEK_END);
    if (end < 0) err = errno;
    size = end < 0 ? 0 : static_cast<uint64_t>(end);
  } else {
    size = static_cast<uint64_t>(st.st_size);
  }
  while (err == 0 && got < head.size()) {
    const ssize_t n = pread(fd, head.data() + got, head.size() - got, static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) err = errno;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  close(fd);
  if (err != 0) return Status::FromErrno(err, path);
  return std::string(
      format::ProbeImageFormat(std::span<const uint8_t>(head).first(got), size, path));
}

Result<std::string> ResolveFormat(const std::string& path, const std::string& requested) {
  // Images are files or block devices: a pipe or FIFO would block or read as an empty
  // disk, a character device (/dev/zero) as one of no size.
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return Status::FromErrno(errno, path);
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    return Status::NotSupported(path + ": not a regular file or block device");
  }
  if (requested.empty()) {
    ZQ_ASSIGN_OR_RETURN(std::string detected, DetectFormat(path));
    ZQ_RETURN_IF_ERROR(format::CheckReadableFormat(path, detected));
    return detected;
  }
  if (requested == kFormatRaw || requested == kFormatQcow2) return requested;
  return Status::InvalidArgument(
      fmt::format("{}: unknown image format '{}' (expected raw or qcow2)", path, requested));
}

void CancelSignals::Install() {
  struct sigaction action {};
  action.sa_handler = OnCancelSignal;
  sigemptyset(&action.sa_mask);
  // A later second signal takes the default action (OnCancelSignal): an impatient user can
  // still kill the process outright.
  action.sa_flags = SA_RESTART;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

const std::atomic<bool>* CancelSignals::cancel_flag() { return &g_cancel; }

int CancelSignals::received_signal() { return g_signal; }

const char* CancelSignals::SignalName(int signal_number) {
  switch (signal_number) {
    case SIGINT:
      return "SIGINT";
    case SIGTERM:
      return "SIGTERM";
    default:
      return "a signal";
  }
}

ProgressBar::ProgressBar(bool enabled)
    : enabled_(enabled), terminal_(enabled && isatty(STDERR_FILENO) == 1) {}

void ProgressBar::Update(const ConvertProgress& progress) {
  if (!enabled_) return;
  double fraction = progress.bytes_total == 0 ? 1.0
                                              : static_cast<double>(progress.bytes_done) /
                                                    static_cast<double>(progress.bytes_total);
  if (!terminal_) {
    int step = static_cast<int>(fraction * kProgressSteps);
    if (step <= last_step_) return;
    last_step_ = step;
    std::fprintf(stderr, "progress: %d%% (%s / %s)\n", step * (100 / kProgressSteps),
                 HumanSize(progress.bytes_done).c_str(), HumanSize(progress.bytes_total).c_str());
    return;
  }
  auto now = std::chrono::steady_clock::now();
  bool done = progress.bytes_done >= progress.bytes_total;
  if (drawn_ && !done && now - last_draw_ < kRedrawInterval) return;
  last_draw_ = now;
  double mib_s = progress.elapsed_seconds > 0 ? static_cast<double>(progress.bytes_done) /
                                                    kBytesPerMiB / progress.elapsed_seconds
                                              : 0.0;
  double remaining = static_cast<double>(progress.bytes_total -
                                         std::min(progress.bytes_total, progress.bytes_done));
  double eta = mib_s > 0 ? remaining / kBytesPerMiB / mib_s : NAN;
  std::string line =
      fmt::format("\r    ({:6.2f}/100%) {} / {}, {:.1f} MiB/s, ETA {}\x1b[K", fraction * 100.0,
                  HumanSize(progress.bytes_done), HumanSize(progress.bytes_total), mib_s,
                  FormatEta(done ? 0.0 : eta));
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
  drawn_ = true;
}

void ProgressBar::Finish() {
  if (enabled_ && terminal_ && drawn_) {
    std::fputs("\n", stderr);
    std::fflush(stderr);
  }
}

std::string FullBackingName(const std::string& image, const std::string& backing) {
  if (backing.empty() || backing[0] == '/') return backing;
  const size_t slash = image.rfind('/');
  if (slash == std::string::npos) return backing;
  return image.substr(0, slash + 1) + backing;
}

}  // namespace zqcow::cli
