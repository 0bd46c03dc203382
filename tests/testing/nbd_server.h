// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// An NBD server for tests (qemu-nbd or nbdkit) listening on a unix socket in a test's
// temporary directory, stopped (SIGKILL, reaped) when the object goes away, whatever the
// test's outcome.

#ifndef ZQCOW_TESTS_TESTING_NBD_SERVER_H_
#define ZQCOW_TESTS_TESTING_NBD_SERVER_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

namespace zqcow::testing {

class NbdServer {
 public:
  // `qemu-nbd -k SOCKET -t ARGS...` (-t: keeps serving after a client leaves). E.g.
  // QemuNbd(dir, {"-f", "qcow2", "-r", "disk.qcow2"}). Returns null (after a gtest
  // failure naming the server's output) when it does not come up.
  static std::unique_ptr<NbdServer> QemuNbd(const std::string& dir,
                                            const std::vector<std::string>& args);
  // `nbdkit -f -U SOCKET ARGS...`, e.g. Nbdkit(dir, {"--filter=delay", "pattern",
  // "size=64M", "rdelay=1"}).
  static std::unique_ptr<NbdServer> Nbdkit(const std::string& dir,
                                           const std::vector<std::string>& args);
  ~NbdServer();
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  // nbd+unix:///EXPORT?socket=SOCKET
  std::string uri(const std::string& export_name = "") const;
  const std::string& socket() const { return socket_; }
  // What the server printed (stdout and stderr) so far.
  std::string log() const;
  // Kills the server at once (SIGKILL) and reaps it. Idempotent.
  void Kill();

 private:
  NbdServer(std::string socket, std::string log_path)
      : socket_(std::move(socket)), log_path_(std::move(log_path)) {}
  // Starts `argv`; waits until the socket accepts connections.
  static std::unique_ptr<NbdServer> Start(const std::string& dir, const std::string& name,
                                          std::vector<std::string> argv);

  std::string socket_;
  std::string log_path_;
  pid_t pid_ = -1;
};

}  // namespace zqcow::testing

#endif  // ZQCOW_TESTS_TESTING_NBD_SERVER_H_
