// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A QEMU process for live-backup tests: `qemu-system-x86_64 -machine none` (a block layer,
// QMP and an NBD server; no guest, no accelerator) driven over QMP on a unix socket in a
// test's temporary directory. The process is always stopped when the object goes away.

#ifndef ZQCOW_TESTS_TESTING_QEMU_VM_H_
#define ZQCOW_TESTS_TESTING_QEMU_VM_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace zqcow::testing {

// Whether qemu-system-x86_64 is on PATH (scripts/setup installs it).
bool HaveQemuSystem();

class QemuVm {
 public:
  // Starts QEMU with its QMP socket and log in `dir`, connects and leaves capabilities
  // negotiation done. Returns null (with a gtest failure added) when it cannot start.
  static std::unique_ptr<QemuVm> Start(const std::string& dir);
  ~QemuVm();
  QemuVm(const QemuVm&) = delete;
  QemuVm& operator=(const QemuVm&) = delete;

  // Runs a QMP command and returns its "return" value. A QMP error adds a gtest failure
  // naming the command and QEMU's description, and returns null.
  nlohmann::json Execute(const std::string& command,
                         const nlohmann::json& arguments = nlohmann::json::object());
  // Runs a QMP command that is expected to fail; returns QEMU's error description ("" when
  // it succeeded).
  std::string ExecuteExpectingError(const std::string& command,
                                    const nlohmann::json& arguments = nlohmann::json::object());

  // Reads messages until the event `name` arrives (true) or `timeout_seconds` pass (false).
  bool WaitEvent(const std::string& name, double timeout_seconds = 30);

  // A unix socket path in the VM's directory for an NBD server.
  std::string SocketPath(const std::string& name) const { return dir_ + "/" + name; }
  // Kills the process at once (SIGKILL), as a crash would.
  void Kill();
  // The process's stderr/stdout so far (for failure messages).
  std::string Log() const;

 private:
  QemuVm(std::string dir, pid_t pid) : dir_(std::move(dir)), pid_(pid) {}
  bool Connect();
  // Sends one command and reads messages until its reply (events are skipped).
  nlohmann::json Call(const std::string& command, const nlohmann::json& arguments);
  // Reads one message; false on EOF, error or when `timeout_seconds` pass first.
  bool ReadMessage(nlohmann::json* message, double timeout_seconds = 60);

  std::string dir_;
  pid_t pid_ = -1;
  int fd_ = -1;
  std::string buffer_;
  std::vector<nlohmann::json> events_;  // events read while waiting for a reply
};

// The pull-mode backup sequence libvirt runs (../shared/LIVE-BACKUP-NOTES.md), on a QEMU
// started by QemuVm: the disk image `disk_path` (qcow2) as node "disk", a writable NBD
// export "guest" of it standing in for the guest, and backups exported read-only as
// "backup" from a fleecing overlay, with the dirty bitmap of the previous checkpoint.
class PullModeBackup {
 public:
  PullModeBackup(QemuVm& vm, std::string disk_path, std::string scratch_dir);

  // URI of the guest stand-in export (writes go through the backup's copy-before-write).
  std::string GuestUri() const;
  // URI of the point-in-time export while a backup runs.
  std::string BackupUri() const;

  // Adds a persistent, enabled dirty bitmap: the first checkpoint.
  void AddCheckpoint(const std::string& bitmap);
  // Starts a backup: atomically adds the next checkpoint `next_bitmap`, disables
  // `previous_bitmap` (when not empty) and starts blockdev-backup sync=none into a fleecing
  // overlay; then exports it as "backup" with `previous_bitmap` (when not empty).
  void Begin(const std::string& previous_bitmap, const std::string& next_bitmap);
  // Grows (or shrinks) the disk while QEMU holds it, and exports the guest again so the
  // stand-in sees the new size (an NBD export's size is fixed when a client connects).
  void Resize(uint64_t size);
  // Ends the running backup: removes the export, cancels the job, deletes the fleecing node
  // and removes `previous_bitmap` (when not empty).
  void End(const std::string& previous_bitmap);

 private:
  QemuVm& vm_;
  std::string disk_path_;
  std::string scratch_dir_;
  std::string socket_;
  int round_ = 0;
};

}  // namespace zqcow::testing

#endif  // ZQCOW_TESTS_TESTING_QEMU_VM_H_
