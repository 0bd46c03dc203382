// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// zqcow::Prune: keeps the newest N restore points of a backup directory. The order of the
// steps is what makes it crash safe (docs/RELIABILITY.md has the argument):
//   1. write the merged full of the oldest kept point under a temporary name, sync it;
//   2. record it in the manifest as a pending merge (atomic manifest replacement);
//   3. rename it over the kept incremental's file, sync the directory;
//   4. write the manifest without the dropped points, the merged image listed as full;
//   5. remove the dropped images' files.
// After each step the directory verifies and restores every point its manifest lists.

#include "backup/prune.h"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <set>
#include <utility>

#include "backup/backup_files.h"
#include "backup/manifest.h"
#include "zqcow/backup.h"
#include "zqcow/convert.h"
#include "zqcow/image.h"

namespace zqcow::backup {
namespace {

// Counts the prune's steps; SIGKILLs the process at the one kPruneCrashEnv names.
void CrashPoint() {
  static const long crash_at = [] {
    const char* value = std::getenv(kPruneCrashEnv);
    return value == nullptr ? 0L : std::strtol(value, nullptr, 10);
  }();
  static long reached = 0;
  if (crash_at > 0 && ++reached == crash_at) raise(SIGKILL);
}

void RemovePartial(const std::string& path) {
  (void)unlink(path.c_str());
  (void)DiscardPartialTarget(path);
}

// Step 1: converts the chain up to manifest.images[at] (an incremental) into a
// self-contained compressed image beside it, kPrunePartialSuffix after its name, checked
// and synced. Returns what the manifest records about it.
Result<PendingMerge> WriteMergedFull(const std::string& dir, const Manifest& manifest, size_t at,
                                     const PruneOptions& options) {
  const BackupImage& kept = manifest.images[at];
  size_t base = at;
  while (base > 0 && manifest.images[base].level != kLevelFull) --base;
  ZQ_ASSIGN_OR_RETURN(ImageInfo base_info, ReadImageInfo(dir + "/" + manifest.images[base].file));
  const std::string source = dir + "/" + kept.file;
  const std::string temp = source + std::string(kPrunePartialSuffix);
  RemovePartial(temp);
  ConvertOptions convert;
  convert.source_format = "qcow2";
  convert.compress = true;
  convert.compression = base_info.compression;
  convert.cluster_size = kept.cluster_size != 0 ? kept.cluster_size : base_info.cluster_size;
  convert.overwrite = true;  // only ever a leftover temporary file nobody lists
  convert.workers = options.workers;
  convert.cancel = options.cancel;
  Result<ConvertStats> stats = Convert(source, temp, convert);
  Result<digest::ContentDigest> content = stats.ok()
                                              ? CheckNewImage(temp, "", stats->content_digest)
                                              : Result<digest::ContentDigest>(stats.status());
  Status status = content.status();
  if (status.ok()) status = SyncPath(temp);
  Result<uint64_t> size = status.ok() ? FileSize(temp) : Result<uint64_t>(status);
  if (!size.ok()) {
    RemovePartial(temp);
    return size.status();
  }
  if (stats->virtual_size != kept.virtual_size) {
    RemovePartial(temp);
    return Status::Corruption(source + ": merged into " + std::to_string(stats->virtual_size) +
                              " bytes, the manifest says " + std::to_string(kept.virtual_size));
  }
  return PendingMerge{.file = kept.file, .file_size = *size, .content_digest = content->ToString()};
}

// Steps 2 and 3: the manifest records the pending merge, then the merged full takes the
// kept incremental's place. Returns the manifest as it now is.
Status ReplaceByMergedFull(const std::string& dir, Manifest& manifest, const PendingMerge& merge) {
  manifest.pending_merge = merge;
  ZQ_RETURN_IF_ERROR(WriteManifest(dir, manifest));
  CrashPoint();
  const std::string target = dir + "/" + merge.file;
  const std::string temp = target + std::string(kPrunePartialSuffix);
  if (rename(temp.c_str(), target.c_str()) != 0) {
    return Status::FromErrno(errno, target + ": rename of the merged full image");
  }
  ZQ_RETURN_IF_ERROR(SyncPath(dir));
  CrashPoint();
  return Status::OK();
}

}  // namespace

Status FinishInterruptedPrune(const std::string& dir, Manifest& manifest, bool dry_run,
                              std::vector<std::string>& notes) {
  if (!manifest.pending_merge) return Status::OK();
  const std::string path = dir + "/" + manifest.pending_merge->file;
  if (IsMergedFull(path, *manifest.pending_merge)) {
    notes.push_back(std::string(dry_run ? "would complete" : "completed") +
                    " an interrupted prune: " + path +
                    " is already its merged full image; the older images of its chain go");
    manifest = ApplyPendingMerge(std::move(manifest));
  } else {
    notes.push_back(std::string(dry_run ? "would undo" : "undid") +
                    " an interrupted prune that had not yet replaced " + path +
                    " by its merged full image");
    manifest.pending_merge.reset();
  }
  if (dry_run) return Status::OK();
  return WriteManifest(dir, manifest);
}

Result<PruneResult> PruneLocked(const std::string& dir, Manifest manifest,
                                const PruneOptions& options) {
  if (options.keep == 0) {
    return Status::InvalidArgument("--keep 0: a prune keeps at least one restore point");
  }
  PruneResult result;
  result.dry_run = options.dry_run;
  ZQ_RETURN_IF_ERROR(FinishInterruptedPrune(dir, manifest, options.dry_run, result.notes));
  if (std::vector<std::string> problems = ChainProblems(manifest); !problems.empty()) {
    return Status::Corruption(ManifestPath(dir) + ": " + problems.front());
  }
  if (options.dry_run) {
    ZQ_ASSIGN_OR_RETURN(std::vector<std::string> stale, UnlistedFiles(dir, manifest));
    for (const std::string& name : stale) {
      result.notes.push_back(dir + "/" + name + ": would be removed (not in the manifest)");
    }
  } else {
    ZQ_ASSIGN_OR_RETURN(std::vector<std::string> removed, RemoveStaleFiles(dir, manifest));
    result.notes.insert(result.notes.end(), removed.begin(), removed.end());
  }

  const size_t points = manifest.images.size();
  result.points_before = points;
  result.points_after = points;
  if (options.keep >= points) return result;  // nothing to prune
  const size_t first_kept = points - options.keep;
  const BackupImage& kept = manifest.images[first_kept];
  std::set<std::string> kept_chains;
  for (size_t i = first_kept; i < points; ++i) kept_chains.insert(manifest.images[i].chain_id);
  for (size_t i = 0; i < first_kept; ++i) {
    const BackupImage& image = manifest.images[i];
    result.removed.push_back(image.file);
    if (image.level == kLevelFull && kept_chains.count(image.chain_id) == 0) {
      result.dropped_chains.push_back(image.chain_id);
    }
    if (image.chain_id == kept.chain_id) result.merged_from.push_back(image.file);
  }
  if (kept.level == kLevelIncremental) {
    result.merged = kept.file;
    result.merged_from.push_back(kept.file);
  } else {
    result.merged_from.clear();
  }
  result.points_after = options.keep;
  if (options.dry_run) return result;

  Manifest pruned = manifest;
  pruned.images.erase(pruned.images.begin(),
                      pruned.images.begin() + static_cast<std::ptrdiff_t>(first_kept));
  if (!result.merged.empty()) {
    CrashPoint();
    ZQ_ASSIGN_OR_RETURN(PendingMerge merge, WriteMergedFull(dir, manifest, first_kept, options));
    CrashPoint();
    ZQ_RETURN_IF_ERROR(ReplaceByMergedFull(dir, manifest, merge));
    pruned.images.front() = MergedEntry(kept, merge);
  }
  // Step 4: from here on the dropped images are unlisted files.
  ZQ_RETURN_IF_ERROR(WriteManifest(dir, pruned));
  CrashPoint();
  // Step 5.
  for (const std::string& file : result.removed) {
    const std::string path = dir + "/" + file;
    if (unlink(path.c_str()) != 0 && errno != ENOENT) {
      return Status::FromErrno(errno, path + ": removing a pruned image");
    }
    CrashPoint();
  }
  ZQ_RETURN_IF_ERROR(SyncPath(dir));
  return result;
}

}  // namespace zqcow::backup

namespace zqcow {

Result<PruneResult> Prune(const std::string& dir, const PruneOptions& options) {
  if (options.keep == 0) {
    return Status::InvalidArgument("--keep 0: a prune keeps at least one restore point");
  }
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0) return Status::FromErrno(errno, dir);
  if (!S_ISDIR(st.st_mode)) return Status::InvalidArgument(dir + ": not a directory");
  backup::DirectoryLock lock;
  ZQ_RETURN_IF_ERROR(lock.Acquire(dir));
  ZQ_ASSIGN_OR_RETURN(backup::Manifest manifest, backup::ReadManifest(dir));
  return backup::PruneLocked(dir, std::move(manifest), options);
}

}  // namespace zqcow
