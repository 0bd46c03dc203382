// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The zqcow subcommands. Each Add*Command registers its CLI11 subcommand (options bound to
// state owned by the returned `run`) on `parent`; main() calls `run` of the subcommand the
// user chose after parsing, and exits with its return value.

#ifndef ZQCOW_TOOLS_COMMANDS_H_
#define ZQCOW_TOOLS_COMMANDS_H_

#include <CLI/CLI.hpp>
#include <functional>

namespace zqcow::cli {

struct Subcommand {
  CLI::App* app = nullptr;
  std::function<int()> run;
  // Exit code for a usage error (bad options) of this subcommand.
  int usage_error_exit_code = 1;
};

Subcommand AddConvertCommand(CLI::App& parent);
Subcommand AddInfoCommand(CLI::App& parent);
Subcommand AddCheckCommand(CLI::App& parent);
Subcommand AddCompareCommand(CLI::App& parent);
Subcommand AddMapCommand(CLI::App& parent);
Subcommand AddBackupCommand(CLI::App& parent);
Subcommand AddVerifyCommand(CLI::App& parent);
Subcommand AddPruneCommand(CLI::App& parent);
Subcommand AddRestoreCommand(CLI::App& parent);
Subcommand AddMeasureCommand(CLI::App& parent);

}  // namespace zqcow::cli

#endif  // ZQCOW_TOOLS_COMMANDS_H_
