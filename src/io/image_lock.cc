// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// QEMU's image locks (see image_lock.h): which bytes each mode holds, taking them, and
// testing for the other side's.

#include "io/image_lock.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>

namespace zqcow::io {

namespace {

// Byte 100 + i: permission i in use; byte 200 + i: permission i not shared.
constexpr off_t kUsedBase = 100;
constexpr off_t kUnsharedBase = 200;

// QEMU's permission bits, in its order, with the names its messages use.
constexpr uint32_t kConsistentRead = 1u << 0;
constexpr uint32_t kWrite = 1u << 1;
constexpr uint32_t kResize = 1u << 3;
constexpr std::array<const char*, 5> kPermissionNames = {
    "consistent read", "write", "write unchanged", "resize", "change children"};
constexpr uint32_t kAllPermissions = (1u << kPermissionNames.size()) - 1;

struct Permissions {
  uint32_t used = 0;
  uint32_t shared = kAllPermissions;
};

Permissions PermissionsOf(ImageLock mode) {
  switch (mode) {
    case ImageLock::kWrite:
      return {kConsistentRead | kWrite | kResize, kAllPermissions & ~(kWrite | kResize)};
    case ImageLock::kShared:
      return {kConsistentRead, kAllPermissions};
    case ImageLock::kRead:
    case ImageLock::kAuto:
      break;
  }
  return {kConsistentRead, kAllPermissions & ~(kWrite | kResize)};
}

// Errors that mean the file system has no OFD locks (then the image is used unlocked).
bool LockingUnsupported(int err) { return err == EINVAL || err == EOPNOTSUPP || err == ENOLCK; }

struct flock OneByte(short type, off_t byte) {
  struct flock lock {};
  lock.l_type = type;
  lock.l_whence = SEEK_SET;
  lock.l_start = byte;
  lock.l_len = 1;
  return lock;
}

Status InUse(const std::string& path, const std::string& what) {
  return Status::IOError(path + ": Failed to get " + what +
                             " lock. Is another process using the image [" + path + "]?",
                         EAGAIN);
}

// Whether another open file description holds a lock on `byte` (ours never conflict).
// Sets *unsupported when the file system cannot tell.
Result<bool> HeldByOther(int fd, const std::string& path, off_t byte, bool* unsupported) {
  struct flock lock = OneByte(F_WRLCK, byte);
  if (::fcntl(fd, F_OFD_GETLK, &lock) != 0) {
    if (LockingUnsupported(errno)) {
      *unsupported = true;
      return false;
    }
    return Status::FromErrno(errno,
                             path + ": testing lock byte " + std::to_string(byte) + " failed");
  }
  return lock.l_type != F_UNLCK;
}

// The conflict QEMU would report for an opener with `perms`, in QEMU's order (permission by
// permission: first "cannot use it", then "cannot keep others from it").
Status CheckConflicts(int fd, const std::string& path, const Permissions& perms) {
  bool unsupported = false;
  for (size_t i = 0; i < kPermissionNames.size() && !unsupported; ++i) {
    const uint32_t bit = 1u << i;
    const std::string name = std::string("\"") + kPermissionNames[i] + "\"";
    if (perms.used & bit) {
      ZQ_ASSIGN_OR_RETURN(bool held, HeldByOther(fd, path, kUnsharedBase + off_t(i), &unsupported));
      if (held) return InUse(path, name);
    }
    if (!(perms.shared & bit)) {
      ZQ_ASSIGN_OR_RETURN(bool held, HeldByOther(fd, path, kUsedBase + off_t(i), &unsupported));
      if (held) return InUse(path, "shared " + name);
    }
  }
  return Status::OK();
}

}  // namespace

Status LockImage(int fd, const std::string& path, ImageLock mode) {
  const Permissions perms = PermissionsOf(mode);
  // Take ours first, then look for the other side's: of two openers racing, at least one
  // sees the other.
  for (size_t i = 0; i < kPermissionNames.size(); ++i) {
    const uint32_t bit = 1u << i;
    for (off_t byte : {(perms.used & bit) ? kUsedBase + off_t(i) : off_t(-1),
                       (perms.shared & bit) ? off_t(-1) : kUnsharedBase + off_t(i)}) {
      if (byte < 0) continue;
      struct flock lock = OneByte(F_RDLCK, byte);
      if (::fcntl(fd, F_OFD_SETLK, &lock) == 0) continue;
      const int err = errno;
      if (LockingUnsupported(err)) return Status::OK();
      if (err == EAGAIN || err == EACCES) {
        // Only a write lock conflicts with a read lock: not QEMU's (it takes read locks
        // only), but some other tool's.
        return Status::IOError(path + ": Failed to lock byte " + std::to_string(byte) +
                                   ". Is another process using the image [" + path + "]?",
                               err);
      }
      return Status::FromErrno(err, path + ": locking byte " + std::to_string(byte) + " failed");
    }
  }
  return CheckConflicts(fd, path, perms);
}

Status CheckNotInUse(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !(S_ISREG(st.st_mode) || S_ISBLK(st.st_mode))) {
    return Status::OK();
  }
  int fd = -1;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    if (errno == ENOENT) return Status::OK();  // gone meanwhile
    return Status::FromErrno(errno, path + ": open failed");
  }
  Status status = CheckConflicts(fd, path, PermissionsOf(ImageLock::kWrite));
  ::close(fd);
  return status;
}

}  // namespace zqcow::io
