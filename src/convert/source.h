// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// What the pipeline and the read-only tools (info, map, compare) read from: a raw file or
// block device, a qcow2 image (with its backing chain) or an NBD export, seen as a flat
// range of guest bytes that can tell which parts may hold data (so holes, unallocated and
// zero ranges are skipped without being read).

#ifndef ZQCOW_CONVERT_SOURCE_H_
#define ZQCOW_CONVERT_SOURCE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "io/file.h"
#include "zqcow/image.h"
#include "zqcow/status.h"

namespace zqcow::convert {

// A half-open byte range [offset, offset + length).
struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t end() const { return offset + length; }
};

// Threading: DataRanges and Read are called from one thread (the pipeline's reader), except
// that Read may be called from several at once when parallel_reads() is true.
class Source {
 public:
  virtual ~Source() = default;

  virtual const std::string& path() const = 0;
  // "raw" or "qcow2". An NBD export is "raw" (its bytes are the guest's, as qemu-img says).
  virtual const char* format() const = 0;
  // Guest bytes the source holds (file or device size; qcow2 virtual size).
  virtual uint64_t size() const = 0;
  // Offset, length and buffer address of every read must be multiples of this (1 when
  // there is no constraint; the logical block size for O_DIRECT).
  virtual size_t read_alignment() const = 0;

  // The parts of [offset, offset + length) that may hold non-zero bytes: sorted, disjoint,
  // inside the asked range. Everything outside them reads as zeros.
  virtual Result<std::vector<ByteRange>> DataRanges(uint64_t offset, uint64_t length) = 0;

  // How [offset, offset + length) is stored, as `map` shows it: sorted, contiguous extents
  // covering the range. REQUIRES: offset + length <= size(). The default, for sources
  // without layers (raw files, NBD exports), derives it from DataRanges: data ranges are
  // kData, the rest kZero, each with host_offset = guest offset.
  virtual Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length);

  // Reads every request (submitted together where the file layer can). Bytes at or past
  // size() read as zeros. REQUIRES: requests aligned to read_alignment().
  virtual Status Read(std::span<const io::IoRequest> requests) = 0;

  // True when Read may be called from several threads at once and costs CPU (a qcow2
  // source decompresses): the pipeline then lets its workers read clusters themselves
  // instead of the single reader thread. False (the default) = only the reader reads.
  // REQUIRES when true: read_alignment() == 1 (workers read single clusters).
  virtual bool parallel_reads() const { return false; }

  // The parts of [offset, offset + length) that the dirty bitmap the source was opened with
  // (SourceOptions::bitmap) marks as changed since its checkpoint: sorted, disjoint, inside
  // the asked range. Everything outside them is unchanged since that checkpoint.
  // kNotSupported when the source was opened without a bitmap or has no such thing.
  virtual Result<std::vector<ByteRange>> DirtyRanges(uint64_t offset, uint64_t length) {
    (void)offset;
    (void)length;
    return Status::NotSupported(path() + ": no dirty bitmap to read changes from");
  }

  // Every file the source reads: its own and, for a qcow2 image, its backing chain's. None
  // for an NBD export.
  virtual std::vector<std::string> files() const { return {path()}; }

  // Releases the file or image; reports errors the close finds. Idempotent.
  virtual Status Close() = 0;
};

// A Source that forwards everything to `base`: the base of wrappers that change a part
// (SalvageReadErrors, LimitReadRate, SkipPresentRanges).
class ForwardingSource : public Source {
 public:
  explicit ForwardingSource(std::unique_ptr<Source> base) : base_(std::move(base)) {}
  const std::string& path() const override { return base_->path(); }
  const char* format() const override { return base_->format(); }
  uint64_t size() const override { return base_->size(); }
  size_t read_alignment() const override { return base_->read_alignment(); }
  Result<std::vector<ByteRange>> DataRanges(uint64_t offset, uint64_t length) override {
    return base_->DataRanges(offset, length);
  }
  Result<std::vector<MapExtent>> Map(uint64_t offset, uint64_t length) override {
    return base_->Map(offset, length);
  }
  Status Read(std::span<const io::IoRequest> requests) override { return base_->Read(requests); }
  bool parallel_reads() const override { return base_->parallel_reads(); }
  Result<std::vector<ByteRange>> DirtyRanges(uint64_t offset, uint64_t length) override {
    return base_->DirtyRanges(offset, length);
  }
  std::vector<std::string> files() const override { return base_->files(); }
  Status Close() override { return base_->Close(); }

 protected:
  Source& base() { return *base_; }

 private:
  std::unique_ptr<Source> base_;
};

struct SourceOptions {
  std::string format;       // "raw", "qcow2", or "" to detect
  bool direct_io = false;   // O_DIRECT (-T none)
  bool force_share = false; // -U: read without taking QEMU's image locks
  std::string bitmap;       // dirty bitmap to serve DirtyRanges from; "" for none
  // An internal snapshot of a qcow2 source to read instead of its active state (see
  // OpenOptions::snapshot in zqcow/image.h); a raw or NBD source with one is
  // kInvalidArgument.
  std::string snapshot;       // id or name (-s)
  std::string snapshot_id;    // -l snapshot.id=
  std::string snapshot_name;  // -l snapshot.name=
  bool has_snapshot() const {
    return !snapshot.empty() || !snapshot_id.empty() || !snapshot_name.empty();
  }
};

// Opens `path` as options.format: "raw", "qcow2", or "" to detect as qemu-img does
// (format/probe.h). With direct_io the file is opened with O_DIRECT.
// An NBD URI (IsNbdUri) opens the export through libnbd, read as raw.
// Errors: kNotFound for a missing file; kInvalidArgument for an unknown format or when
// "qcow2" is asked for a file that is not one; kNotSupported for a file of another format
// qemu-img recognises (vmdk, vdi, ...) unless "raw" is asked; each names the file.
Result<std::unique_ptr<Source>> OpenSource(const std::string& path, const SourceOptions& options);

// Whether `path` is an NBD URI: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH,
// and the TLS (nbds...) and vsock forms libnbd knows.
bool IsNbdUri(const std::string& path);

// The two kinds, for callers that know what they have. MakeRawSource takes an opened file
// and its size.
std::unique_ptr<Source> MakeRawSource(std::unique_ptr<io::File> file, uint64_t size);
Result<std::unique_ptr<Source>> OpenQcow2Source(const std::string& path,
                                                const SourceOptions& options);
// An NBD export read through libnbd (src/convert/nbd_source.cc). options.bitmap asks for
// the meta context qemu:dirty-bitmap:NAME, which DirtyRanges then reads.
Result<std::unique_ptr<Source>> OpenNbdSource(const std::string& uri, const SourceOptions& options);

// Counters of a source wrapped by SalvageReadErrors, read once the conversion is over.
struct SalvageCounters {
  std::atomic<uint64_t> errors{0};  // unreadable ranges (adjacent failed pieces are one)
  std::atomic<uint64_t> bytes{0};   // bytes that could not be read and were zeroed
};

// `source`, whose reads never fail: a request that fails is read again in pieces of
// max(512, read_alignment()) bytes; a piece that still fails reads as zeros and is counted
// in `counters` (qemu-img convert --salvage). REQUIRES: counters outlive the source.
std::unique_ptr<Source> SalvageReadErrors(std::unique_ptr<Source> source,
                                          SalvageCounters* counters);

// `source`, whose reads take at most `bytes_per_second` on average (qemu-img convert -r):
// a token bucket shared by every reading thread, so parallel reads (and the compression
// that follows them) go on while the limit holds. The bucket holds at most one second of
// reads; a request larger than that waits until the bucket has been empty long enough.
// While `cancel` (may be null) becomes true, a waiting read returns kInterrupted.
std::unique_ptr<Source> LimitReadRate(std::unique_ptr<Source> source, uint64_t bytes_per_second,
                                      const std::atomic<bool>* cancel = nullptr);

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_SOURCE_H_
