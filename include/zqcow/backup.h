// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Backup chains: what `zqcow backup` and `zqcow verify` run.
//
// A backup directory holds the images of one disk and a manifest, zqcow-manifest.json:
//   DISK-0000-full.qcow2   a full image (a chain starts here)
//   DISK-0001-inc.qcow2    an overlay of DISK-0000-full.qcow2 with what changed since
//   DISK-0002-inc.qcow2    an overlay of DISK-0001-inc.qcow2 ...
//   DISK-0003-full.qcow2   a new chain (e.g. the disk changed size); older chains stay
// Sequence numbers grow over the directory's whole history, so names sort by age. The
// manifest lists every image that is complete, in order, with its chain id; an image
// joins it only after it was written under a temporary name, synced and renamed, and the
// manifest itself is replaced atomically (written aside, synced, renamed, directory
// synced). A failed or interrupted backup therefore never appears in it, and the next run
// starts from the last image it lists.

#ifndef ZQCOW_BACKUP_H_
#define ZQCOW_BACKUP_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "zqcow/convert.h"
#include "zqcow/export.h"
#include "zqcow/status.h"

namespace zqcow {

// The manifest's name inside a backup directory.
inline constexpr const char* kBackupManifestName = "zqcow-manifest.json";

enum class BackupLevel : uint8_t {
  kAuto,         // full when there is no usable chain, else incremental
  kFull,         // always a new chain
  kIncremental,  // an overlay of the last image; an error when there is no usable chain
};

struct BackupOptions {
  BackupLevel level = BackupLevel::kAuto;
  // Dirty bitmap of the source marking what changed since the last backup (an NBD export's
  // qemu:dirty-bitmap:NAME). Incrementals then read only those clusters; without one they
  // compare the source with the chain. Recorded in the manifest either way.
  std::string bitmap;
  // Prefix of the image names; "" = the manifest's, else derived from the source's name.
  std::string disk_name;
  // An incremental chain longer than this starts over with a full image (every image of a
  // chain is a backing file of the next; readers refuse very deep chains).
  unsigned max_incrementals = 30;
  // Retention: after the image was added, Prune(dir, {.keep = keep}) (0 = no prune). A
  // failed prune leaves the backup in place and is reported in BackupResult::prune_status.
  unsigned keep = 0;
  // How to read the source and write the image. Backup sets compress, overwrite,
  // backing_file, backing_format and bitmap itself.
  ConvertOptions convert;
};

// One image of a backup directory: its manifest entry.
struct BackupImage {
  std::string file;          // name inside the directory
  uint32_t sequence = 0;     // 0, 1, 2, ... over the directory's history
  std::string level;         // "full" or "inc"
  std::string chain_id;      // the same for a full image and the incrementals on top of it
  std::string backing_file;  // "" for a full image; else the previous image's `file`
  std::string bitmap;        // the dirty bitmap used, "" when none
  std::string source;        // what was backed up (as given)
  uint64_t source_size = 0;  // its size in bytes
  std::string start_time;    // UTC, ISO 8601 (2026-12-02T03:04:05Z)
  std::string end_time;
  uint64_t virtual_size = 0;
  uint32_t cluster_size = 0;
  uint64_t file_size = 0;      // the image file's size once complete
  uint64_t bytes_read = 0;     // from the source
  uint64_t bytes_written = 0;  // compressed and stored cluster bytes written
  std::string content_digest;  // ConvertStats::content_digest, from the data read
  std::string zqcow_version;
};

struct BackupResult {
  BackupImage image;               // the image added (now the manifest's last)
  ConvertStats stats;              // of its conversion
  std::vector<std::string> notes;  // one line each: why a full was taken, files cleaned up
  // With BackupOptions::keep: the files the prune removed (its notes are in `notes`), and
  // how it ended (the backup itself succeeded either way).
  std::vector<std::string> pruned;
  Status prune_status;
};

// Backs `source` up into directory `dir` (created if missing, its parent must exist).
// Runs exclusively: a second Backup on the same directory fails at once.
// Errors (one line naming the file and the cause): kInvalidArgument for an incremental
// without a usable chain (missing previous image, another size, a source shorter than the
// chain's); conversion errors as Convert reports them. On any error the directory holds
// no new image and the manifest is unchanged.
ZQCOW_EXPORT Result<BackupResult> Backup(const std::string& source, const std::string& dir,
                            const BackupOptions& options);

// The manifest entry as JSON text (the manifest's own format for one image).
ZQCOW_EXPORT std::string BackupImageToJson(const BackupImage& image, int indent = 2);

// What VerifyChain found about one image.
struct VerifiedImage {
  BackupImage image;  // as the manifest lists it
  enum class Verdict : uint8_t { kOk, kIncomplete, kBad } verdict = Verdict::kOk;
  std::vector<std::string> problems;  // one line each, naming the file
  std::string content_digest;         // recomputed; "" when it could not be
};

struct VerifyReport {
  std::string dir;
  std::vector<VerifiedImage> images;
  // Problems of the directory as a whole (one line each): e.g. a manifest whose entries
  // do not form chains. Notes do not fail the verdict (stale partial files).
  std::vector<std::string> problems;
  std::vector<std::string> notes;
  // The worst verdict over the images and problems (kBad when `problems` is not empty).
  VerifiedImage::Verdict verdict() const;
};

// Proves the backup chains in `dir` without writing anything: every image the manifest
// lists exists with the recorded size, passes CheckImage, names the backing file the
// manifest says, and the content digest recomputed from its own clusters equals the one
// recorded when it was written. Reads one image at a time, a window of clusters at a time.
// While a prune is interrupted (see Prune), the image it was replacing is checked as the
// merged full image the manifest's pending record describes once it is that image; files
// the manifest does not list are notes, never problems.
// A non-OK Status only when verification could not run (no or unreadable manifest).
ZQCOW_EXPORT Result<VerifyReport> VerifyChain(const std::string& dir);

// ---- Retention: zqcow prune, zqcow backup --keep (src/backup/prune.cc) ----
//
// A restore point is one image the manifest lists (the guest content when that backup
// began); the points of a directory are its images across all chains, oldest first. Prune
// keeps the newest `keep` of them: chains whose points all go are removed whole; when the
// oldest point kept is an incremental, it and the images below it in its chain are merged
// into a compressed full image that takes that incremental's file name (so the next
// incremental's backing file stays valid), then the older images are removed. Every step
// is crash safe (docs/RELIABILITY.md): a crash leaves a directory VerifyChain accepts,
// restoring to every point its manifest lists, and the next Backup or Prune completes or
// undoes the interrupted step.

struct PruneOptions {
  unsigned keep = 0;     // restore points to keep; 0 is refused (kInvalidArgument)
  bool dry_run = false;  // report what would be done, change nothing
  unsigned workers = 0;  // for the merge's conversion; 0 = one per online core
  const std::atomic<bool>* cancel = nullptr;  // stops the merge's conversion (kInterrupted)
};

struct PruneResult {
  bool dry_run = false;
  size_t points_before = 0;
  size_t points_after = 0;
  // The image that became (dry run: would become) a full image, "" when none, and the
  // images merged into it, oldest first (it last).
  std::string merged;
  std::vector<std::string> merged_from;
  std::vector<std::string> dropped_chains;  // chain ids removed whole
  std::vector<std::string> removed;         // image files removed (dry run: to remove)
  std::vector<std::string> notes;           // one line each (an interrupted prune, stale files)
};

// Runs exclusively, under the same directory lock as Backup (a Backup or Prune already
// running on `dir` makes it fail at once with kAlreadyExists). Errors name the file and
// the cause; on any error the directory still verifies and restores every listed point.
ZQCOW_EXPORT Result<PruneResult> Prune(const std::string& dir, const PruneOptions& options);
struct RestoreOptions {
  // Which restore point: "" = the last image the manifest lists; a sequence number ("3");
  // or a UTC time, ISO 8601 ("2026-12-02T03:04:05Z", "2026-12-02T03:04", or a date alone,
  // meaning the end of that day): the latest image whose end_time is at or before it.
  std::string point;
  // How to write DST. output_format "raw" (the default here) or "qcow2" (a standalone,
  // compressed merged full; `compress` is set then). Restore sets source_format,
  // cluster_size (the image's, for the digest check) and digest_ranges itself.
  ConvertOptions convert = [] {
    ConvertOptions options;
    options.output_format = "raw";
    options.compress = false;
    return options;
  }();
};

struct RestoreResult {
  BackupImage image;   // the restore point (its manifest entry)
  ConvertStats stats;  // of the conversion that wrote DST
  // The content of the point's own image, as restored, matched the digest recorded when
  // it was backed up (the images below it are checked by `zqcow verify`).
  bool digest_checked = false;
};

// Restores the backup chain of directory `dir` at options.point into `target` (a new file,
// or with raw output and convert.no_create an existing file, a block device, or an NBD
// export). Refuses (one line naming the file) a point the manifest does not list, an image
// of its chain that is missing, incomplete (dirty bit), of another size or backing file
// than the manifest says, or corrupt. While it writes, the clusters of the point's own
// image are hashed from the data read; when that digest does not match the manifest's the
// restore fails with kCorruption (a new file target is not created).
ZQCOW_EXPORT Result<RestoreResult> Restore(const std::string& dir, const std::string& target,
                                           const RestoreOptions& options);

}  // namespace zqcow

#endif  // ZQCOW_BACKUP_H_
