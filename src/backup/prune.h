// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The parts of Prune (include/zqcow/backup.h) that Backup runs too, under its own lock.

#ifndef ZQCOW_BACKUP_PRUNE_H_
#define ZQCOW_BACKUP_PRUNE_H_

#include <string>
#include <vector>

#include "backup/manifest.h"
#include "zqcow/backup.h"
#include "zqcow/status.h"

namespace zqcow::backup {

// Test hook: the environment variable naming the crash point (1, 2, ...) at which a prune
// kills its own process with SIGKILL, as a power cut or `kill -9` would at that moment.
inline constexpr const char* kPruneCrashEnv = "ZQCOW_TEST_PRUNE_CRASH_AT";

// Completes (the merged full already took its image's place) or undoes (it did not) the
// merge of a prune that was interrupted, in `manifest` and, unless `dry_run`, in the
// directory's manifest file. The files it leaves unlisted are for RemoveStaleFiles.
Status FinishInterruptedPrune(const std::string& dir, Manifest& manifest, bool dry_run,
                              std::vector<std::string>& notes);

// Prune, for a caller that holds the directory lock and read `manifest`.
Result<PruneResult> PruneLocked(const std::string& dir, Manifest manifest,
                                const PruneOptions& options);

}  // namespace zqcow::backup

#endif  // ZQCOW_BACKUP_PRUNE_H_
