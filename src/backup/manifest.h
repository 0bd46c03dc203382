// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The manifest of a backup directory (zqcow-manifest.json) and the directory's naming
// scheme. The manifest is the one source of truth about which images are complete:
//   {"format": "zqcow-backup-manifest", "version": 1, "disk": "vm",
//    "images": [ {entry of BackupImage, see include/zqcow/backup.h}, ... ]}
// Images are listed in sequence order; each chain starts with a "full" image and every
// "inc" image's backing file is the image listed just before it, of the same chain.
// Replacing it is atomic: written to zqcow-manifest.json.tmp, synced, renamed over the old
// one, then the directory is synced.
// While a prune replaces an incremental image by a merged full (src/backup/prune.cc), the
// manifest also holds "pending_merge": {"file": ..., "file_size": ..., "content_digest":
// ...}: the file it names is either still the incremental the images list, or already the
// merged full of that size and digest (see docs/RELIABILITY.md); readers accept both.

#ifndef ZQCOW_BACKUP_MANIFEST_H_
#define ZQCOW_BACKUP_MANIFEST_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "zqcow/backup.h"
#include "zqcow/status.h"

namespace zqcow::backup {

inline constexpr const char* kLevelFull = "full";
inline constexpr const char* kLevelIncremental = "inc";
// Suffix of an image being written; it becomes the image's name once complete.
inline constexpr std::string_view kPartialSuffix = ".zqcow-backup-partial";
// Suffix of the merged full a prune writes, until it takes its image's name.
inline constexpr std::string_view kPrunePartialSuffix = ".zqcow-prune-partial";

// A prune in progress: image `file` (listed as an incremental) is being replaced by a
// self-contained full image of the same guest content at that point.
struct PendingMerge {
  std::string file;
  uint64_t file_size = 0;      // of the merged full
  std::string content_digest;  // of the merged full (its own clusters are all of them)
};

struct Manifest {
  std::string disk;  // prefix of the image names
  std::vector<BackupImage> images;
  std::optional<PendingMerge> pending_merge;
};

// `manifest` once its pending merge is done: the images of that chain before the merged
// one dropped, the merged one a full image (no backing file, the merged full's size and
// digest), no pending merge. Unchanged when there is none.
Manifest ApplyPendingMerge(Manifest manifest);
// The entry of the merged full that replaced `image` (same file, sequence and chain).
BackupImage MergedEntry(const BackupImage& image, const PendingMerge& merge);

std::string ManifestToText(const Manifest& manifest);
// `where` names the manifest in errors (kCorruption: not JSON, a field missing or of the
// wrong type, an unknown format or version).
Result<Manifest> ParseManifest(std::string_view text, const std::string& where);

std::string ManifestPath(const std::string& dir);
// kNotFound when the directory has no manifest.
Result<Manifest> ReadManifest(const std::string& dir);
// Atomically replaces the manifest (see above).
Status WriteManifest(const std::string& dir, const Manifest& manifest);

// One line per way the entries fail to form chains (see above); empty when they do.
std::vector<std::string> ChainProblems(const Manifest& manifest);

// "DISK-0001-inc.qcow2".
std::string ImageFileName(const std::string& disk, uint32_t sequence, std::string_view level);
// Whether `name` is an image name of `disk` (any sequence and level), or one with
// kPartialSuffix or kPrunePartialSuffix, then ".zqcow-partial", then ".info" after it: the
// files Backup and Prune (and the conversions they run) may create in a directory.
bool IsBackupFileName(const std::string& disk, std::string_view name);
// An image name prefix from a source name: the file's or NBD export's base name without
// its extension, characters other than [A-Za-z0-9._-] replaced by '_'; "disk" if empty.
std::string DiskNameFromSource(const std::string& source);
// Whether `name` is a usable disk name: [A-Za-z0-9._-]+, not "." or "..".
bool IsPlainName(std::string_view name);
// 16 random hex digits.
std::string NewChainId();

// fsync of a file or a directory (so a rename in it is durable).
Status SyncPath(const std::string& path);

}  // namespace zqcow::backup

#endif  // ZQCOW_BACKUP_MANIFEST_H_
