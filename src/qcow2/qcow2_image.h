// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Internal entry points of the image engine that take an already opened io::File, so tests
// (and the convert pipeline's test hook) can put a fault-injecting wrapper underneath.

#ifndef ZQCOW_QCOW2_QCOW2_IMAGE_H_
#define ZQCOW_QCOW2_QCOW2_IMAGE_H_

#include <memory>
#include <string>

#include "io/file.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::qcow2 {

// `file` is empty (size 0) and writable. options.overwrite is ignored (the file exists).
// An O_DIRECT file whose alignment exceeds the cluster size is refused (kNotSupported):
// metadata is written as whole clusters. Image::Create/Open fall back to buffered I/O then.
// The image owns the file; the write cache and every table write go through it, so a
// fault-injecting wrapper sees all I/O.
Result<std::unique_ptr<Image>> CreateImageOnFile(std::unique_ptr<io::File> file,
                                                 const CreateOptions& options, const IoOptions& io);
// `depth`: how many images above this one name it as their backing file (0 for an image
// opened on its own). The image opens its backing chain read-only, writable or not.
Result<std::unique_ptr<Image>> OpenImageOnFile(std::unique_ptr<io::File> file,
                                               const OpenOptions& options, int depth = 0);
// Image::Open for an image `depth` levels down a backing chain.
Result<std::unique_ptr<Image>> OpenImageChain(const std::string& path, const OpenOptions& options,
                                              int depth);
// CheckImage on an open file (read only through it).
Result<CheckResult> CheckImageFile(io::File* file);
// What an interrupted writer leaves (refcounts higher than the references: leaks) made
// good, like `qemu-img check -r leaks`: each leaked refcount is lowered to the references
// found, synced. Returns how many clusters were repaired. An image with any corruption is
// refused (kCorruption, naming the first finding) and left untouched.
// REQUIRES: no one else writes the image (it is not open for writing anywhere).
Result<uint64_t> RepairLeaksOnFile(io::File* file);
Result<uint64_t> RepairLeaks(const std::string& path);

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_QCOW2_IMAGE_H_
