// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Image format detection, as qemu-img does it: from the first bytes of a file (and, for dmg,
// its name). zqcow reads raw and qcow2; every other format qemu-img recognises is named so
// that it can be refused clearly instead of being read as raw bytes (a vmdk descriptor, a vdi
// container...). No I/O here: the callers read the bytes.
//
// What each format is recognised by (QEMU's block drivers' probes, 512-byte probe buffer,
// zeros past the end of the file; an empty file is raw):
//   qcow2      "QFI\xfb", big-endian version >= 2 at offset 4
//   qcow       "QFI\xfb", version 1 (the original qcow format)
//   vmdk       "KDMV" (sparse) or "COWD" (VMware 3 / ESX) at offset 0, or a text descriptor:
//              comment lines ("#...") and blank lines (spaces only), then "version=1|2|3"
//              ending the line ("\n" or "\r\n")
//   vdi        little-endian 0xbeda107f at offset 64
//   vhdx       "vhdxfile" at offset 0
//   vpc        "conectix" at offset 0 (a dynamic VHD; a fixed one has its footer only at the
//              end of the file and QEMU detects it as raw too)
//   qed        "QED\0" at offset 0
//   luks       "LUKS\xba\xbe", big-endian version 1 at offset 6
//   parallels  "WithoutFreeSpace" or "WithouFreSpacExt", little-endian version 2 at offset 16
//   bochs      "Bochs Virtual HD Image", type "Redolog", subtype "Undoable", "Volatile" or
//              "Growing" (NUL-terminated fields of 32, 16, 16 bytes), version 1.0 or 2.0
//   cloop      the "#!/bin/sh\n#V2.0 Format\nmodprobe cloop ..." script header
//   dmg        a file name ending in ".dmg" (weakest: any format above wins over it)
//   raw        nothing of the above

#ifndef ZQCOW_FORMAT_PROBE_H_
#define ZQCOW_FORMAT_PROBE_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "zqcow/status.h"

namespace zqcow::format {

// How many bytes from the start of a file the probe looks at (QEMU's probe buffer). Fewer
// may be given when the file is shorter; the rest counts as zeros.
inline constexpr size_t kProbeBytes = 512;

inline constexpr std::string_view kFormatRaw = "raw";
inline constexpr std::string_view kFormatQcow2 = "qcow2";

// The format qemu-img would detect for a file of `file_size` bytes named `file_name` whose
// first bytes are `head` (at most kProbeBytes are looked at): "qcow2", "qcow", "vmdk",
// "vdi", "vhdx", "vpc", "qed", "luks", "parallels", "bochs", "cloop", "dmg" or "raw".
std::string_view ProbeImageFormat(std::span<const uint8_t> head, uint64_t file_size,
                                  std::string_view file_name);

// Whether zqcow reads images of `format` (raw and qcow2).
bool IsReadableFormat(std::string_view format);

// OK when zqcow reads `format`; otherwise kNotSupported, one line:
// "<subject>: image format 'vmdk' is not supported (zqcow reads raw and qcow2)".
// `subject` names the file (a path, or "IMAGE: backing file 'NAME'").
Status CheckReadableFormat(std::string_view subject, std::string_view format);

}  // namespace zqcow::format

#endif  // ZQCOW_FORMAT_PROBE_H_
