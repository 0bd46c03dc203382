// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/target.h"

#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "io/file.h"
#include "qcow2/qcow2_image.h"

namespace zqcow::convert {

namespace {

constexpr const char* kPartialSuffix = ".zqcow-partial";
constexpr const char* kRecordSuffix = ".info";

Status TargetExists(const std::string& path) {
  return Status::AlreadyExists(path + ": target exists (use --force to overwrite)");
}

bool Exists(const std::string& path) {
  struct stat st {};
  return lstat(path.c_str(), &st) == 0;
}

Status RemoveFile(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return Status::FromErrno(errno, path + ": remove");
  }
  return Status::OK();
}

std::string DirectoryOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Makes the names created, removed or renamed in `path`'s directory durable.
Status SyncDirectoryOf(const std::string& path) {
  const std::string directory = DirectoryOf(path);
  const int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, directory + ": open directory");
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return Status::FromErrno(err, directory + ": fsync directory");
  return Status::OK();
}

// The guest ranges `image` holds data for (normal or compressed clusters).
Result<std::vector<ByteRange>> PresentRanges(Image& image) {
  ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> extents, image.Map(0, image.virtual_size()));
  std::vector<ByteRange> present;
  for (const MapExtent& extent : extents) {
    if (extent.kind != MapExtent::Kind::kData && extent.kind != MapExtent::Kind::kCompressed) {
      continue;
    }
    if (!present.empty() && present.back().end() == extent.guest_offset) {
      present.back().length += extent.length;
    } else {
      present.push_back({extent.guest_offset, extent.length});
    }
  }
  return present;
}

// Whether `path` lacks even the qcow2 magic: a partial image killed before its header was
// written, which holds no work.
bool HoldsNoImage(const std::string& path) {
  uint8_t magic[4] = {};
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const ssize_t got = ::pread(fd, magic, sizeof(magic), 0);
  ::close(fd);
  static constexpr uint8_t kQcow2Magic[4] = {'Q', 'F', 'I', 0xfb};
  return got != static_cast<ssize_t>(sizeof(magic)) ||
         std::memcmp(magic, kQcow2Magic, sizeof(magic)) != 0;
}

// `replace_partial`: remove a partial image already there (else refuse it).
Result<PartialTarget> CreatePartial(const TargetPaths& paths, const ConvertOptions& options,
                                    const ResumeRecord& record, uint64_t virtual_size,
                                    bool replace_partial) {
  if (Exists(paths.partial)) {
    if (!replace_partial) {
      return Status::AlreadyExists(paths.partial + ": an interrupted conversion to " +
                                   paths.target +
                                   " left this partial image; continue it with --resume, or "
                                   "start over with --force (or remove it)");
    }
    // Never from under a conversion that is still writing it (QEMU's image locks).
    ZQ_RETURN_IF_ERROR(io::CheckNotInUse(paths.partial));
    ZQ_RETURN_IF_ERROR(RemoveFile(paths.partial));
  }
  // Without its partial image a record is stale (a crash before the image was created, or
  // after the rename).
  ZQ_RETURN_IF_ERROR(RemoveFile(paths.record));
  ZQ_RETURN_IF_ERROR(WriteResumeRecord(paths.record, record));
  ConvertOptions create = options;
  create.overwrite = false;  // created exclusively: a second conversion to DST fails here
  Result<std::unique_ptr<Image>> image = CreateTarget(paths.partial, create, virtual_size);
  Status synced = image.ok() ? SyncDirectoryOf(paths.partial) : Status::OK();
  if (!image.ok() || !synced.ok()) {
    if (image.ok()) (void)(*image)->CloseIncomplete();
    if (image.ok() || image.status().code() != Status::Code::kAlreadyExists) {
      (void)RemoveFile(paths.partial);
      (void)RemoveFile(paths.record);
    }
    return image.ok() ? synced : image.status();
  }
  return PartialTarget{std::move(image).value(), {}};
}

Result<PartialTarget> ReopenPartial(const TargetPaths& paths, const ConvertOptions& options,
                                    const ResumeRecord& record, uint64_t virtual_size) {
  if (!Exists(paths.record)) {
    return Status::InvalidArgument(paths.partial + ": cannot resume: its record " + paths.record +
                                   " is missing, so nothing says what it was converted from; "
                                   "start over with --force (which discards it)");
  }
  ZQ_ASSIGN_OR_RETURN(ResumeRecord stored, ReadResumeRecord(paths.record));
  ZQ_RETURN_IF_ERROR(CheckResumable(stored, record, paths.partial, options.source_unchanged));
  Result<uint64_t> repaired = qcow2::RepairLeaks(paths.partial);
  if (!repaired.ok()) {
    return repaired.status().WithPrefix(paths.partial + ": cannot resume");
  }
  OpenOptions open;
  open.writable = true;
  open.io = options.target_io;
  ZQ_ASSIGN_OR_RETURN(std::unique_ptr<Image> image, Image::Open(paths.partial, open));
  const ImageInfo info = image->Info();
  if (info.virtual_size != virtual_size || info.cluster_size != options.cluster_size ||
      info.compression != options.compression || info.refcount_bits != options.refcount_bits) {
    (void)image->CloseIncomplete();
    return Status::InvalidArgument(paths.partial +
                                   ": cannot resume: the image's size, cluster size, "
                                   "compression or refcount width differs from its record; "
                                   "start over with --force (which discards it)");
  }
  Result<std::vector<ByteRange>> present = PresentRanges(*image);
  if (!present.ok()) {
    (void)image->CloseIncomplete();
    return present.status();
  }
  return PartialTarget{std::move(image), std::move(present).value()};
}

}  // namespace

std::string ResolveTarget(const std::string& path) {
  // A dangling link is followed too (as open(O_CREAT) follows it: qemu-img creates the
  // file it names), link by link, at most as deep as the kernel would follow.
  constexpr int kMaxLinks = 40;
  std::string current = path;
  for (int depth = 0; depth < kMaxLinks; ++depth) {
    struct stat st {};
    if (lstat(current.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) return current;
    char resolved[PATH_MAX];
    if (::realpath(current.c_str(), resolved) != nullptr) return resolved;
    const ssize_t n = ::readlink(current.c_str(), resolved, sizeof(resolved) - 1);
    if (n <= 0) return current;
    std::string next(resolved, static_cast<size_t>(n));
    if (next[0] != '/') {
      const size_t slash = current.rfind('/');
      if (slash != std::string::npos) next = current.substr(0, slash + 1) + next;
    }
    current = next;
  }
  return current;
}

TargetPaths TargetFiles(const std::string& path) {
  TargetPaths paths;
  paths.target = ResolveTarget(path);
  paths.partial = paths.target + kPartialSuffix;
  paths.record = paths.partial + kRecordSuffix;
  return paths;
}

Result<TargetPaths> PlanTarget(const std::string& path, const ConvertOptions& options) {
  TargetPaths paths = TargetFiles(path);
  struct stat st {};
  if (stat(paths.target.c_str(), &st) == 0) {
    if (!S_ISREG(st.st_mode)) {
      return Status::NotSupported(path + ": not a regular file (images are created as files)");
    }
    if (!options.overwrite) return TargetExists(path);
    // --force never replaces an image another process holds (QEMU's image locks).
    ZQ_RETURN_IF_ERROR(io::CheckNotInUse(paths.target));
  }
  return paths;
}

Result<PartialTarget> OpenPartialTarget(const TargetPaths& paths, const ConvertOptions& options,
                                        const ResumeRecord& record, uint64_t virtual_size) {
  if (options.resume && Exists(paths.partial)) {
    // Nothing to resume in a file that never got its header: start anew.
    if (HoldsNoImage(paths.partial))
      return CreatePartial(paths, options, record, virtual_size, true);
    return ReopenPartial(paths, options, record, virtual_size);
  }
  return CreatePartial(paths, options, record, virtual_size, options.overwrite);
}

Status CommitTarget(const TargetPaths& paths) {
  // Checked again at the last moment: a process may have opened DST since the start.
  if (Exists(paths.target)) ZQ_RETURN_IF_ERROR(io::CheckNotInUse(paths.target));
  if (::rename(paths.partial.c_str(), paths.target.c_str()) != 0) {
    return Status::IOError(paths.target + ": cannot rename the finished image " + paths.partial +
                               " into place: " + std::strerror(errno) +
                               " (the complete image stays at " + paths.partial + ")",
                           errno);
  }
  ZQ_RETURN_IF_ERROR(SyncDirectoryOf(paths.target));
  // A record left behind (a crash here) is stale: the next conversion replaces it.
  (void)RemoveFile(paths.record);
  return Status::OK();
}

Result<std::unique_ptr<Image>> CreateTarget(const std::string& path, const ConvertOptions& options,
                                            uint64_t virtual_size) {
  struct stat st {};
  if (!options.overwrite && lstat(path.c_str(), &st) == 0) return TargetExists(path);
  // --force must not replace an image another process (qemu, a VM, another zqcow) holds.
  if (options.overwrite) ZQ_RETURN_IF_ERROR(io::CheckNotInUse(path));

  CreateOptions create;
  create.virtual_size = virtual_size;
  create.cluster_size = options.cluster_size;
  create.compression = options.compression;
  create.refcount_bits = options.refcount_bits;
  create.version = options.version;
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
    file_options.sync_writes = options.target_io.sync_writes;
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
