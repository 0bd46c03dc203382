// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Whole-cluster metadata I/O. Tables are read and written as whole clusters from
// AlignedBuffers, so they satisfy O_DIRECT as long as the cluster size is a multiple of
// the file's alignment (the image refuses O_DIRECT otherwise).

#ifndef ZQCOW_QCOW2_CLUSTER_IO_H_
#define ZQCOW_QCOW2_CLUSTER_IO_H_

#include <cstdint>
#include <cstdio>
#include <string>

#include "io/aligned_buffer.h"
#include "io/file.h"
#include "zqcow/status.h"

namespace zqcow::qcow2 {

// Reads `length` bytes (a multiple of the cluster size) at `offset` into a new buffer.
// Bytes past end of file read as zeros.
Result<io::AlignedBuffer> ReadTable(io::File* file, uint64_t offset, size_t length);
Status WriteTable(io::File* file, uint64_t offset, const io::AlignedBuffer& data);

// "0x1f000": how error messages show host offsets.
inline std::string Hex(uint64_t value) {
  char buf[24];
  snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(value));
  return buf;
}

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_CLUSTER_IO_H_
