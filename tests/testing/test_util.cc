// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "testing/test_util.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>

namespace zqcow::testing {

TempDir::TempDir() {
  const char* base = getenv("TMPDIR");
  std::string templ = std::string(base && *base ? base : "/var/tmp") + "/zqcow-test-XXXXXX";
  if (mkdtemp(templ.data()) == nullptr) throw std::runtime_error("mkdtemp failed: " + templ);
  path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  out += "'";
  return out;
}

CommandResult RunCommand(const std::string& command) {
  CommandResult result;
  std::string full = "(" + command + ") 2>&1";
  FILE* pipe = popen(full.c_str(), "r");
  if (pipe == nullptr) return result;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) result.output.append(buf, n);
  int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

bool HaveQemu() {
  return RunCommand("command -v qemu-img && command -v qemu-io").exit_code == 0;
}

CommandResult QemuImgCheck(const std::string& image) {
  return RunCommand("qemu-img check " + ShellQuote(image));
}

CommandResult QemuImgCompare(const std::string& a, const std::string& a_format,
                             const std::string& b, const std::string& b_format) {
  return RunCommand("qemu-img compare -f " + a_format + " -F " + b_format + " " + ShellQuote(a) +
                    " " + ShellQuote(b));
}

std::string ZqcowBinary() {
  const char* env = getenv("ZQCOW_BINARY");
  if (env && *env) return env;
#ifdef ZQCOW_BINARY
  return ZQCOW_BINARY;
#else
  return "zqcow";
#endif
}

std::vector<uint8_t> MakeData(DataKind kind, size_t size, uint64_t seed) {
  std::vector<uint8_t> data(size);
  std::mt19937_64 rng(seed);
  switch (kind) {
    case DataKind::kZeros:
      break;
    case DataKind::kOnes:
      std::fill(data.begin(), data.end(), 0x01);
      break;
    case DataKind::kRandom:
      for (auto& b : data) b = static_cast<uint8_t>(rng());
      break;
    case DataKind::kText: {
      static const char* kWords[] = {"qcow2 ", "cluster ", "refcount ", "the ", "image ",
                                     "compressed ", "\n", "L2 ", "table ", "zqcow "};
      size_t i = 0;
      while (i < size) {
        const char* w = kWords[rng() % 10];
        for (const char* p = w; *p && i < size; ++p) data[i++] = static_cast<uint8_t>(*p);
      }
      break;
    }
    case DataKind::kMixed: {
      // 4 KiB blocks: text, random, zeros, small integers.
      for (size_t block = 0; block * 4096 < size; ++block) {
        size_t begin = block * 4096, end = std::min(size, begin + 4096);
        int choice = static_cast<int>(rng() % 4);
        for (size_t i = begin; i < end; ++i) {
          switch (choice) {
            case 0: data[i] = static_cast<uint8_t>('a' + (rng() % 8)); break;
            case 1: data[i] = static_cast<uint8_t>(rng()); break;
            case 2: data[i] = 0; break;
            default: data[i] = static_cast<uint8_t>(i / 512); break;
          }
        }
      }
      break;
    }
  }
  return data;
}

void WriteRawImage(const std::string& path, uint64_t size, DataKind kind, uint64_t seed,
                   uint32_t cluster_size) {
  int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + path);
  if (ftruncate(fd, static_cast<off_t>(size)) != 0) throw std::runtime_error("ftruncate");
  std::mt19937_64 rng(seed);
  for (uint64_t off = 0; off < size; off += cluster_size) {
    size_t len = static_cast<size_t>(std::min<uint64_t>(cluster_size, size - off));
    DataKind k = kind;
    if (kind == DataKind::kMixed) {
      switch (rng() % 6) {
        case 0: continue;  // hole
        case 1: k = DataKind::kZeros; break;
        case 2: k = DataKind::kRandom; break;
        case 3: k = DataKind::kOnes; break;
        default: k = DataKind::kText; break;
      }
    }
    if (k == DataKind::kZeros && kind != DataKind::kMixed) continue;  // leave a hole
    auto data = MakeData(k, len, rng());
    if (pwrite(fd, data.data(), len, static_cast<off_t>(off)) != static_cast<ssize_t>(len)) {
      throw std::runtime_error("pwrite " + path);
    }
  }
  close(fd);
}

std::vector<uint8_t> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void WriteWholeFile(const std::string& path, const std::vector<uint8_t>& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

}  // namespace zqcow::testing
