// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// zqcow::Restore: picks a restore point from the manifest, checks its chain's images as
// `zqcow verify` does short of reading their data, and converts the point's image (read
// through its backing chain) into DST, checking on the way that the clusters of the
// point's own image still hash to the digest recorded when it was backed up.

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "backup/check_structure.h"
#include "backup/image_digest.h"
#include "backup/manifest.h"
#include "zqcow/backup.h"
#include "zqcow/image.h"

namespace zqcow {
namespace {

bool AllDigits(const std::string& text) {
  return !text.empty() && std::all_of(text.begin(), text.end(),
                                      [](unsigned char c) { return std::isdigit(c) != 0; });
}

// "2026-12-02", "2026-12-02T03:04", "2026-12-02 03:04:05Z", ... as the manifest's form
// "2026-12-02T03:04:05Z"; a date alone is the end of that day. "" when it is none of them.
std::string NormalizeTime(std::string text) {
  if (!text.empty() && (text.back() == 'Z' || text.back() == 'z')) text.pop_back();
  if (text.size() == 10) text += "T23:59:59";
  if (text.size() == 16) text += ":00";
  if (text.size() != 19) return "";
  if (text[10] == ' ') text[10] = 'T';
  static constexpr const char* kShape = "dddd-dd-ddTdd:dd:dd";
  for (size_t i = 0; i < text.size(); ++i) {
    const bool digit = std::isdigit(static_cast<unsigned char>(text[i])) != 0;
    if (kShape[i] == 'd' ? !digit : text[i] != kShape[i]) return "";
  }
  return text + "Z";
}

Result<size_t> FindPoint(const backup::Manifest& manifest, const std::string& dir,
                         const std::string& point) {
  if (manifest.images.empty()) {
    return Status::NotFound(backup::ManifestPath(dir) + ": no backup to restore");
  }
  const std::string points = " (the manifest lists " +
                             std::to_string(manifest.images.front().sequence) + " to " +
                             std::to_string(manifest.images.back().sequence) + ")";
  if (point.empty()) return manifest.images.size() - 1;
  if (AllDigits(point)) {
    const uint64_t wanted = point.size() < 10 ? std::stoull(point) : UINT64_MAX;
    for (size_t i = 0; i < manifest.images.size(); ++i) {
      if (manifest.images[i].sequence == wanted) return i;
    }
    return Status::NotFound(dir + ": no restore point " + point + points);
  }
  const std::string time = NormalizeTime(point);
  if (time.empty()) {
    return Status::InvalidArgument("--point: '" + point +
                                   "' is neither a sequence number nor a UTC time "
                                   "(YYYY-MM-DD[THH:MM[:SS]][Z])");
  }
  std::optional<size_t> found;
  for (size_t i = 0; i < manifest.images.size(); ++i) {
    if (manifest.images[i].end_time <= time) found = i;
  }
  if (!found) {
    return Status::NotFound(dir + ": no backup finished at or before " + time +
                            " (the first finished at " + manifest.images.front().end_time + ")");
  }
  return *found;
}

// The point's own clusters with data (normal or compressed) in the image at `path`.
Result<std::vector<std::pair<uint64_t, uint64_t>>> OwnDataRanges(const std::string& path) {
  OpenOptions open;
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Image> image, Image::Open(path, open));
  ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> extents, image->Map(0, image->virtual_size()));
  (void)image->Close();
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const MapExtent& extent : extents) {
    if (extent.depth != 0 || (extent.kind != MapExtent::Kind::kData &&
                              extent.kind != MapExtent::Kind::kCompressed)) {
      continue;
    }
    if (!ranges.empty() && ranges.back().first + ranges.back().second == extent.guest_offset) {
      ranges.back().second += extent.length;
    } else {
      ranges.emplace_back(extent.guest_offset, extent.length);
    }
  }
  return ranges;
}

// The digest the point's data clusters must hash to: the recorded one without its zero
// clusters (they hold no data to read).
Result<std::string> ExpectedDataDigest(const std::string& path, const BackupImage& image) {
  Result<digest::ContentDigest> recorded = digest::ContentDigest::Parse(image.content_digest);
  if (!recorded.ok()) return recorded.status().WithPrefix(path + ": manifest");
  ZQ_ASSIGN_OR_RETURN(digest::ContentDigest zeros,
                      backup::DigestImageClusters(path, backup::ClustersToHash::kZeroOnly));
  recorded->clusters -= zeros.clusters;
  recorded->sum -= zeros.sum;
  recorded->xor_all ^= zeros.xor_all;
  return recorded->ToString();
}

}  // namespace

Result<RestoreResult> Restore(const std::string& dir, const std::string& target,
                              const RestoreOptions& options) {
  ZQ_ASSIGN_OR_RETURN(backup::Manifest manifest, backup::ReadManifest(dir));
  ZQ_ASSIGN_OR_RETURN(size_t index, FindPoint(manifest, dir, options.point));
  const BackupImage& point = manifest.images[index];
  // Its chain, from the point down to its full image: each listed and fit to be read.
  for (size_t i = index + 1; i-- > 0;) {
    const BackupImage& image = manifest.images[i];
    if (image.chain_id != point.chain_id) {
      return Status::Corruption(backup::ManifestPath(dir) + ": the chain of " + point.file +
                                " has no full image");
    }
    VerifiedImage report;
    report.image = image;
    const std::string path = dir + "/" + image.file;
    const bool fit = backup::CheckStructure(path, report);
    if (!fit || report.verdict != VerifiedImage::Verdict::kOk) {
      return Status::Corruption(report.problems.empty() ? path + ": cannot be restored"
                                                        : report.problems.front());
    }
    if (image.level == backup::kLevelFull) break;
  }

  const std::string path = dir + "/" + point.file;
  RestoreResult result;
  result.image = point;
  ConvertOptions convert = options.convert;
  convert.source_format = "qcow2";
  convert.cluster_size = point.cluster_size;
  if (convert.output_format == "qcow2") convert.compress = true;
  ZQ_ASSIGN_OR_RETURN(convert.digest_ranges, OwnDataRanges(path));
  ZQ_ASSIGN_OR_RETURN(convert.expected_ranges_digest, ExpectedDataDigest(path, point));
  ZQ_ASSIGN_OR_RETURN(result.stats, Convert(path, target, convert));
  result.digest_checked = true;
  return result;
}

}  // namespace zqcow
