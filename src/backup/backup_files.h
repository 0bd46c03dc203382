// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// What `zqcow backup` and `zqcow prune` share about a backup directory: its lock, the
// removal of files an interrupted run left, and the checks an image they wrote must pass
// before the manifest may list it.

#ifndef ZQCOW_BACKUP_BACKUP_FILES_H_
#define ZQCOW_BACKUP_BACKUP_FILES_H_

#include <cstdint>
#include <string>
#include <vector>

#include "backup/manifest.h"
#include "digest/content_digest.h"
#include "zqcow/status.h"

namespace zqcow::backup {

// The lock file inside a backup directory.
inline constexpr const char* kLockName = ".zqcow-backup.lock";

// Holds an exclusive flock on DIR/.zqcow-backup.lock: one backup or prune per directory at
// a time. Released when destroyed (or when the process dies).
class DirectoryLock {
 public:
  DirectoryLock() = default;
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;
  ~DirectoryLock();
  // kAlreadyExists, naming `dir`, when another process holds it.
  Status Acquire(const std::string& dir);

 private:
  int fd_ = -1;
};

// Files named like `manifest.disk`'s images or their partial files that the manifest does
// not list: left by an interrupted backup or prune (IsBackupFileName says which names).
Result<std::vector<std::string>> UnlistedFiles(const std::string& dir, const Manifest& manifest);
// Removes them; returns a note per file removed.
Result<std::vector<std::string>> RemoveStaleFiles(const std::string& dir, const Manifest& manifest);

Result<uint64_t> FileSize(const std::string& path);

// Whether the image at `path` is already the merged full of `merge` (its size, and no
// backing file), not the incremental it replaces; false when it cannot be read.
bool IsMergedFull(const std::string& path, const PendingMerge& merge);
// Now, UTC, ISO 8601 (2026-12-02T03:04:05Z).
std::string UtcNow();

// Checks the image a conversion just wrote at `path` (it names `backing_file` as its
// backing file, "" = none; CheckImage finds it clean and complete) and returns the digest
// of its guest content: the clusters written with data, as hashed from what the conversion
// read (`written_digest`, ConvertStats::content_digest), plus its zero clusters, which hold
// no data to hash and are taken from the image's metadata.
Result<digest::ContentDigest> CheckNewImage(const std::string& path,
                                            const std::string& backing_file,
                                            const std::string& written_digest);

}  // namespace zqcow::backup

#endif  // ZQCOW_BACKUP_BACKUP_FILES_H_
