// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The conversion's target. DST is only ever replaced whole: the image is written to a
// partial file beside it, DST.zqcow-partial (same directory, so same file system), with
// its resume record DST.zqcow-partial.info (see resume.h), and renamed onto DST only
// once it is closed clean (dirty bit cleared, synced); then the directory is synced. So
// a file at DST is a complete image (or, with --force, the old one until the rename),
// whatever happens to the process, and whatever QEMU tools do to the partial file later.
// zqcow creates images as regular files only (a block device DST is refused), so this
// holds for every target; the dirty bit stays the marker of the partial image itself.

#ifndef ZQCOW_CONVERT_TARGET_H_
#define ZQCOW_CONVERT_TARGET_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "convert/resume.h"
#include "convert/source.h"
#include "zqcow/convert.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::convert {

// DST as the rename will replace it: a symbolic link is followed (the file it names is
// replaced, the link stays), also a dangling one (the file it names is created, as qemu-img
// creates it); anything else is `path` itself.
std::string ResolveTarget(const std::string& path);

struct TargetPaths {
  std::string target;   // DST, resolved (ResolveTarget)
  std::string partial;  // DST.zqcow-partial: the image while it is written
  std::string record;   // DST.zqcow-partial.info: the resume record
};

// The files for DST = `path` (no checks).
TargetPaths TargetFiles(const std::string& path);

// TargetFiles, and checks DST: an existing DST is refused with
// kAlreadyExists "<path>: target exists (use --force to overwrite)" without
// options.overwrite, and with kNotSupported when it is not a regular file.
Result<TargetPaths> PlanTarget(const std::string& path, const ConvertOptions& options);

struct PartialTarget {
  std::unique_ptr<Image> image;    // open for writing (dirty bit set)
  std::vector<ByteRange> present;  // guest ranges it already holds (resume only), sorted
};

// Without options.resume, or when there is nothing to resume: writes the resume record
// `record`, creates an empty image of `virtual_size` bytes at paths.partial (CreateTarget)
// and syncs the directory. A partial image already there (an interrupted conversion) is
// refused with kAlreadyExists saying to use --resume or --force; with options.overwrite
// it is removed first. A record without its partial image is stale and replaced.
// With options.resume and a partial image there (one without even the qcow2 magic holds
// no work and is replaced as above): checks its record against `record`
// (CheckResumable), repairs the leaks the interruption left (qcow2::RepairLeaks), reopens
// it for writing and lists the guest ranges it holds. options.wrap_target_file applies
// to a created image only.
Result<PartialTarget> OpenPartialTarget(const TargetPaths& paths, const ConvertOptions& options,
                                        const ResumeRecord& record, uint64_t virtual_size);

// After the image at paths.partial was closed clean: renames it onto paths.target
// (replacing an old DST in one step), syncs the directory and removes the record. If the
// rename fails, says so (kIOError naming both files) and leaves the complete image at
// paths.partial.
Status CommitTarget(const TargetPaths& paths);

// Creates an empty qcow2 image of `virtual_size` bytes at `path` with the options' cluster
// size, compression type, refcount width and target I/O options. Without
// options.overwrite an existing file is refused with kAlreadyExists
// "<path>: target exists (use --force to overwrite)". With options.wrap_target_file the
// file is opened here and handed through the wrapper to qcow2::CreateImageOnFile.
Result<std::unique_ptr<Image>> CreateTarget(const std::string& path, const ConvertOptions& options,
                                            uint64_t virtual_size);

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_TARGET_H_
