// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "backup/backup_files.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>
#include <set>

#include "backup/image_digest.h"
#include "zqcow/image.h"

namespace zqcow::backup {

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) close(fd_);
}

Status DirectoryLock::Acquire(const std::string& dir) {
  const std::string path = dir + "/" + kLockName;
  fd_ = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) return Status::FromErrno(errno, path);
  if (flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      return Status::AlreadyExists(dir +
                                   ": another zqcow backup is running on this directory "
                                   "(a zqcow backup or prune holds its lock)");
    }
    return Status::FromErrno(errno, path + ": flock");
  }
  return Status::OK();
}

Result<std::vector<std::string>> UnlistedFiles(const std::string& dir, const Manifest& manifest) {
  std::set<std::string> listed;
  for (const BackupImage& image : manifest.images) listed.insert(image.file);
  DIR* stream = opendir(dir.c_str());
  if (stream == nullptr) return Status::FromErrno(errno, dir);
  std::vector<std::string> unlisted;
  while (const dirent* entry = readdir(stream)) {
    const std::string name = entry->d_name;
    if (IsBackupFileName(manifest.disk, name) && listed.count(name) == 0) {
      unlisted.push_back(name);
    }
  }
  closedir(stream);
  std::sort(unlisted.begin(), unlisted.end());
  return unlisted;
}

Result<std::vector<std::string>> RemoveStaleFiles(const std::string& dir,
                                                  const Manifest& manifest) {
  ZQ_ASSIGN_OR_RETURN(std::vector<std::string> stale, UnlistedFiles(dir, manifest));
  std::vector<std::string> notes;
  for (const std::string& name : stale) {
    const std::string path = dir + "/" + name;
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, path + ": removing a stale file");
    }
    notes.push_back(path +
                    ": removed (not in the manifest: left by an earlier backup or prune that "
                    "did not complete)");
  }
  if (!stale.empty()) ZQ_RETURN_IF_ERROR(SyncPath(dir));
  return notes;
}

Result<uint64_t> FileSize(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return Status::FromErrno(errno, path);
  return static_cast<uint64_t>(st.st_size);
}

bool IsMergedFull(const std::string& path, const PendingMerge& merge) {
  Result<uint64_t> size = FileSize(path);
  if (!size.ok() || *size != merge.file_size) return false;
  Result<ImageInfo> info = ReadImageInfo(path);
  return info.ok() && info->backing_file.empty();
}

std::string UtcNow() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof(text), "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

namespace {

// The image written names `backing_file` ("" = none) as its backing file: a conversion
// that ignored it would pass a full image off as an overlay.
Status CheckBacking(const std::string& path, const std::string& backing_file) {
  ZQ_ASSIGN_OR_RETURN(ImageInfo info, ReadImageInfo(path));
  if (info.backing_file == backing_file) return Status::OK();
  if (info.backing_file.empty()) {
    return Status::Corruption(path + ": the conversion did not make it an overlay of " +
                              backing_file);
  }
  return Status::Corruption(path + ": names backing file '" + info.backing_file + "', not '" +
                            backing_file + "'");
}

}  // namespace

Result<digest::ContentDigest> CheckNewImage(const std::string& path,
                                            const std::string& backing_file,
                                            const std::string& written_digest) {
  ZQ_RETURN_IF_ERROR(CheckBacking(path, backing_file));
  ZQ_ASSIGN_OR_RETURN(CheckResult check, CheckImage(path));
  if (check.corruptions > 0 || check.incomplete) {
    return Status::Corruption(path + ": the new image fails its check" +
                              (check.messages.empty() ? "" : ": " + check.messages[0]));
  }
  ZQ_ASSIGN_OR_RETURN(digest::ContentDigest content, digest::ContentDigest::Parse(written_digest));
  ZQ_ASSIGN_OR_RETURN(digest::ContentDigest zeros,
                      DigestImageClusters(path, ClustersToHash::kZeroOnly));
  content.Merge(zeros);
  return content;
}

}  // namespace zqcow::backup
