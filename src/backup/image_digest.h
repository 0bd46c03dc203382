// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The content digest (src/digest/content_digest.h) of the clusters an image holds itself,
// recomputed from the image: what `zqcow verify` compares with the digest recorded when
// the image was written.

#ifndef ZQCOW_BACKUP_IMAGE_DIGEST_H_
#define ZQCOW_BACKUP_IMAGE_DIGEST_H_

#include <cstdint>
#include <string>

#include "digest/content_digest.h"
#include "zqcow/status.h"

namespace zqcow::backup {

enum class ClustersToHash : uint8_t {
  kAll,       // every cluster the image allocates: data, compressed and zero clusters
  kZeroOnly,  // its zero clusters alone (read from the metadata, no data is read)
};

// Opens `path` read-only (through its backing chain, which must be there) and hashes the
// clusters it allocates itself (Map depth 0), `which` says which. Memory: one window of
// clusters, whatever the image's size. Errors name the image: it cannot be opened, a
// cluster cannot be read or decompressed.
Result<digest::ContentDigest> DigestImageClusters(const std::string& path,
                                                  ClustersToHash which = ClustersToHash::kAll);

}  // namespace zqcow::backup

#endif  // ZQCOW_BACKUP_IMAGE_DIGEST_H_
