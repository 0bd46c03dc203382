// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "qcow2/cluster_io.h"

#include <utility>

namespace zqcow::qcow2 {

Result<io::AlignedBuffer> ReadTable(io::File* file, uint64_t offset, size_t length) {
  io::AlignedBuffer buffer(length);
  ZQ_ASSIGN_OR_RETURN(size_t got, file->ReadAt(offset, buffer.data(), length));
  (void)got;  // a short read already left zeros behind
  return buffer;
}

Status WriteTable(io::File* file, uint64_t offset, const io::AlignedBuffer& data) {
  return file->WriteAt(offset, data.data(), data.size());
}

}  // namespace zqcow::qcow2
