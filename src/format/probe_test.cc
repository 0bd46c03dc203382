// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "format/probe.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "format/endian.h"

namespace zqcow::format {
namespace {

// The first bytes of a file: `text` at offset 0, zeros up to `size`.
std::vector<uint8_t> Head(std::string_view text, size_t size = kProbeBytes) {
  std::vector<uint8_t> head(std::max(size, text.size()), 0);
  std::memcpy(head.data(), text.data(), text.size());
  return head;
}

std::string_view Probe(const std::vector<uint8_t>& head, std::string_view name = "disk.img") {
  return ProbeImageFormat(head, 1 << 20, name);
}

void PutLE32(std::vector<uint8_t>& b, size_t offset, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[offset + i] = static_cast<uint8_t>(v >> (8 * i));
}

std::vector<uint8_t> QcowHead(uint32_t version) {
  std::vector<uint8_t> head = Head(std::string_view("QFI\xfb", 4));
  StoreBE32(head.data() + 4, version);
  return head;
}

TEST(ProbeTest, Qcow2AndQcowByVersion) {
  EXPECT_EQ(Probe(QcowHead(2)), "qcow2");
  EXPECT_EQ(Probe(QcowHead(3)), "qcow2");
  EXPECT_EQ(Probe(QcowHead(4)), "qcow2");  // qcow2, of a version the parser refuses
  EXPECT_EQ(Probe(QcowHead(1)), "qcow");
  EXPECT_EQ(Probe(QcowHead(0)), "raw");  // neither driver claims it: QEMU reads it as raw
}

TEST(ProbeTest, EmptyAndShortFiles) {
  EXPECT_EQ(ProbeImageFormat(QcowHead(3), 0, "x"), "raw");  // an empty file is raw
  EXPECT_EQ(ProbeImageFormat({}, 0, "x.dmg"), "raw");
  EXPECT_EQ(ProbeImageFormat({}, 100, "x"), "raw");
  const std::vector<uint8_t> magic_only = {'Q', 'F', 'I', 0xfb};
  EXPECT_EQ(ProbeImageFormat(magic_only, 4, "x"), "raw");  // version reads as 0
  const std::vector<uint8_t> kdmv = {'K', 'D', 'M', 'V'};
  EXPECT_EQ(ProbeImageFormat(kdmv, 4, "x"), "vmdk");
  // Bytes past the probe buffer are not looked at.
  std::vector<uint8_t> late(4096, 0);
  std::memcpy(late.data() + kProbeBytes, "vhdxfile", 8);
  EXPECT_EQ(ProbeImageFormat(late, late.size(), "x"), "raw");
}

TEST(ProbeTest, VmdkMagicsAndDescriptors) {
  EXPECT_EQ(Probe(Head("KDMV")), "vmdk");
  EXPECT_EQ(Probe(Head("COWD")), "vmdk");
  EXPECT_EQ(Probe(Head("# Disk DescriptorFile\nversion=1\nCID=fffffffe\n")), "vmdk");
  EXPECT_EQ(Probe(Head("# Disk DescriptorFile\r\nversion=2\r\n")), "vmdk");
  EXPECT_EQ(Probe(Head("#\n# comment\n    \n  \r\nversion=3\n")), "vmdk");
  EXPECT_EQ(Probe(Head("version=1\n")), "vmdk");
  EXPECT_EQ(Probe(Head("version=4\n")), "raw");
  EXPECT_EQ(Probe(Head("version=1 \n")), "raw");
  EXPECT_EQ(Probe(Head("\nversion=1\n")), "raw");  // an empty line is not a blank line
  EXPECT_EQ(Probe(Head("  x\nversion=1\n")), "raw");
  EXPECT_EQ(Probe(Head("createType=\"monolithicFlat\"\nversion=1\n")), "raw");
  // "version=1" cut by the end of the probe buffer has no line end.
  std::string padded(kProbeBytes - 9, ' ');
  padded[padded.size() - 1] = '\n';
  EXPECT_EQ(Probe(Head(padded + "version=1", kProbeBytes)), "raw");
  EXPECT_EQ(Probe(Head(padded.substr(1) + "version=1\n", kProbeBytes)), "vmdk");
}

TEST(ProbeTest, OtherMagics) {
  std::vector<uint8_t> vdi = Head("<<< QEMU VM Virtual Disk Image >>>\n");
  PutLE32(vdi, 64, 0xbeda107f);
  EXPECT_EQ(Probe(vdi), "vdi");
  PutLE32(vdi, 64, 0xbeda1070);
  EXPECT_EQ(Probe(vdi), "raw");

  EXPECT_EQ(Probe(Head("vhdxfile")), "vhdx");
  EXPECT_EQ(Probe(Head("vhdxfil")), "raw");
  EXPECT_EQ(Probe(Head("conectix")), "vpc");
  EXPECT_EQ(Probe(Head(std::string_view("QED\0", 4))), "qed");
  EXPECT_EQ(Probe(Head("QEDx")), "raw");

  std::vector<uint8_t> luks = Head("LUKS\xba\xbe");
  StoreBE16(luks.data() + 6, 1);
  EXPECT_EQ(Probe(luks), "luks");
  StoreBE16(luks.data() + 6, 2);  // LUKS2: QEMU 7.2 does not recognise it
  EXPECT_EQ(Probe(luks), "raw");

  for (std::string_view magic : {"WithoutFreeSpace", "WithouFreSpacExt"}) {
    std::vector<uint8_t> parallels = Head(magic);
    PutLE32(parallels, 16, 2);
    EXPECT_EQ(Probe(parallels), "parallels") << magic;
    PutLE32(parallels, 16, 3);
    EXPECT_EQ(Probe(parallels), "raw") << magic;
  }

  std::vector<uint8_t> bochs = Head("Bochs Virtual HD Image");
  std::memcpy(bochs.data() + 32, "Redolog", 7);
  std::memcpy(bochs.data() + 48, "Growing", 7);
  PutLE32(bochs, 64, 0x00020000);
  EXPECT_EQ(Probe(bochs), "bochs");
  PutLE32(bochs, 64, 0x00010000);
  EXPECT_EQ(Probe(bochs), "bochs");
  PutLE32(bochs, 64, 0x00030000);
  EXPECT_EQ(Probe(bochs), "raw");
  PutLE32(bochs, 64, 0x00020000);
  bochs[48 + 7] = 'X';  // "GrowingX": the field must end after the name
  EXPECT_EQ(Probe(bochs), "raw");

  EXPECT_EQ(Probe(Head("#!/bin/sh\n#V2.0 Format\n"
                       "modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")),
            "cloop");
  EXPECT_EQ(Probe(Head("#!/bin/sh\n")), "raw");
}

TEST(ProbeTest, DmgByNameOnlyAndWeakest) {
  const std::vector<uint8_t> zeros = Head("");
  EXPECT_EQ(Probe(zeros, "/images/mac.dmg"), "dmg");
  EXPECT_EQ(Probe(zeros, ".dmg"), "raw");  // QEMU wants more than the suffix
  EXPECT_EQ(Probe(zeros, "mac.dmg.raw"), "raw");
  EXPECT_EQ(Probe(QcowHead(3), "disk.dmg"), "qcow2");
  EXPECT_EQ(Probe(zeros), "raw");
}

TEST(ProbeTest, ReadableFormats) {
  EXPECT_TRUE(IsReadableFormat("raw"));
  EXPECT_TRUE(IsReadableFormat("qcow2"));
  EXPECT_FALSE(IsReadableFormat("qcow"));
  EXPECT_FALSE(IsReadableFormat("vmdk"));
  EXPECT_TRUE(CheckReadableFormat("/d/a.img", "raw").ok());
  EXPECT_TRUE(CheckReadableFormat("/d/a.img", "qcow2").ok());

  Status vmdk = CheckReadableFormat("/d/flat.vmdk", "vmdk");
  EXPECT_EQ(vmdk.code(), Status::Code::kNotSupported);
  EXPECT_EQ(vmdk.message(),
            "/d/flat.vmdk: image format 'vmdk' is not supported (zqcow reads raw and qcow2)");
  Status qcow = CheckReadableFormat("/d/old.img", "qcow");
  EXPECT_EQ(qcow.code(), Status::Code::kNotSupported);
  EXPECT_NE(qcow.message().find("'qcow' (qcow version 1) is not supported"), std::string::npos)
      << qcow.message();
}

}  // namespace
}  // namespace zqcow::format
