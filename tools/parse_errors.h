// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Turns a CLI11 parse error into one line that names what the user typed wrong: an option
// zqcow does not know (often a qemu-img option it does not support) rather than CLI11's
// "arguments were not expected: DST -S".

#ifndef ZQCOW_TOOLS_PARSE_ERRORS_H_
#define ZQCOW_TOOLS_PARSE_ERRORS_H_

#include <CLI/CLI.hpp>
#include <string>

namespace zqcow::cli {

// The error line (without the "zqcow: " prefix) for `error`, raised while parsing `argv`
// for `command` (the subcommand that was being parsed; null when none was).
std::string DescribeParseError(const CLI::App* command, int argc, char** argv,
                               const CLI::ParseError& error);

}  // namespace zqcow::cli

#endif  // ZQCOW_TOOLS_PARSE_ERRORS_H_
