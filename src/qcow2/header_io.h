// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Reading an image's header straight from its file, for the tools that look at metadata
// without opening the image (check, info): open, read the header, read at offsets.

#ifndef ZQCOW_QCOW2_HEADER_IO_H_
#define ZQCOW_QCOW2_HEADER_IO_H_

#include <cstdint>
#include <memory>
#include <string>

#include "format/header.h"
#include "format/snapshot.h"
#include "io/file.h"
#include "zqcow/status.h"

namespace zqcow::qcow2 {

// Opens `path` read only, with QEMU's shared read lock unless force_share (-U).
Result<std::unique_ptr<io::File>> OpenForReading(const std::string& path, bool force_share);

Status ReadExact(io::File* file, uint64_t offset, void* buffer, size_t length);

// `file` as format/'s ReadAtFunction.
format::ReadAtFunction ReaderOf(io::File* file);

// Reads and parses the header (errors prefixed with the path). refcount_table_may_pass_eof
// as for format::ParseHeader.
Result<format::Header> ReadHeader(io::File* file, uint64_t file_size,
                                  bool refcount_table_may_pass_eof = false);

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_HEADER_IO_H_
