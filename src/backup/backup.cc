// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// zqcow::Backup: picks the level, converts the source into a temporary file in the backup
// directory, makes it durable under its final name, then lists it in the manifest.

#include "zqcow/backup.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <memory>
#include <nlohmann/json.hpp>
#include <utility>

#include "backup/backup_files.h"
#include "backup/manifest.h"
#include "backup/prune.h"
#include "convert/source.h"
#include "zqcow/image.h"

namespace zqcow {
namespace {

using backup::CheckNewImage;
using backup::FileSize;
using backup::Manifest;
using backup::UtcNow;

// What the source looks like now.
struct SourceFacts {
  uint64_t size = 0;
  std::string bitmap_problem;  // why options.bitmap cannot serve an incremental; "" if it can
};

Result<SourceFacts> ProbeSource(const std::string& source, const BackupOptions& options) {
  const ConvertOptions& convert = options.convert;
  convert::SourceOptions source_options{.format = convert.source_format,
                                        .direct_io = convert.source_direct_io,
                                        .force_share = convert.force_share,
                                        .bitmap = options.bitmap,
                                        .snapshot = convert.source_snapshot,
                                        .snapshot_id = convert.source_snapshot_id,
                                        .snapshot_name = convert.source_snapshot_name};
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<convert::Source> input,
                      convert::OpenSource(source, source_options));
  SourceFacts facts;
  facts.size = input->size();
  if (!options.bitmap.empty()) {
    Result<std::vector<convert::ByteRange>> dirty =
        input->DirtyRanges(0, std::min<uint64_t>(facts.size, convert.cluster_size));
    if (!dirty.ok()) facts.bitmap_problem = dirty.status().message();
  }
  (void)input->Close();  // read-only
  return facts;
}

// Why the next image cannot be an incremental on top of `manifest`'s last one; "" when it
// can.
std::string WhyNotIncremental(const std::string& dir, const Manifest& manifest,
                              const SourceFacts& source, const BackupOptions& options) {
  if (manifest.images.empty()) return dir + " holds no backup chain yet";
  const BackupImage& last = manifest.images.back();
  const std::string path = dir + "/" + last.file;
  Result<uint64_t> size = FileSize(path);
  if (!size.ok()) return "the chain's last image " + size.status().message();
  if (*size != last.file_size) {
    return "the chain's last image " + path + " is " + std::to_string(*size) +
           " bytes, the manifest says " + std::to_string(last.file_size);
  }
  Result<ImageInfo> info = ReadImageInfo(path);
  if (!info.ok()) return "the chain's last image: " + info.status().message();
  if (info->dirty) return "the chain's last image " + path + " is marked incomplete";
  if (info->backing_file != last.backing_file || info->virtual_size != last.virtual_size) {
    return "the chain's last image " + path + " is not the one the manifest lists";
  }
  if (source.size < last.source_size) {
    return "the source is " + std::to_string(source.size) + " bytes, shorter than the " +
           std::to_string(last.source_size) + " bytes of the chain's last image " + last.file;
  }
  // A grown disk could be an overlay too, but a new chain is always right.
  if (source.size != last.source_size) {
    return "the source grew from " + std::to_string(last.source_size) + " to " +
           std::to_string(source.size) + " bytes";
  }
  unsigned incrementals = 0;
  for (const BackupImage& image : manifest.images) {
    if (image.chain_id == last.chain_id && image.level == backup::kLevelIncremental) {
      ++incrementals;
    }
  }
  if (incrementals >= options.max_incrementals) {
    return "the chain already has " + std::to_string(incrementals) +
           " incremental images (the limit is " + std::to_string(options.max_incrementals) + ")";
  }
  if (!source.bitmap_problem.empty()) {
    return "dirty bitmap '" + options.bitmap + "' cannot be read: " + source.bitmap_problem;
  }
  return "";
}

void RemoveIfPresent(const std::string& path) { (void)unlink(path.c_str()); }

}  // namespace

std::string BackupImageToJson(const BackupImage& image, int indent) {
  Manifest manifest{.disk = "x", .images = {image}, .pending_merge = {}};
  // One place knows the entry's JSON form: the manifest's.
  nlohmann::json j = nlohmann::json::parse(backup::ManifestToText(manifest));
  return j["images"][0].dump(indent);
}

Result<BackupResult> Backup(const std::string& source, const std::string& dir,
                            const BackupOptions& options) {
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) return Status::FromErrno(errno, dir);
  backup::DirectoryLock lock;
  ZQ_RETURN_IF_ERROR(lock.Acquire(dir));

  Manifest manifest;
  Result<Manifest> read = backup::ReadManifest(dir);
  if (read.ok()) {
    manifest = std::move(read).value();
  } else if (!read.status().IsNotFound()) {
    return read.status();
  }
  if (!options.disk_name.empty() && !backup::IsPlainName(options.disk_name)) {
    return Status::InvalidArgument("disk name '" + options.disk_name +
                                   "': use only letters, digits, '.', '_' and '-'");
  }
  if (manifest.disk.empty()) {
    manifest.disk =
        options.disk_name.empty() ? backup::DiskNameFromSource(source) : options.disk_name;
  }
  BackupResult result;
  ZQ_RETURN_IF_ERROR(backup::FinishInterruptedPrune(dir, manifest, /*dry_run=*/false,
                                                    result.notes));
  if (std::vector<std::string> problems = backup::ChainProblems(manifest); !problems.empty()) {
    return Status::Corruption(backup::ManifestPath(dir) + ": " + problems.front());
  }

  ZQ_ASSIGN_OR_RETURN(result.notes, backup::RemoveStaleFiles(dir, manifest));
  ZQ_ASSIGN_OR_RETURN(SourceFacts facts, ProbeSource(source, options));

  const std::string why_full = WhyNotIncremental(dir, manifest, facts, options);
  bool incremental = false;
  switch (options.level) {
    case BackupLevel::kFull:
      break;
    case BackupLevel::kIncremental:
      if (!why_full.empty()) {
        return Status::InvalidArgument(dir + ": cannot take an incremental backup: " + why_full);
      }
      incremental = true;
      break;
    case BackupLevel::kAuto:
      incremental = why_full.empty();
      if (!incremental && !manifest.images.empty()) {
        result.notes.push_back("taking a full backup: " + why_full);
      }
      break;
  }

  BackupImage& image = result.image;
  image.sequence = manifest.images.empty() ? 0 : manifest.images.back().sequence + 1;
  image.level = incremental ? backup::kLevelIncremental : backup::kLevelFull;
  image.file = backup::ImageFileName(manifest.disk, image.sequence, image.level);
  image.chain_id = incremental ? manifest.images.back().chain_id : backup::NewChainId();
  image.backing_file = incremental ? manifest.images.back().file : "";
  image.bitmap = incremental ? options.bitmap : "";
  image.source = source;
  image.source_size = facts.size;
  image.zqcow_version = ZQCOW_VERSION;

  ConvertOptions convert = options.convert;
  convert.compress = true;
  convert.overwrite = true;                   // only ever a partial file nobody lists
  convert.backing_file = image.backing_file;  // plain name: resolved next to the image
  convert.backing_format = "qcow2";
  convert.bitmap = image.bitmap;

  const std::string final_path = dir + "/" + image.file;
  const std::string partial_path = final_path + std::string(backup::kPartialSuffix);
  image.start_time = UtcNow();
  Result<ConvertStats> stats = Convert(source, partial_path, convert);
  if (!stats.ok()) {
    RemoveIfPresent(partial_path);
    (void)DiscardPartialTarget(partial_path);
    return stats.status();
  }
  Result<digest::ContentDigest> content =
      CheckNewImage(partial_path, image.backing_file, stats->content_digest);
  Status status = content.status();
  // Durable under its final name before the manifest names it.
  if (status.ok()) status = backup::SyncPath(partial_path);
  if (status.ok() && rename(partial_path.c_str(), final_path.c_str()) != 0) {
    status = Status::FromErrno(errno, final_path + ": rename");
  }
  if (status.ok()) status = backup::SyncPath(dir);
  Result<uint64_t> file_size = status.ok() ? FileSize(final_path) : Result<uint64_t>(status);
  if (!file_size.ok()) {
    RemoveIfPresent(partial_path);
    RemoveIfPresent(final_path);
    return file_size.status();
  }
  image.end_time = UtcNow();
  image.virtual_size = stats->virtual_size;
  image.cluster_size = convert.cluster_size;
  image.file_size = *file_size;
  image.bytes_read = stats->bytes_read;
  image.bytes_written = stats->output_file_size;
  image.content_digest = content->ToString();
  result.stats = *stats;

  manifest.images.push_back(image);
  status = backup::WriteManifest(dir, manifest);
  if (!status.ok()) {
    // Unless the new manifest got in (only its directory sync failed), the image is not
    // listed, so not part of the chain: remove it.
    Result<Manifest> now = backup::ReadManifest(dir);
    if (!now.ok() || now->images.size() != manifest.images.size()) RemoveIfPresent(final_path);
    return status;
  }
  if (options.keep > 0) {
    PruneOptions prune;
    prune.keep = options.keep;
    prune.workers = options.convert.workers;
    prune.cancel = options.convert.cancel;
    Result<PruneResult> pruned = backup::PruneLocked(dir, std::move(manifest), prune);
    if (pruned.ok()) {
      result.pruned = pruned->removed;
      result.notes.insert(result.notes.end(), pruned->notes.begin(), pruned->notes.end());
      if (!pruned->merged.empty()) {
        result.notes.push_back("--keep " + std::to_string(options.keep) + ": merged " +
                               std::to_string(pruned->merged_from.size()) + " image(s) into " +
                               dir + "/" + pruned->merged + ", now a full image");
      }
      for (const std::string& file : pruned->removed) {
        result.notes.push_back("--keep " + std::to_string(options.keep) + ": removed " + dir +
                               "/" + file);
      }
    } else {
      result.prune_status = pruned.status();
    }
  }
  return result;
}

}  // namespace zqcow
