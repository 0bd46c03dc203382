// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/target.h"

#include <sys/stat.h>

#include <utility>

#include "io/file.h"
#include "qcow2/qcow2_image.h"

namespace zqcow::convert {

namespace {

Status TargetExists(const std::string& path) {
  return Status::AlreadyExists(path + ": target exists (use --force to overwrite)");
}

}  // namespace

Result<std::unique_ptr<Image>> CreateTarget(const std::string& path, const ConvertOptions& options,
                                            uint64_t virtual_size) {
  struct stat st {};
  if (!options.overwrite && lstat(path.c_str(), &st) == 0) return TargetExists(path);

  CreateOptions create;
  create.virtual_size = virtual_size;
  create.cluster_size = options.cluster_size;
  create.compression = options.compression;
  create.refcount_bits = options.refcount_bits;
  create.overwrite = options.overwrite;
  create.backing_file = options.backing_file;
  create.backing_format = options.backing_format;

  Result<std::unique_ptr<Image>> image = [&]() -> Result<std::unique_ptr<Image>> {
    if (!options.wrap_target_file) return Image::Create(path, create, options.target_io);
    io::FileOptions file_options;
    file_options.writable = true;
    file_options.create = true;
    file_options.exclusive = !options.overwrite;
    file_options.truncate = options.overwrite;
    file_options.direct_io = options.target_io.direct_io;
    file_options.use_io_uring = options.target_io.use_io_uring;
    ZQ_ASSIGN_OR_RETURN(std::unique_ptr<io::File> file, io::OpenFile(path, file_options));
    return qcow2::CreateImageOnFile(options.wrap_target_file(std::move(file)), create,
                                    options.target_io);
  }();
  // Someone created the file between the check and the create.
  if (!image.ok() && image.status().code() == Status::Code::kAlreadyExists) {
    return TargetExists(path);
  }
  return image;
}

}  // namespace zqcow::convert
