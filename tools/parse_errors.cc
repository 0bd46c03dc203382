// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "parse_errors.h"

#include <optional>
#include <string_view>

namespace zqcow::cli {

namespace {

// The first argument after the subcommand's name that is spelled as an option (-x...,
// --name[=value]) but is none of `command`'s. Values that begin with '-' are rare in
// zqcow's options; a value of a known option is skipped when it is a separate argument.
std::optional<std::string> FirstUnknownOption(const CLI::App& command, int argc, char** argv) {
  int first = 1;
  while (first < argc && command.get_name() != argv[first]) ++first;
  for (int i = first + 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--") break;
    if (arg.size() < 2 || arg[0] != '-') continue;
    std::string name;
    if (arg[1] == '-') {
      name = std::string(arg.substr(0, arg.find('=')));
    } else {
      name = std::string(arg.substr(0, 2));
    }
    const CLI::Option* option = command.get_option_no_throw(name);
    if (option == nullptr) return name;
    // "-t VALUE": the value is not an option even when it starts with '-'.
    if (option->get_items_expected_min() > 0 && arg.size() == name.size() && arg.find('=') == arg.npos) {
      ++i;
    }
  }
  return std::nullopt;
}

}  // namespace

std::string DescribeParseError(const CLI::App* command, int argc, char** argv,
                               const CLI::ParseError& error) {
  if (command == nullptr) return std::string(error.what()) + " (see zqcow --help)";
  const std::string name = command->get_name();
  if (std::optional<std::string> unknown = FirstUnknownOption(*command, argc, argv)) {
    return name + ": option " + *unknown + " is not supported (see zqcow " + name + " --help)";
  }
  return name + ": " + error.what() + " (see zqcow " + name + " --help)";
}

}  // namespace zqcow::cli
