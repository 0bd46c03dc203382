// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "testing/backup_chain.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace zqcow::testing {

BackupChain::BackupChain(const std::string& root, uint64_t disk_size)
    : root_(root), disk_(root + "/vm.img"), dir_(root + "/backups") {
  WriteRawImage(disk_, disk_size, DataKind::kMixed, 23);
}

void BackupChain::GuestWrite(uint64_t offset, uint64_t length, int pattern) {
  CommandResult r =
      RunCommand("qemu-io -f raw -c 'write -P " + std::to_string(pattern) + " " +
                 std::to_string(offset) + " " + std::to_string(length) + "' " + ShellQuote(disk_));
  ASSERT_EQ(r.exit_code, 0) << r.output;
}

void BackupChain::ChangeDisk(int round) {
  constexpr uint64_t kMiB = 1 << 20;
  const uint64_t size = std::filesystem::file_size(disk_);
  GuestWrite((round * 3 * kMiB / 2) % (size - kMiB), 192 * 1024, 0x20 + round);
  GuestWrite((round * 5 * kMiB / 2 + 4096) % (size - kMiB), 8192, 0x60 + round);  // a part
  GuestWrite((round * kMiB) % (size - kMiB) + 256 * 1024, 128 * 1024, 0);         // data to zeros
}

CommandResult BackupChain::Zqcow(const std::string& args) {
  return RunCommand(ShellQuote(ZqcowBinary()) + " " + args);
}

CommandResult BackupChain::Backup(const std::string& options) {
  CommandResult r = Zqcow("backup " + options + " " + ShellQuote(disk_) + " " + ShellQuote(dir_));
  if (r.exit_code != 0) return r;
  std::vector<nlohmann::json> images = ListedImages();
  uint64_t newest = 0;
  for (const nlohmann::json& image : images) {
    newest = std::max<uint64_t>(newest, image["sequence"].get<uint64_t>());
  }
  const std::string copy = root_ + "/snapshot-" + std::to_string(newest);
  std::filesystem::copy_file(disk_, copy, std::filesystem::copy_options::overwrite_existing);
  snapshots_[newest] = copy;
  return r;
}

nlohmann::json BackupChain::Manifest() const {
  std::ifstream in(dir_ + "/zqcow-manifest.json");
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  return j.is_object() ? j : nlohmann::json::object();
}

std::vector<nlohmann::json> BackupChain::ListedImages() const {
  nlohmann::json j = Manifest();
  std::vector<nlohmann::json> images;
  if (j.contains("images")) {
    for (const nlohmann::json& image : j["images"]) images.push_back(image);
  }
  return images;
}

std::vector<std::string> BackupChain::Files() const {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(dir_)) {
    names.push_back(entry.path().filename());
  }
  std::sort(names.begin(), names.end());
  return names;
}

void BackupChain::ExpectSoundAndRestorable(const std::string& where) const {
  SCOPED_TRACE(where);
  CommandResult verify = Zqcow("verify " + ShellQuote(dir_));
  EXPECT_EQ(verify.exit_code, 0) << verify.output;
  std::vector<nlohmann::json> images = ListedImages();
  EXPECT_FALSE(images.empty());
  for (const nlohmann::json& image : images) {
    const std::string file = image["file"];
    auto snapshot = snapshots_.find(image["sequence"].get<uint64_t>());
    ASSERT_NE(snapshot, snapshots_.end()) << file << ": no snapshot of its point";
    CommandResult same = QemuImgCompare(snapshot->second, "raw", Image(file), "qcow2");
    EXPECT_EQ(same.exit_code, 0) << file << " does not restore its point: " << same.output;
    CommandResult check = QemuImgCheck(Image(file));
    EXPECT_EQ(check.exit_code, 0) << file << ": " << check.output;
  }
}

void BackupChain::UseCopy(const std::string& from, const std::string& to) {
  std::filesystem::remove_all(to);
  std::filesystem::create_directory(to);
  for (const auto& entry : std::filesystem::directory_iterator(from)) {
    std::filesystem::copy_file(entry.path(), to + "/" + entry.path().filename().string());
  }
  dir_ = to;
}

}  // namespace zqcow::testing
