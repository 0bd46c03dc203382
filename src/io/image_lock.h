// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// QEMU's image locks, so that zqcow and QEMU (qemu-img, qemu-io, qemu-nbd, a running VM)
// see each other. Each opener of an image takes open-file-description locks (F_OFD_SETLK:
// they belong to the open file, are released when it is closed, and conflict between two
// opens of the same file even inside one process) on single bytes:
//   byte 100 + i  held while the opener uses permission i,
//   byte 200 + i  held while the opener does not let others use permission i,
// permissions 0 consistent read, 1 write, 2 write unchanged, 3 resize, 4 change children.
// Every opener takes shared (read) locks only; a conflict is found by testing whether some
// other open holds a byte (F_OFD_GETLK with a write lock): using i while another does not
// share i, or not sharing i while another uses it.
//
// The permissions zqcow asks for are QEMU's for a qcow2 image (observed with qemu-io and
// qemu-img convert on QEMU 7.2; QEMU takes the same for a raw source of qemu-img convert):
//   kRead    uses consistent read; does not share write or resize (qemu-img convert's
//            source, qemu-img info/check/compare/map, qemu-io -r, backing files)
//   kWrite   uses consistent read, write and resize; does not share write or resize
//            (a qcow2 image open for writing: qemu-img convert's target, qemu-io, a VM)
//   kShared  uses consistent read, shares everything (-U / --force-share)
// So a reader and a writer exclude each other, two writers exclude each other, readers
// share, and a -U reader conflicts with nobody that QEMU would let it read beside.

#ifndef ZQCOW_IO_IMAGE_LOCK_H_
#define ZQCOW_IO_IMAGE_LOCK_H_

#include <cstdint>
#include <string>

#include "zqcow/status.h"

namespace zqcow::io {

enum class ImageLock : uint8_t {
  kAuto,  // io::FileOptions only: kWrite when opened writable, else kRead
  kRead,
  kWrite,
  kShared,
};

// Takes `mode`'s locks on `fd` (an open file of `path`) and checks that no other open of
// the file conflicts. The locks last as long as the open file description. On a conflict:
// an error in QEMU's words, e.g.
//   <path>: Failed to get shared "write" lock. Is another process using the image [<path>]?
// (kIOError, errno EAGAIN); the caller closes the file. A file system without OFD locks
// (EINVAL, EOPNOTSUPP, ENOLCK) is opened unlocked, as QEMU's locking=auto does.
// REQUIRES: mode != kAuto.
Status LockImage(int fd, const std::string& path, ImageLock mode);

// Whether an image zqcow is about to replace (convert --force) is held by another process
// in a way that forbids a writer, as LockImage(kWrite) would find, without taking any lock:
// OK when it is not, or when `path` does not exist or is not a regular file or block
// device (nothing to ask then); the conflict error of LockImage otherwise.
Status CheckNotInUse(const std::string& path);

}  // namespace zqcow::io

#endif  // ZQCOW_IO_IMAGE_LOCK_H_
