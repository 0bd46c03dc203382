// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// zqcow::VerifyChain: checks every image the manifest lists, reading only.

#include <sys/stat.h>

#include <cerrno>
#include <utility>

#include "backup/backup_files.h"
#include "backup/check_structure.h"
#include "backup/image_digest.h"
#include "backup/manifest.h"
#include "zqcow/backup.h"
#include "zqcow/image.h"

namespace zqcow {
namespace {

using Verdict = VerifiedImage::Verdict;

void Worsen(VerifiedImage& report, Verdict verdict, std::string problem) {
  if (static_cast<int>(verdict) > static_cast<int>(report.verdict)) report.verdict = verdict;
  report.problems.push_back(std::move(problem));
}

std::string Named(const Status& status, const std::string& path) {
  const std::string& message = status.message();
  return message.find(path) != std::string::npos ? message : path + ": " + message;
}

}  // namespace

namespace backup {

bool CheckStructure(const std::string& path, VerifiedImage& report) {
  const BackupImage& expected = report.image;
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    Worsen(report, Verdict::kBad,
           errno == ENOENT
               ? path + ": missing (the manifest lists it as sequence " +
                     std::to_string(expected.sequence) + " of chain " + expected.chain_id + ")"
               : Status::FromErrno(errno, path).message());
    return false;
  }
  if (static_cast<uint64_t>(st.st_size) != expected.file_size) {
    Worsen(report, Verdict::kBad,
           path + ": " + std::to_string(st.st_size) + " bytes, the manifest says " +
               std::to_string(expected.file_size) +
               (static_cast<uint64_t>(st.st_size) < expected.file_size
                    ? " (truncated)"
                    : " (replaced by another file?)"));
    return false;
  }
  Result<ImageInfo> info = ReadImageInfo(path);
  if (!info.ok()) {
    Worsen(report, Verdict::kBad, Named(info.status(), path));
    return false;
  }
  bool fit = true;
  if (info->backing_file != expected.backing_file) {
    auto name = [](const std::string& file) { return file.empty() ? "none" : "'" + file + "'"; };
    Worsen(report, Verdict::kBad,
           path + ": its backing file is " + name(info->backing_file) + ", the manifest says " +
               name(expected.backing_file) + " (an image swapped in from elsewhere?)");
    fit = false;
  }
  if (info->virtual_size != expected.virtual_size) {
    Worsen(report, Verdict::kBad,
           path + ": virtual size " + std::to_string(info->virtual_size) + ", the manifest says " +
               std::to_string(expected.virtual_size));
    fit = false;
  }
  Result<CheckResult> check = CheckImage(path);
  if (!check.ok()) {
    Worsen(report, Verdict::kBad, Named(check.status(), path));
    return false;
  }
  if (check->corruptions > 0 || info->corrupt) {
    Worsen(report, Verdict::kBad,
           path + ": the check finds " + std::to_string(check->corruptions) + " corruption(s)" +
               (check->messages.empty() ? "" : ": " + check->messages.front()));
    fit = false;
  }
  if (check->incomplete || info->dirty) {
    Worsen(report, Verdict::kIncomplete,
           path + ": marked incomplete (its dirty bit is set), yet the manifest lists it");
  }
  if (check->leaks > 0) {
    Worsen(report, Verdict::kIncomplete,
           path + ": the check finds " + std::to_string(check->leaks) + " leaked cluster(s)");
  }
  return fit;
}

}  // namespace backup

namespace {

using backup::CheckStructure;

void CheckContent(const std::string& path, VerifiedImage& report) {
  Result<digest::ContentDigest> computed = backup::DigestImageClusters(path);
  if (!computed.ok()) {
    Worsen(report, Verdict::kBad, "cannot read its content: " + Named(computed.status(), path));
    return;
  }
  report.content_digest = computed->ToString();
  Result<digest::ContentDigest> recorded =
      digest::ContentDigest::Parse(report.image.content_digest);
  if (!recorded.ok()) {
    Worsen(report, Verdict::kBad, path + ": manifest: " + recorded.status().message());
    return;
  }
  if (*computed == *recorded) return;
  Worsen(report, Verdict::kBad,
         path + ": its guest content does not match the backup (" +
             std::to_string(computed->clusters) + " clusters, digest " + computed->ToString() +
             "; recorded " + std::to_string(recorded->clusters) + " clusters, " +
             recorded->ToString() + "): damaged data, or an image of another chain");
}

// Notes for files of a backup or prune that is running or did not complete.
std::vector<std::string> UnlistedNotes(const std::string& dir, const backup::Manifest& manifest) {
  std::vector<std::string> notes;
  Result<std::vector<std::string>> unlisted = backup::UnlistedFiles(dir, manifest);
  if (!unlisted.ok()) return notes;
  for (const std::string& name : *unlisted) {
    notes.push_back(dir + "/" + name +
                    ": not in the manifest, so not part of any chain (a backup or prune that "
                    "is running or did not complete; the next backup or prune removes it)");
  }
  return notes;
}

// What `image` must be now: as listed, or, when an interrupted prune already put the
// merged full in its place, that full image.
BackupImage Expected(const std::string& dir, const backup::Manifest& manifest,
                     const BackupImage& image, std::vector<std::string>& notes) {
  if (!manifest.pending_merge || manifest.pending_merge->file != image.file) return image;
  const backup::PendingMerge& merge = *manifest.pending_merge;
  const std::string path = dir + "/" + image.file;
  if (backup::IsMergedFull(path, merge)) {
    notes.push_back(path +
                    ": already the merged full image of an interrupted prune (the images "
                    "before it in its chain still hold the older points; the next backup or "
                    "prune completes the prune)");
    return backup::MergedEntry(image, merge);
  }
  notes.push_back(path +
                  ": an interrupted prune was to replace it by a merged full image (the next "
                  "backup or prune finishes or undoes that)");
  return image;
}

}  // namespace

Verdict VerifyReport::verdict() const {
  Verdict worst = problems.empty() ? Verdict::kOk : Verdict::kBad;
  for (const VerifiedImage& image : images) {
    if (static_cast<int>(image.verdict) > static_cast<int>(worst)) worst = image.verdict;
  }
  return worst;
}

Result<VerifyReport> VerifyChain(const std::string& dir) {
  ZQ_ASSIGN_OR_RETURN(backup::Manifest manifest, backup::ReadManifest(dir));
  VerifyReport report;
  report.dir = dir;
  report.problems = backup::ChainProblems(manifest);
  if (manifest.images.empty()) report.problems.push_back(dir + ": the manifest lists no image");
  report.notes = UnlistedNotes(dir, manifest);
  // Structure of every image first: a missing or swapped image shows as that, not as the
  // failure to open the images above it.
  std::vector<bool> fit;
  for (const BackupImage& image : manifest.images) {
    VerifiedImage& verified = report.images.emplace_back();
    verified.image = Expected(dir, manifest, image, report.notes);
    fit.push_back(CheckStructure(dir + "/" + image.file, verified));
  }
  for (size_t i = 0; i < report.images.size(); ++i) {
    VerifiedImage& verified = report.images[i];
    if (!fit[i]) continue;
    // Its clusters are read through the images below it, which must be sound.
    bool chain_fit = true;
    for (size_t j = i; j > 0 && report.images[j].image.level != backup::kLevelFull; --j) {
      if (!fit[j - 1]) {
        chain_fit = false;
        Worsen(verified, Verdict::kBad,
               dir + "/" + verified.image.file + ": not readable, its backing image " +
                   report.images[j - 1].image.file + " is broken");
        break;
      }
    }
    if (chain_fit) CheckContent(dir + "/" + verified.image.file, verified);
  }
  return report;
}

}  // namespace zqcow
