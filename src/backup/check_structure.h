// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The structural half of `zqcow verify` for one image, shared with `zqcow restore`.

#ifndef ZQCOW_BACKUP_CHECK_STRUCTURE_H_
#define ZQCOW_BACKUP_CHECK_STRUCTURE_H_

#include <string>

#include "zqcow/backup.h"

namespace zqcow::backup {

// Header, size and check of the image at `path` against its manifest entry report.image:
// everything short of reading the data. Adds each problem to `report` (kIncomplete for a
// dirty bit or leaks, kBad for the rest). False when the image is not fit to be read
// (missing, another size, another backing file, corrupt).
bool CheckStructure(const std::string& path, VerifiedImage& report);

}  // namespace zqcow::backup

#endif  // ZQCOW_BACKUP_CHECK_STRUCTURE_H_
