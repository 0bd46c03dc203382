// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Creating the conversion's target image: refusing to replace an existing file unless
// asked, and the test hook that puts a wrapper (e.g. a fault injector) under the image.

#ifndef ZQCOW_CONVERT_TARGET_H_
#define ZQCOW_CONVERT_TARGET_H_

#include <cstdint>
#include <memory>
#include <string>

#include "zqcow/convert.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::convert {

// Creates an empty qcow2 image of `virtual_size` bytes at `path` with the options' cluster
// size, compression type, refcount width and target I/O options. Without
// options.overwrite an existing file is refused with kAlreadyExists
// "<path>: target exists (use --force to overwrite)". With options.wrap_target_file the
// file is opened here and handed through the wrapper to qcow2::CreateImageOnFile.
Result<std::unique_ptr<Image>> CreateTarget(const std::string& path, const ConvertOptions& options,
                                            uint64_t virtual_size);

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_TARGET_H_
