// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A File wrapper that injects faults, for tests: fail the Nth read, write or sync with a
// chosen errno, and simulate a power failure that loses every write not followed by a
// successful Sync(). No special build is needed; tests wrap the real file.
//
// The FaultController is shared between the test and the wrapper (which the image owns),
// so the test can still drive it after the image was destroyed.

#ifndef ZQCOW_IO_FAULT_FILE_H_
#define ZQCOW_IO_FAULT_FILE_H_

#include <cstdint>
#include <memory>
#include <mutex>

#include "io/file.h"

namespace zqcow::io {

class FaultController {
 public:
  enum class Op : uint8_t { kRead = 0, kWrite = 1, kSync = 2 };

  FaultController();

  // The nth (1-based) operation of kind `op` from now on counted, and every later one of
  // that kind, fail with `err` (EIO, ENOSPC, ...). n = 0 disarms.
  void FailNth(Op op, uint64_t n, int err);
  // Operations of that kind seen so far (batched requests count one each; requests of a
  // batch after the one that failed are not attempted and not counted).
  uint64_t count(Op op) const;
  // Whether any fault injected by FailNth fired (failures after Crash() do not count).
  bool fired() const;

  // Remember the previous content of every write until the next successful Sync(), so that
  // Crash() can undo them. Must be enabled before the writes it should cover.
  void TrackUnsynced(bool enable);
  // Power failure: every write not followed by a successful Sync() is undone (contents and
  // file size restored, newest first), and every later operation through any wrapper of
  // this controller fails with EIO. Returns an error only if undoing failed.
  Status Crash();

 private:
  friend class FaultInjectingFile;
  struct Impl;
  std::shared_ptr<Impl> impl_;  // never null; defined in fault_file.cc
};

// Wraps `base`; the wrapper forwards everything, consulting `controller` first. Truncate
// counts as no operation kind but is undone by Crash() like a write; after Crash() every
// method that touches the file fails with EIO.
// Threading: the wrapper and the controller may be used from several threads at once; while
// TrackUnsynced is on, writes, truncates and syncs through the wrappers are serialized.
std::unique_ptr<File> MakeFaultInjectingFile(std::unique_ptr<File> base,
                                             std::shared_ptr<FaultController> controller);

}  // namespace zqcow::io

#endif  // ZQCOW_IO_FAULT_FILE_H_
