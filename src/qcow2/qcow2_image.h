// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Internal entry points of the image engine that take an already opened io::File, so tests
// (and the convert pipeline's test hook) can put a fault-injecting wrapper underneath.

#ifndef ZQCOW_QCOW2_QCOW2_IMAGE_H_
#define ZQCOW_QCOW2_QCOW2_IMAGE_H_

#include <memory>

#include "io/file.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::qcow2 {

// `file` is empty (size 0) and writable. options.overwrite is ignored (the file exists).
Result<std::unique_ptr<Image>> CreateImageOnFile(std::unique_ptr<io::File> file,
                                                 const CreateOptions& options,
                                                 const IoOptions& io);
Result<std::unique_ptr<Image>> OpenImageOnFile(std::unique_ptr<io::File> file,
                                               const OpenOptions& options);
// CheckImage on an open file (read only through it).
Result<CheckResult> CheckImageFile(io::File* file);

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_QCOW2_IMAGE_H_
