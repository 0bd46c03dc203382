// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/resume.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <utility>

namespace zqcow::convert {

namespace {

constexpr const char* kMagicLine = "zqcow-partial 1";
// Records are a few hundred bytes; anything much larger is not one.
constexpr size_t kMaxRecordBytes = 1 << 20;
constexpr const char* kSourcePrefix = "source.";

std::string Escape(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

bool Unescape(const std::string& value, std::string* out) {
  out->clear();
  for (size_t i = 0; i < value.size(); ++i) {
    if (value[i] != '\\') {
      *out += value[i];
      continue;
    }
    if (++i == value.size()) return false;
    if (value[i] == '\\') {
      *out += '\\';
    } else if (value[i] == 'n') {
      *out += '\n';
    } else {
      return false;
    }
  }
  return true;
}

uint64_t Nanoseconds(const struct timespec& time) {
  return static_cast<uint64_t>(time.tv_sec) * 1000000000u + static_cast<uint64_t>(time.tv_nsec);
}

const std::string* Find(const ResumeRecord& record, const std::string& key) {
  for (const auto& [k, v] : record) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::string ValueOr(const ResumeRecord& record, const std::string& key) {
  const std::string* value = Find(record, key);
  return value != nullptr ? *value : "(none)";
}

std::string StartOver(const std::string& partial) {
  return "; start over with --force (which discards " + partial + ")";
}

// Ranges of `ranges` not covered by `present` (both sorted and disjoint).
std::vector<ByteRange> Subtract(const std::vector<ByteRange>& ranges,
                                const std::vector<ByteRange>& present) {
  std::vector<ByteRange> out;
  size_t p = 0;
  for (const ByteRange& range : ranges) {
    uint64_t pos = range.offset;
    while (p < present.size() && present[p].end() <= pos) ++p;
    for (size_t q = p; q < present.size() && present[q].offset < range.end(); ++q) {
      if (present[q].offset > pos) out.push_back({pos, present[q].offset - pos});
      pos = std::max(pos, present[q].end());
    }
    if (pos < range.end()) out.push_back({pos, range.end() - pos});
  }
  return out;
}

class SkippingSource final : public ForwardingSource {
 public:
  SkippingSource(std::unique_ptr<Source> base, std::vector<ByteRange> present)
      : ForwardingSource(std::move(base)), present_(std::move(present)) {}

  Result<std::vector<ByteRange>> DataRanges(uint64_t offset, uint64_t length) override {
    ZQ_ASSIGN_OR_RETURN(std::vector<ByteRange> ranges, base().DataRanges(offset, length));
    return Subtract(ranges, present_);
  }
  // Derived from DataRanges, so the present ranges show as zero.
  Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length) override {
    return Source::Map(offset, length);
  }
  Result<std::vector<ByteRange>> DirtyRanges(uint64_t offset, uint64_t length) override {
    ZQ_ASSIGN_OR_RETURN(std::vector<ByteRange> ranges, base().DirtyRanges(offset, length));
    return Subtract(ranges, present_);
  }

 private:
  const std::vector<ByteRange> present_;
};

}  // namespace

Result<ResumeRecord> DescribeConversion(const Source& source, const ConvertOptions& options,
                                        uint64_t virtual_size) {
  ResumeRecord record = {
      {"virtual_size", std::to_string(virtual_size)},
      {"cluster_size", std::to_string(options.cluster_size)},
      {"refcount_bits", std::to_string(options.refcount_bits)},
      {"compress", options.compress ? "1" : "0"},
      {"compression_type", options.compression == Compression::kZstd ? "zstd" : "zlib"},
      {"compression_level", std::to_string(options.compression_level)},
      {"source_format", source.format()},
      {"backing_file", options.backing_file},
      {"backing_format", options.backing_file.empty() ? "" : options.backing_format},
      {"bitmap", options.bitmap},
  };
  const std::vector<std::string> files = source.files();
  // Only when set, so that records of conversions without them stay as they were.
  if (options.version != 3) record.emplace_back("version", std::to_string(options.version));
  if (!options.source_snapshot.empty()) record.emplace_back("snapshot", options.source_snapshot);
  if (!options.source_snapshot_id.empty()) {
    record.emplace_back("snapshot.id", options.source_snapshot_id);
  }
  if (!options.source_snapshot_name.empty()) {
    record.emplace_back("snapshot.name", options.source_snapshot_name);
  }
  record.emplace_back("source.files", std::to_string(files.size()));
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string prefix = kSourcePrefix + std::to_string(i) + ".";
    struct stat st {};
    if (stat(files[i].c_str(), &st) != 0) return Status::FromErrno(errno, files[i] + ": stat");
    record.emplace_back(prefix + "path", files[i]);
    if (S_ISBLK(st.st_mode)) {
      record.emplace_back(prefix + "type", "block");
      continue;
    }
    record.emplace_back(prefix + "type", "file");
    record.emplace_back(prefix + "dev", std::to_string(st.st_dev));
    record.emplace_back(prefix + "ino", std::to_string(st.st_ino));
    record.emplace_back(prefix + "size", std::to_string(st.st_size));
    record.emplace_back(prefix + "mtime_ns", std::to_string(Nanoseconds(st.st_mtim)));
    record.emplace_back(prefix + "ctime_ns", std::to_string(Nanoseconds(st.st_ctim)));
  }
  return record;
}

Status WriteResumeRecord(const std::string& path, const ResumeRecord& record) {
  std::string text = std::string(kMagicLine) + "\n";
  for (const auto& [key, value] : record) text += key + "=" + Escape(value) + "\n";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, path + ": create");
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return Status::FromErrno(err, path + ": write");
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    return Status::FromErrno(err, path + ": fsync");
  }
  if (::close(fd) != 0) return Status::FromErrno(errno, path + ": close");
  return Status::OK();
}

Result<ResumeRecord> ReadResumeRecord(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rbe");
  if (file == nullptr) return Status::FromErrno(errno, path + ": open");
  std::string text;
  char buffer[4096];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof(buffer), file)) > 0 && text.size() <= kMaxRecordBytes) {
    text.append(buffer, n);
  }
  const bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) return Status::IOError(path + ": read failed");
  auto not_a_record = [&](const std::string& why) {
    return Status::Corruption(path + ": not a zqcow resume record (" + why + ")");
  };
  if (text.size() > kMaxRecordBytes) return not_a_record("too large");
  ResumeRecord record;
  size_t pos = 0;
  bool first = true;
  while (pos < text.size()) {
    const size_t end = text.find('\n', pos);
    if (end == std::string::npos) return not_a_record("unterminated last line");
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (first) {
      if (line != kMagicLine)
        return not_a_record("first line is not '" + std::string(kMagicLine) + "'");
      first = false;
      continue;
    }
    const size_t equals = line.find('=');
    std::string value;
    if (equals == std::string::npos || !Unescape(line.substr(equals + 1), &value)) {
      return not_a_record("malformed line '" + line + "'");
    }
    record.emplace_back(line.substr(0, equals), std::move(value));
  }
  if (first) return not_a_record("empty");
  return record;
}

Status CheckResumable(const ResumeRecord& stored, const ResumeRecord& current,
                      const std::string& partial, bool source_unchanged) {
  // The source first: a changed one is the likelier mistake, and may change the size.
  const std::string files = ValueOr(current, "source.files");
  if (ValueOr(stored, "source.files") != files) {
    return Status::InvalidArgument(partial + ": cannot resume: the source reads " + files +
                                   " file(s) (with its backing chain), the interrupted "
                                   "conversion read " +
                                   ValueOr(stored, "source.files") + StartOver(partial));
  }
  for (size_t i = 0; i < std::stoul(files); ++i) {
    const std::string prefix = kSourcePrefix + std::to_string(i) + ".";
    const std::string path = ValueOr(current, prefix + "path");
    const std::string type = ValueOr(current, prefix + "type");
    if (ValueOr(stored, prefix + "type") != type) {
      return Status::InvalidArgument(partial + ": cannot resume: " + path +
                                     " is not the kind of file the interrupted conversion read (" +
                                     ValueOr(stored, prefix + "path") + ")" + StartOver(partial));
    }
    if (type == "block") {
      if (ValueOr(stored, prefix + "path") != path) {
        return Status::InvalidArgument(
            partial + ": cannot resume: the interrupted conversion read " +
            ValueOr(stored, prefix + "path") + ", not " + path + StartOver(partial));
      }
      if (!source_unchanged) {
        return Status::InvalidArgument(
            partial + ": cannot resume: " + path +
            " is a block device, and zqcow cannot tell whether it changed since the "
            "interrupted conversion; if it did not, say so with --source-unchanged" +
            StartOver(partial));
      }
      continue;
    }
    if (ValueOr(stored, prefix + "dev") != ValueOr(current, prefix + "dev") ||
        ValueOr(stored, prefix + "ino") != ValueOr(current, prefix + "ino")) {
      return Status::InvalidArgument(partial + ": cannot resume: " + path +
                                     " is not the file the interrupted conversion read (" +
                                     ValueOr(stored, prefix + "path") + ")" + StartOver(partial));
    }
    for (const char* field : {"size", "mtime_ns", "ctime_ns"}) {
      if (ValueOr(stored, prefix + field) != ValueOr(current, prefix + field)) {
        const std::string what = std::string(field) == "size"       ? "its size"
                                 : std::string(field) == "mtime_ns" ? "its modification time"
                                                                    : "its inode change time";
        return Status::InvalidArgument(partial + ": cannot resume: " + path +
                                       " changed since the interrupted conversion (" + what +
                                       " differs)" + StartOver(partial));
      }
    }
  }
  // Then the options: they say what the image is.
  for (const auto& [key, value] : current) {
    if (key.rfind(kSourcePrefix, 0) == 0) continue;
    const std::string before = ValueOr(stored, key);
    if (before != value) {
      return Status::InvalidArgument(partial + ": cannot resume: " + key + " is '" + value +
                                     "' but the interrupted conversion used '" + before +
                                     "'; resume with the same options" + StartOver(partial));
    }
  }
  return Status::OK();
}

std::unique_ptr<Source> SkipPresentRanges(std::unique_ptr<Source> source,
                                          std::vector<ByteRange> present) {
  return std::make_unique<SkippingSource>(std::move(source), std::move(present));
}

}  // namespace zqcow::convert
