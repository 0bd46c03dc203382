// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "backup/manifest.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

namespace zqcow::backup {
namespace {

constexpr const char* kFormatName = "zqcow-backup-manifest";
constexpr int kFormatVersion = 1;
constexpr const char* kTempSuffix = ".tmp";
constexpr std::string_view kConvertPartialSuffix = ".zqcow-partial";
constexpr std::string_view kConvertRecordSuffix = ".info";
constexpr int kSequenceDigits = 4;
constexpr const char* kDefaultDiskName = "disk";

nlohmann::json ImageToJson(const BackupImage& image) {
  return {{"file", image.file},
          {"sequence", image.sequence},
          {"level", image.level},
          {"chain_id", image.chain_id},
          {"backing_file", image.backing_file},
          {"bitmap", image.bitmap},
          {"source", image.source},
          {"source_size", image.source_size},
          {"start_time", image.start_time},
          {"end_time", image.end_time},
          {"virtual_size", image.virtual_size},
          {"cluster_size", image.cluster_size},
          {"file_size", image.file_size},
          {"bytes_read", image.bytes_read},
          {"bytes_written", image.bytes_written},
          {"content_digest", image.content_digest},
          {"zqcow_version", image.zqcow_version}};
}

// Reads field `key` of `entry` into `out`; false when it is missing or of another type.
template <class T>
bool Field(const nlohmann::json& entry, const char* key, T& out) {
  auto it = entry.find(key);
  if (it == entry.end()) return false;
  if constexpr (std::is_same_v<T, std::string>) {
    if (!it->is_string()) return false;
  } else {
    if (!it->is_number_unsigned()) return false;
  }
  out = it->get<T>();
  return true;
}

Result<BackupImage> ImageFromJson(const nlohmann::json& entry, const std::string& where,
                                  size_t index) {
  BackupImage image;
  const std::string what = where + ": image " + std::to_string(index);
  if (!entry.is_object()) return Status::Corruption(what + " is not an object");
  for (auto [key, field] : std::initializer_list<std::pair<const char*, std::string*>>{
           {"file", &image.file},
           {"level", &image.level},
           {"chain_id", &image.chain_id},
           {"backing_file", &image.backing_file},
           {"bitmap", &image.bitmap},
           {"source", &image.source},
           {"start_time", &image.start_time},
           {"end_time", &image.end_time},
           {"content_digest", &image.content_digest},
           {"zqcow_version", &image.zqcow_version}}) {
    if (!Field(entry, key, *field)) {
      return Status::Corruption(what + ": '" + key + "' is missing or not a string");
    }
  }
  for (auto [key, field] : std::initializer_list<std::pair<const char*, uint64_t*>>{
           {"source_size", &image.source_size},
           {"virtual_size", &image.virtual_size},
           {"file_size", &image.file_size},
           {"bytes_read", &image.bytes_read},
           {"bytes_written", &image.bytes_written}}) {
    if (!Field(entry, key, *field)) {
      return Status::Corruption(what + ": '" + key + "' is missing or not a number");
    }
  }
  if (!Field(entry, "sequence", image.sequence) ||
      !Field(entry, "cluster_size", image.cluster_size)) {
    return Status::Corruption(what + ": 'sequence' or 'cluster_size' is missing or not a number");
  }
  if (image.level != kLevelFull && image.level != kLevelIncremental) {
    return Status::Corruption(what + ": level '" + image.level + "' is neither full nor inc");
  }
  // The file name is joined to the directory: it must stay inside it.
  if (image.file.empty() || image.file.find('/') != std::string::npos || image.file == "." ||
      image.file == ".." || image.backing_file.find('/') != std::string::npos) {
    return Status::Corruption(what + ": file name '" + image.file + "' is not a plain name");
  }
  return image;
}

bool IsDigits(std::string_view text) {
  if (text.size() < kSequenceDigits) return false;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

Status SyncFd(int fd, const std::string& path) {
  if (fsync(fd) != 0) return Status::FromErrno(errno, path + ": fsync");
  return Status::OK();
}

}  // namespace

std::string ManifestToText(const Manifest& manifest) {
  nlohmann::json images = nlohmann::json::array();
  for (const BackupImage& image : manifest.images) images.push_back(ImageToJson(image));
  nlohmann::json j = {{"format", kFormatName},
                      {"version", kFormatVersion},
                      {"disk", manifest.disk},
                      {"images", std::move(images)}};
  if (manifest.pending_merge) {
    const PendingMerge& merge = *manifest.pending_merge;
    j["pending_merge"] = {{"file", merge.file},
                          {"file_size", merge.file_size},
                          {"content_digest", merge.content_digest}};
  }
  return j.dump(2) + "\n";
}

Result<Manifest> ParseManifest(std::string_view text, const std::string& where) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Status::Corruption(where + ": not valid JSON");
  if (!j.is_object() || j.value("format", "") != kFormatName) {
    return Status::Corruption(where + ": not a zqcow backup manifest");
  }
  if (!j.contains("version") || !j["version"].is_number_integer() ||
      j["version"].get<int>() != kFormatVersion) {
    return Status::Corruption(where + ": manifest version is not " +
                              std::to_string(kFormatVersion));
  }
  Manifest manifest;
  if (!Field(j, "disk", manifest.disk) || !IsPlainName(manifest.disk)) {
    return Status::Corruption(where + ": 'disk' is missing or not a plain name");
  }
  if (!j.contains("images") || !j["images"].is_array()) {
    return Status::Corruption(where + ": 'images' is missing or not a list");
  }
  for (size_t i = 0; i < j["images"].size(); ++i) {
    ZQ_ASSIGN_OR_RETURN(BackupImage image, ImageFromJson(j["images"][i], where, i));
    manifest.images.push_back(std::move(image));
  }
  if (j.contains("pending_merge")) {
    const nlohmann::json& entry = j["pending_merge"];
    PendingMerge merge;
    if (!entry.is_object() || !Field(entry, "file", merge.file) ||
        !Field(entry, "file_size", merge.file_size) ||
        !Field(entry, "content_digest", merge.content_digest)) {
      return Status::Corruption(where + ": 'pending_merge' is not a valid record");
    }
    bool listed = false;
    for (const BackupImage& image : manifest.images) {
      listed = listed || (image.file == merge.file && image.level == kLevelIncremental);
    }
    if (!listed) {
      return Status::Corruption(where + ": 'pending_merge' names " + merge.file +
                                ", not an incremental image it lists");
    }
    manifest.pending_merge = std::move(merge);
  }
  return manifest;
}

BackupImage MergedEntry(const BackupImage& image, const PendingMerge& merge) {
  BackupImage merged = image;
  merged.level = kLevelFull;
  merged.backing_file.clear();
  merged.bitmap.clear();
  merged.file_size = merge.file_size;
  merged.content_digest = merge.content_digest;
  return merged;
}

Manifest ApplyPendingMerge(Manifest manifest) {
  if (!manifest.pending_merge) return manifest;
  const PendingMerge merge = *manifest.pending_merge;
  manifest.pending_merge.reset();
  size_t at = 0;
  while (at < manifest.images.size() && manifest.images[at].file != merge.file) ++at;
  if (at == manifest.images.size()) return manifest;
  const std::string chain = manifest.images[at].chain_id;
  std::vector<BackupImage> images;
  for (size_t i = 0; i < manifest.images.size(); ++i) {
    if (i < at && manifest.images[i].chain_id == chain) continue;  // merged into it
    images.push_back(i == at ? MergedEntry(manifest.images[i], merge) : manifest.images[i]);
  }
  manifest.images = std::move(images);
  return manifest;
}

std::string ManifestPath(const std::string& dir) { return dir + "/" + kBackupManifestName; }

Result<Manifest> ReadManifest(const std::string& dir) {
  const std::string path = ManifestPath(dir);
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    if (err == ENOENT) return Status::NotFound(path + ": no backup manifest");
    return Status::FromErrno(err, path);
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return Status::IOError(path + ": read failed");
  return ParseManifest(text.str(), path);
}

Status WriteManifest(const std::string& dir, const Manifest& manifest) {
  const std::string path = ManifestPath(dir);
  const std::string temp = path + kTempSuffix;
  const std::string text = ManifestToText(manifest);
  int fd = open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, temp);
  Status status;
  for (size_t done = 0; done < text.size() && status.ok();) {
    ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0)
      status = Status::FromErrno(errno, temp);
    else
      done += static_cast<size_t>(n);
  }
  if (status.ok()) status = SyncFd(fd, temp);
  if (close(fd) != 0 && status.ok()) status = Status::FromErrno(errno, temp);
  if (status.ok() && rename(temp.c_str(), path.c_str()) != 0) {
    status = Status::FromErrno(errno, path + ": rename");
  }
  if (!status.ok()) {
    unlink(temp.c_str());
    return status;
  }
  return SyncPath(dir);
}

std::vector<std::string> ChainProblems(const Manifest& manifest) {
  std::vector<std::string> problems;
  std::set<std::string> files;
  std::set<std::string> chains;
  for (size_t i = 0; i < manifest.images.size(); ++i) {
    const BackupImage& image = manifest.images[i];
    const BackupImage* previous = i > 0 ? &manifest.images[i - 1] : nullptr;
    const std::string what = "manifest: " + image.file;
    if (!files.insert(image.file).second) problems.push_back(what + " is listed twice");
    if (previous != nullptr && image.sequence <= previous->sequence) {
      problems.push_back(what + ": sequence " + std::to_string(image.sequence) +
                         " does not follow " + std::to_string(previous->sequence));
    }
    if (image.level == kLevelFull) {
      if (!image.backing_file.empty()) {
        problems.push_back(what + ": a full image with a backing file");
      }
      if (!chains.insert(image.chain_id).second) {
        problems.push_back(what + ": a full image in chain " + image.chain_id +
                           ", which began earlier");
      }
      continue;
    }
    if (previous == nullptr || previous->chain_id != image.chain_id) {
      problems.push_back(what +
                         ": an incremental image that does not follow an image of its "
                         "chain " +
                         image.chain_id);
    } else if (image.backing_file != previous->file) {
      problems.push_back(what + ": backing file '" + image.backing_file +
                         "' is not the image before it, " + previous->file);
    }
  }
  return problems;
}

std::string ImageFileName(const std::string& disk, uint32_t sequence, std::string_view level) {
  char number[16];
  std::snprintf(number, sizeof(number), "%0*u", kSequenceDigits, sequence);
  return disk + "-" + number + "-" + std::string(level) + ".qcow2";
}

bool IsBackupFileName(const std::string& disk, std::string_view name) {
  const std::string prefix = disk + "-";
  if (!name.starts_with(prefix)) return false;
  name.remove_prefix(prefix.size());
  if (name.ends_with(kConvertRecordSuffix) &&
      name.substr(0, name.size() - kConvertRecordSuffix.size()).ends_with(kConvertPartialSuffix)) {
    name.remove_suffix(kConvertRecordSuffix.size());
  }
  if (name.ends_with(kConvertPartialSuffix)) name.remove_suffix(kConvertPartialSuffix.size());
  for (std::string_view suffix : {kPartialSuffix, kPrunePartialSuffix}) {
    if (name.ends_with(suffix)) {
      name.remove_suffix(suffix.size());
      break;
    }
  }
  for (std::string_view level : {"-full.qcow2", "-inc.qcow2"}) {
    if (name.ends_with(level)) return IsDigits(name.substr(0, name.size() - level.size()));
  }
  return false;
}

namespace {

bool IsPlainChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

}  // namespace

bool IsPlainName(std::string_view name) {
  if (name.empty() || name == "." || name == "..") return false;
  for (char c : name) {
    if (!IsPlainChar(c)) return false;
  }
  return true;
}

std::string DiskNameFromSource(const std::string& source) {
  std::string_view name = source;
  if (const size_t scheme = name.find("://"); scheme != std::string_view::npos) {
    name.remove_prefix(scheme + 3);  // nbd+unix:///EXPORT?socket=... : the export
    name = name.substr(0, name.find('?'));
  }
  while (name.ends_with('/')) name.remove_suffix(1);
  if (const size_t slash = name.rfind('/'); slash != std::string_view::npos) {
    name.remove_prefix(slash + 1);
  }
  if (const size_t dot = name.rfind('.'); dot != std::string_view::npos && dot > 0) {
    name = name.substr(0, dot);
  }
  std::string disk;
  for (char c : name) disk.push_back(IsPlainChar(c) ? c : '_');
  return IsPlainName(disk) ? disk : kDefaultDiskName;
}

std::string NewChainId() {
  std::random_device random;
  std::mt19937_64 generator((uint64_t{random()} << 32) ^ random());
  char text[20];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(generator()));
  return text;
}

Status SyncPath(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, path);
  Status status = SyncFd(fd, path);
  close(fd);
  return status;
}

}  // namespace zqcow::backup
