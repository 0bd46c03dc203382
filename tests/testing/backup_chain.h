// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A backup directory made by the zqcow CLI from a small raw disk, with the disk's content
// at every backup kept aside, for tests of what happens to the chain afterwards (prune,
// crashes): each image the manifest lists must still read as the disk did then.

#ifndef ZQCOW_TESTS_TESTING_BACKUP_CHAIN_H_
#define ZQCOW_TESTS_TESTING_BACKUP_CHAIN_H_

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "testing/test_util.h"

namespace zqcow::testing {

class BackupChain {
 public:
  // A raw disk of `disk_size` bytes (mixed data) at ROOT/vm.img, backups in ROOT/backups.
  BackupChain(const std::string& root, uint64_t disk_size);

  const std::string& disk() const { return disk_; }
  const std::string& dir() const { return dir_; }
  std::string Image(const std::string& file) const { return dir_ + "/" + file; }

  // Writes `pattern` over [offset, +length) of the disk, as a guest would between backups.
  void GuestWrite(uint64_t offset, uint64_t length, int pattern);
  // Changes some of the disk, differently for each `round`.
  void ChangeDisk(int round);
  // `zqcow backup OPTIONS DISK DIR`; on success the disk's content is kept as the
  // snapshot of the image it added (by sequence number).
  CommandResult Backup(const std::string& options = "");
  // `zqcow ARGS` (e.g. "prune --keep 2 DIR").
  static CommandResult Zqcow(const std::string& args);

  // The manifest as JSON (an empty object when unreadable), and its images.
  nlohmann::json Manifest() const;
  std::vector<nlohmann::json> ListedImages() const;
  // Names in DIR, sorted.
  std::vector<std::string> Files() const;
  // Every listed image reads exactly as the disk did when it was taken (qemu-img compare)
  // and qemu-img check finds it clean; `zqcow verify DIR` exits 0. Adds gtest failures.
  void ExpectSoundAndRestorable(const std::string& where) const;
  // Copies the files of directory `from` (e.g. an earlier dir()) into `to` (created) and
  // makes `to` this chain's directory.
  void UseCopy(const std::string& from, const std::string& to);

 private:
  std::string root_;
  std::string disk_;
  std::string dir_;
  std::map<uint64_t, std::string> snapshots_;  // sequence -> raw copy of the disk
};

}  // namespace zqcow::testing

#endif  // ZQCOW_TESTS_TESTING_BACKUP_CHAIN_H_
