// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "testing/nbd_server.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "testing/test_util.h"

namespace zqcow::testing {

namespace {

// How long a server may take to listen (qemu-nbd opens the image first).
constexpr auto kStartTimeout = std::chrono::seconds(20);
constexpr auto kStartPoll = std::chrono::milliseconds(20);

bool Accepts(const std::string& socket_path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, socket_path.c_str(), sizeof(address.sun_path) - 1);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
  close(fd);
  return ok;
}

}  // namespace

std::unique_ptr<NbdServer> NbdServer::QemuNbd(const std::string& dir,
                                              const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"qemu-nbd", "-t", "-k", dir + "/qemu-nbd.sock"};
  argv.insert(argv.end(), args.begin(), args.end());
  return Start(dir, "qemu-nbd", std::move(argv));
}

std::unique_ptr<NbdServer> NbdServer::Nbdkit(const std::string& dir,
                                             const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"nbdkit", "-f", "-U", dir + "/nbdkit.sock"};
  argv.insert(argv.end(), args.begin(), args.end());
  return Start(dir, "nbdkit", std::move(argv));
}

std::unique_ptr<NbdServer> NbdServer::Start(const std::string& dir, const std::string& name,
                                            std::vector<std::string> argv) {
  std::unique_ptr<NbdServer> server(
      new NbdServer(dir + "/" + name + ".sock", dir + "/" + name + ".log"));
  unlink(server->socket_.c_str());
  std::vector<char*> c_argv;
  for (std::string& arg : argv) c_argv.push_back(arg.data());
  c_argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid < 0) {
    ADD_FAILURE() << "fork: " << std::strerror(errno);
    return nullptr;
  }
  if (pid == 0) {
    const int log = open(server->log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (log >= 0) {
      dup2(log, STDOUT_FILENO);
      dup2(log, STDERR_FILENO);
    }
    execvp(c_argv[0], c_argv.data());
    _exit(127);
  }
  server->pid_ = pid;
  const auto deadline = std::chrono::steady_clock::now() + kStartTimeout;
  while (!Accepts(server->socket_)) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      server->pid_ = -1;
      ADD_FAILURE() << argv[0] << " exited before listening: " << server->log();
      return nullptr;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ADD_FAILURE() << argv[0] << " did not listen on " << server->socket_ << ": " << server->log();
      return nullptr;  // the destructor kills it
    }
    std::this_thread::sleep_for(kStartPoll);
  }
  return server;
}

NbdServer::~NbdServer() { Kill(); }

std::string NbdServer::uri(const std::string& export_name) const {
  return "nbd+unix:///" + export_name + "?socket=" + socket_;
}

std::string NbdServer::log() const {
  std::vector<uint8_t> bytes = ReadWholeFile(log_path_);
  return std::string(bytes.begin(), bytes.end());
}

void NbdServer::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  int status = 0;
  while (waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

}  // namespace zqcow::testing
