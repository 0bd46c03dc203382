// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "testing/qemu_vm.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "testing/test_util.h"

namespace zqcow::testing {

namespace {

constexpr const char* kQemuSystem = "qemu-system-x86_64";
constexpr double kStartSeconds = 20;

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

bool WriteAll(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

bool HaveQemuSystem() {
  return RunCommand(std::string("command -v ") + kQemuSystem + " >/dev/null").exit_code == 0;
}

std::unique_ptr<QemuVm> QemuVm::Start(const std::string& dir) {
  const std::string qmp_socket = dir + "/qmp.sock";
  const std::string log_path = dir + "/qemu.log";
  const std::string qmp_arg = "unix:" + qmp_socket + ",server=on,wait=off";
  std::vector<std::string> args = {kQemuSystem, "-machine", "none", "-nodefaults",
                                   "-display",  "none",     "-qmp", qmp_arg};
  pid_t pid = fork();
  if (pid < 0) {
    ADD_FAILURE() << "fork: " << std::strerror(errno);
    return nullptr;
  }
  if (pid == 0) {
    int log = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int null_in = open("/dev/null", O_RDONLY);
    if (log >= 0) {
      dup2(log, STDOUT_FILENO);
      dup2(log, STDERR_FILENO);
    }
    if (null_in >= 0) dup2(null_in, STDIN_FILENO);
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    execvp(argv[0], argv.data());
    _exit(127);
  }
  std::unique_ptr<QemuVm> vm(new QemuVm(dir, pid));
  if (!vm->Connect()) {
    ADD_FAILURE() << "cannot connect to QEMU's QMP socket " << qmp_socket << ": " << vm->Log();
    return nullptr;
  }
  return vm;
}

QemuVm::~QemuVm() {
  if (fd_ >= 0 && pid_ > 0) {
    // A polite quit first, so persistent bitmaps reach the disk images.
    WriteAll(fd_, R"({"execute":"quit"})"
                  "\n");
  }
  if (fd_ >= 0) close(fd_);
  if (pid_ > 0) {
    const auto start = std::chrono::steady_clock::now();
    while (waitpid(pid_, nullptr, WNOHANG) == 0) {
      if (SecondsSince(start) > 10) {
        kill(pid_, SIGKILL);
        waitpid(pid_, nullptr, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
}

void QemuVm::Kill() {
  if (pid_ <= 0) return;
  kill(pid_, SIGKILL);
  waitpid(pid_, nullptr, 0);
  pid_ = -1;
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

std::string QemuVm::Log() const {
  std::ifstream in(dir_ + "/qemu.log");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

bool QemuVm::Connect() {
  const std::string path = dir_ + "/qmp.sock";
  const auto start = std::chrono::steady_clock::now();
  while (SecondsSince(start) < kStartSeconds) {
    if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      fd_ = fd;
      nlohmann::json greeting;
      if (!ReadMessage(&greeting) || !greeting.contains("QMP")) return false;
      return !Call("qmp_capabilities", nlohmann::json::object()).contains("error");
    }
    close(fd);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

bool QemuVm::ReadMessage(nlohmann::json* message, double timeout_seconds) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    size_t newline = buffer_.find('\n');
    if (newline != std::string::npos) {
      std::string line = buffer_.substr(0, newline);
      buffer_.erase(0, newline + 1);
      if (line.find_first_not_of(" \r\t") == std::string::npos) continue;
      *message = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      return !message->is_discarded();
    }
    const double left = timeout_seconds - SecondsSince(start);
    if (fd_ < 0 || left <= 0) return false;
    pollfd p{fd_, POLLIN, 0};
    int ready = poll(&p, 1, static_cast<int>(left * 1000) + 1);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) return false;
    char chunk[4096];
    ssize_t n = read(fd_, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    buffer_.append(chunk, static_cast<size_t>(n));
  }
}

nlohmann::json QemuVm::Call(const std::string& command, const nlohmann::json& arguments) {
  nlohmann::json request = {{"execute", command}};
  if (!arguments.empty()) request["arguments"] = arguments;
  if (fd_ < 0 || !WriteAll(fd_, request.dump() + "\n")) {
    return {{"error", {{"desc", "QMP socket closed"}}}};
  }
  nlohmann::json reply;
  while (ReadMessage(&reply)) {
    if (reply.contains("return") || reply.contains("error")) return reply;
    if (reply.contains("event")) events_.push_back(reply);
  }
  return {{"error", {{"desc", "no reply from QEMU"}}}};
}

nlohmann::json QemuVm::Execute(const std::string& command, const nlohmann::json& arguments) {
  nlohmann::json reply = Call(command, arguments);
  if (reply.contains("error")) {
    ADD_FAILURE() << "QMP " << command << " " << arguments.dump()
                  << " failed: " << reply["error"].value("desc", reply.dump());
    return nullptr;
  }
  return reply["return"];
}

std::string QemuVm::ExecuteExpectingError(const std::string& command,
                                          const nlohmann::json& arguments) {
  nlohmann::json reply = Call(command, arguments);
  if (!reply.contains("error")) return "";
  return reply["error"].value("desc", std::string("error without a description"));
}

bool QemuVm::WaitEvent(const std::string& name, double timeout_seconds) {
  for (auto it = events_.begin(); it != events_.end(); ++it) {
    if (it->value("event", "") == name) {
      events_.erase(it);
      return true;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  nlohmann::json message;
  while (SecondsSince(start) < timeout_seconds) {
    if (!ReadMessage(&message, timeout_seconds - SecondsSince(start))) return false;
    if (message.value("event", "") == name) return true;
  }
  return false;
}

PullModeBackup::PullModeBackup(QemuVm& vm, std::string disk_path, std::string scratch_dir)
    : vm_(vm),
      disk_path_(std::move(disk_path)),
      scratch_dir_(std::move(scratch_dir)),
      socket_(vm.SocketPath("nbd.sock")) {
  vm_.Execute("blockdev-add", {{"driver", "qcow2"},
                               {"node-name", "disk"},
                               {"file", {{"driver", "file"}, {"filename", disk_path_}}}});
  vm_.Execute("nbd-server-start", {{"addr", {{"type", "unix"}, {"data", {{"path", socket_}}}}}});
  vm_.Execute("block-export-add", {{"type", "nbd"},
                                   {"id", "guest-export"},
                                   {"node-name", "disk"},
                                   {"name", "guest"},
                                   {"writable", true}});
}

std::string PullModeBackup::GuestUri() const { return "nbd+unix:///guest?socket=" + socket_; }
std::string PullModeBackup::BackupUri() const { return "nbd+unix:///backup?socket=" + socket_; }

void PullModeBackup::AddCheckpoint(const std::string& bitmap) {
  vm_.Execute("block-dirty-bitmap-add", {{"node", "disk"}, {"name", bitmap}, {"persistent", true}});
}

void PullModeBackup::Begin(const std::string& previous_bitmap, const std::string& next_bitmap) {
  ++round_;
  // The fleecing overlay: an empty qcow2 of the disk's size whose backing node is the disk.
  nlohmann::json nodes = vm_.Execute("query-named-block-nodes", {{"flat", true}});
  uint64_t virtual_size = 0;
  for (const auto& node : nodes) {
    if (node.value("node-name", "") == "disk") {
      virtual_size = node["image"].value("virtual-size", uint64_t{0});
    }
  }
  ASSERT_GT(virtual_size, 0u) << "QEMU does not report the disk node's size";
  const std::string fleece = scratch_dir_ + "/fleece-" + std::to_string(round_) + ".qcow2";
  CommandResult created = RunCommand("qemu-img create -q -f qcow2 " + ShellQuote(fleece) + " " +
                                     std::to_string(virtual_size));
  ASSERT_EQ(created.exit_code, 0) << created.output;
  vm_.Execute("blockdev-add", {{"driver", "qcow2"},
                               {"node-name", "fleece"},
                               {"file", {{"driver", "file"}, {"filename", fleece}}},
                               {"backing", "disk"}});
  nlohmann::json actions = nlohmann::json::array();
  actions.push_back({{"type", "block-dirty-bitmap-add"},
                     {"data", {{"node", "disk"}, {"name", next_bitmap}, {"persistent", true}}}});
  if (!previous_bitmap.empty()) {
    actions.push_back({{"type", "block-dirty-bitmap-disable"},
                       {"data", {{"node", "disk"}, {"name", previous_bitmap}}}});
  }
  actions.push_back(
      {{"type", "blockdev-backup"},
       {"data",
        {{"device", "disk"}, {"target", "fleece"}, {"sync", "none"}, {"job-id", "fleece-job"}}}});
  vm_.Execute("transaction", {{"actions", actions}});
  nlohmann::json export_args = {
      {"type", "nbd"}, {"id", "backup-export"}, {"node-name", "fleece"}, {"name", "backup"}};
  if (!previous_bitmap.empty()) {
    export_args["bitmaps"] = nlohmann::json::array({previous_bitmap});
  }
  vm_.Execute("block-export-add", export_args);
}

void PullModeBackup::Resize(uint64_t size) {
  vm_.Execute("block-export-del", {{"id", "guest-export"}});
  EXPECT_TRUE(vm_.WaitEvent("BLOCK_EXPORT_DELETED")) << vm_.Log();
  vm_.Execute("block_resize", {{"node-name", "disk"}, {"size", size}});
  vm_.Execute("block-export-add", {{"type", "nbd"},
                                   {"id", "guest-export"},
                                   {"node-name", "disk"},
                                   {"name", "guest"},
                                   {"writable", true}});
}

void PullModeBackup::End(const std::string& previous_bitmap) {
  vm_.Execute("block-export-del", {{"id", "backup-export"}});
  EXPECT_TRUE(vm_.WaitEvent("BLOCK_EXPORT_DELETED")) << vm_.Log();
  vm_.Execute("block-job-cancel", {{"device", "fleece-job"}});
  EXPECT_TRUE(vm_.WaitEvent("BLOCK_JOB_CANCELLED")) << vm_.Log();
  vm_.Execute("blockdev-del", {{"node-name", "fleece"}});
  if (!previous_bitmap.empty()) {
    vm_.Execute("block-dirty-bitmap-remove", {{"node", "disk"}, {"name", previous_bitmap}});
  }
}

}  // namespace zqcow::testing
