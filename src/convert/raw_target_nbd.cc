// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// An NBD export as a raw target, through libnbd: writes with nbd_pwrite, zero ranges with
// nbd_zero (fast-zero first where the server advertises it), spread over several
// connections when the server advertises multi-conn (each connection serves one request
// at a time from the synchronous calls; the workers take them in turn).

#include <libnbd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <string_view>
#include <utility>
#include <vector>

#include "convert/nbd_handle.h"
#include "convert/raw_target.h"

namespace zqcow::convert {

const uint8_t* ZeroBlock();
uint64_t ZeroBlockSize();

namespace {

constexpr size_t kMaxConnections = 4;
// Zero requests are cut into pieces of at most this (the NBD length field is 32-bit).
constexpr uint64_t kZeroPieceBytes = uint64_t{1} << 30;
// Write requests at most this (below every server's maximum block size we know).
constexpr uint64_t kWritePieceBytes = uint64_t{4} << 20;



Result<Handle> Connect(const std::string& uri) {
  Handle handle(nbd_create());
  if (!handle) return Status::IOError(uri + ": cannot create an NBD handle: " + LibnbdError());
  if (nbd_connect_uri(handle.get(), uri.c_str()) == -1) {
    return Status::IOError(uri + ": cannot connect to the NBD export: " + LibnbdError(),
                           nbd_get_errno());
  }
  return handle;
}

class NbdRawTarget final : public RawTarget {
 public:
  NbdRawTarget(std::string uri, std::vector<Handle> handles, uint64_t virtual_size,
               bool write_zeroes, bool zero_nothing)
      : RawTarget(uri, virtual_size),
        uri_(std::move(uri)),
        handles_(std::move(handles)),
        write_zeroes_(write_zeroes),
        zero_nothing_(zero_nothing) {
    nbd_handle* first = handles_.front().get();
    can_zero_ = nbd_can_zero(first) == 1;
    fast_zero_.store(nbd_can_fast_zero(first) == 1);
    can_flush_ = nbd_can_flush(first) == 1;
  }
  ~NbdRawTarget() override { (void)CloseIncomplete(); }

  size_t write_alignment() const override { return 1; }

  Status Write(uint64_t offset, std::span<const uint8_t> data) override {
    nbd_handle* handle = Next();
    while (!data.empty()) {
      const uint64_t piece = std::min<uint64_t>(data.size(), kWritePieceBytes);
      if (nbd_pwrite(handle, data.data(), piece, offset, 0) == -1) {
        return Failed("write of " + std::to_string(piece) + " bytes at offset " +
                      std::to_string(offset));
      }
      data = data.subspan(piece);
      offset += piece;
    }
    return Status::OK();
  }

  Status WriteZeroes(uint64_t offset, uint64_t length) override {
    if (zero_nothing_) return Status::OK();
    nbd_handle* handle = Next();
    while (length > 0) {
      if (!can_zero_) {  // no write-zeroes at all: zeros as data
        const uint64_t piece = std::min(length, ZeroBlockSize());
        ZQ_RETURN_IF_ERROR(Write(offset, {ZeroBlock(), piece}));
        offset += piece;
        length -= piece;
        continue;
      }
      const uint64_t piece = std::min(length, kZeroPieceBytes);
      // -S 0: allocated zeros (no hole); else a hole is welcome.
      const uint32_t flags = write_zeroes_ ? LIBNBD_CMD_FLAG_NO_HOLE : 0;
      bool done = false;
      if (!write_zeroes_ && fast_zero_.load(std::memory_order_relaxed)) {
        done = nbd_zero(handle, piece, offset, flags | LIBNBD_CMD_FLAG_FAST_ZERO) == 0;
        // The server cannot zero this fast (ENOTSUP): plain write-zeroes from now on.
        if (!done) fast_zero_.store(false, std::memory_order_relaxed);
      }
      if (!done && nbd_zero(handle, piece, offset, flags) == -1) {
        return Failed("write-zeroes of " + std::to_string(piece) + " bytes at offset " +
                      std::to_string(offset));
      }
      offset += piece;
      length -= piece;
    }
    return Status::OK();
  }

  Status Flush() override {
    if (!can_flush_ || handles_.empty()) return Status::OK();
    for (Handle& handle : handles_) {
      if (nbd_flush(handle.get(), 0) == -1) return Failed("flush");
    }
    return Status::OK();
  }

  Status Close() override {
    if (handles_.empty()) return Status::OK();
    ZQ_RETURN_IF_ERROR(Flush());
    return CloseIncomplete();
  }

  Status CloseIncomplete() override {
    for (Handle& handle : handles_) {
      if (handle && nbd_aio_is_ready(handle.get()) == 1) (void)nbd_shutdown(handle.get(), 0);
    }
    handles_.clear();
    return Status::OK();
  }

 private:
  nbd_handle* Next() {
    return handles_[next_.fetch_add(1, std::memory_order_relaxed) % handles_.size()].get();
  }
  Status Failed(const std::string& what) const {
    const int err = nbd_get_errno();
    const std::string message = uri_ + ": NBD " + what + " failed: " + LibnbdError();
    if (err == ENOSPC) return Status::NoSpace(message);
    return Status::IOError(message, err);
  }

  const std::string uri_;
  std::vector<Handle> handles_;
  const bool write_zeroes_;  // -S 0: zeros allocated, never holes
  const bool zero_nothing_;  // --target-is-zero
  bool can_zero_ = false;
  bool can_flush_ = false;
  std::atomic<bool> fast_zero_{false};
  std::atomic<size_t> next_{0};
};

}  // namespace

Result<std::unique_ptr<RawTarget>> OpenNbdRawTarget(const std::string& uri,
                                                    const ConvertOptions& options,
                                                    uint64_t virtual_size) {
  std::vector<Handle> handles;
  ZQ_ASSIGN_OR_RETURN(Handle first, Connect(uri));
  if (nbd_is_read_only(first.get()) == 1) {
    return Status::InvalidArgument(uri + ": the NBD export is read-only");
  }
  const int64_t size = nbd_get_size(first.get());
  if (size < 0) return Status::IOError(uri + ": cannot get the export's size: " + LibnbdError());
  if (static_cast<uint64_t>(size) < virtual_size) {
    return Status::InvalidArgument(uri + ": target is too small (" + std::to_string(size) +
                                   " bytes) for the source (" + std::to_string(virtual_size) +
                                   " bytes)");
  }
  const bool multi_conn = nbd_can_multi_conn(first.get()) == 1;
  handles.push_back(std::move(first));
  for (size_t i = 1; multi_conn && i < kMaxConnections; ++i) {
    Result<Handle> more = Connect(uri);
    if (!more.ok()) break;  // the first connection is enough
    handles.push_back(std::move(more).value());
  }
  return std::unique_ptr<RawTarget>(
      std::make_unique<NbdRawTarget>(uri, std::move(handles), virtual_size,
                                     options.sparse_size == 0, options.target_is_zero));
}

}  // namespace zqcow::convert
