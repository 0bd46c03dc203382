// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/probe.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <utility>

#include "format/endian.h"

namespace zqcow::format {

namespace {

using Buffer = std::array<uint8_t, kProbeBytes>;

uint32_t LoadLE32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

bool StartsWith(const Buffer& b, size_t offset, std::string_view text) {
  return offset + text.size() <= b.size() &&
         std::memcmp(b.data() + offset, text.data(), text.size()) == 0;
}

// A NUL-terminated string field at `offset` that equals `text`.
bool FieldIs(const Buffer& b, size_t offset, std::string_view text) {
  return StartsWith(b, offset, text) && offset + text.size() < b.size() &&
         b[offset + text.size()] == 0;
}

constexpr std::string_view kQcowMagic{"QFI\xfb", 4};
constexpr uint32_t kQcowVersion1 = 1;
constexpr uint32_t kQcow2MinVersion = 2;

bool IsVmdkDescriptor(const Buffer& b) {
  // Comment lines and blank lines (spaces only) may come first; the first other line must
  // be the descriptor's version line.
  size_t p = 0;
  const size_t end = b.size();
  while (p < end) {
    if (b[p] == '#') {
      while (p < end && b[p] != '\n') ++p;
      ++p;
      continue;
    }
    if (b[p] == ' ') {
      while (p < end && b[p] == ' ') ++p;
      if (p < end && b[p] == '\r') ++p;
      if (p == end || b[p] != '\n') return false;
      ++p;
      continue;
    }
    for (std::string_view line : {"version=1\n", "version=2\n", "version=3\n", "version=1\r\n",
                                  "version=2\r\n", "version=3\r\n"}) {
      if (StartsWith(b, p, line)) return true;
    }
    return false;
  }
  return false;
}

bool IsBochs(const Buffer& b) {
  constexpr size_t kType = 32, kSubtype = 48, kVersion = 64;
  constexpr uint32_t kVersion1 = 0x00010000, kVersion2 = 0x00020000;
  const uint32_t version = LoadLE32(b.data() + kVersion);
  return FieldIs(b, 0, "Bochs Virtual HD Image") && FieldIs(b, kType, "Redolog") &&
         (FieldIs(b, kSubtype, "Undoable") || FieldIs(b, kSubtype, "Volatile") ||
          FieldIs(b, kSubtype, "Growing")) &&
         (version == kVersion1 || version == kVersion2);
}

}  // namespace

std::string_view ProbeImageFormat(std::span<const uint8_t> head, uint64_t file_size,
                                  std::string_view file_name) {
  if (file_size == 0) return kFormatRaw;  // QEMU: an empty file is raw, whatever its name
  Buffer b{};
  const size_t n = std::min(head.size(), b.size());
  if (n > 0) std::memcpy(b.data(), head.data(), n);

  if (StartsWith(b, 0, kQcowMagic)) {
    const uint32_t version = LoadBE32(b.data() + 4);
    if (version >= kQcow2MinVersion) return kFormatQcow2;
    if (version == kQcowVersion1) return "qcow";
  }
  if (StartsWith(b, 0, "KDMV") || StartsWith(b, 0, "COWD") || IsVmdkDescriptor(b)) return "vmdk";
  constexpr size_t kVdiSignatureOffset = 64;
  constexpr uint32_t kVdiSignature = 0xbeda107f;
  if (LoadLE32(b.data() + kVdiSignatureOffset) == kVdiSignature) return "vdi";
  if (StartsWith(b, 0, "vhdxfile")) return "vhdx";
  if (StartsWith(b, 0, "conectix")) return "vpc";
  if (StartsWith(b, 0, std::string_view("QED\0", 4))) return "qed";
  constexpr uint16_t kLuksVersion = 1;
  if (StartsWith(b, 0, "LUKS\xba\xbe") && LoadBE16(b.data() + 6) == kLuksVersion) return "luks";
  constexpr size_t kParallelsVersionOffset = 16;
  constexpr uint32_t kParallelsVersion = 2;
  if ((StartsWith(b, 0, "WithoutFreeSpace") || StartsWith(b, 0, "WithouFreSpacExt")) &&
      LoadLE32(b.data() + kParallelsVersionOffset) == kParallelsVersion) {
    return "parallels";
  }
  if (IsBochs(b)) return "bochs";
  // The weak ones (QEMU scores them below the magic numbers above, above raw).
  if (StartsWith(b, 0,
                 "#!/bin/sh\n#V2.0 Format\n"
                 "modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")) {
    return "cloop";
  }
  constexpr std::string_view kDmgSuffix = ".dmg";
  if (file_name.size() > kDmgSuffix.size() && file_name.ends_with(kDmgSuffix)) return "dmg";
  return kFormatRaw;
}

bool IsReadableFormat(std::string_view format) {
  return format == kFormatRaw || format == kFormatQcow2;
}

Status CheckReadableFormat(std::string_view subject, std::string_view format) {
  if (IsReadableFormat(format)) return Status::OK();
  std::string message(subject);
  message += ": image format '";
  message += format;
  message += "'";
  if (format == "qcow") message += " (qcow version 1)";
  message += " is not supported (zqcow reads raw and qcow2)";
  return Status::NotSupported(std::move(message));
}

}  // namespace zqcow::format
