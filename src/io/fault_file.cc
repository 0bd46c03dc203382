// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "io/fault_file.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <mutex>
#include <shared_mutex>
#include <utility>
#include <vector>

#include "io/aligned_buffer.h"

namespace zqcow::io {

namespace {

constexpr size_t kOpKinds = 3;

size_t OpIndex(FaultController::Op op) { return static_cast<size_t>(op); }

}  // namespace

struct FaultController::Impl {
  // What Crash() needs to undo one write or truncate: the file's size before it and the
  // bytes it overwrote, [offset, offset + old_bytes.size()), aligned for the base file.
  struct UndoRecord {
    std::shared_ptr<File> file;
    uint64_t offset = 0;
    AlignedBuffer old_bytes;
    uint64_t old_size = 0;
  };

  // Arms and counters.
  mutable std::mutex mutex;
  std::array<uint64_t, kOpKinds> counts{};
  std::array<uint64_t, kOpKinds> fail_at{};  // absolute count that fails first; 0 = disarmed
  std::array<int, kOpKinds> fail_errno{};
  bool fired = false;
  bool crashed = false;
  std::vector<UndoRecord> undo_log;  // oldest first

  // Held exclusively by tracked writes/truncates/syncs and by Crash(), shared otherwise, so
  // that the undo log's order is the order the writes reached the file and no write lands
  // after Crash() restored the file.
  std::shared_mutex io_mutex;
  std::atomic<bool> tracking{false};

  // Accounts for `n` operations of kind `op` about to be attempted. Returns how many may go
  // ahead; when fewer than n, *err is the errno the next one fails with (and it is counted).
  size_t Admit(Op op, size_t n, int* err) {
    std::lock_guard<std::mutex> lock(mutex);
    const size_t kind = OpIndex(op);
    if (crashed) {
      *err = EIO;
      return 0;
    }
    const uint64_t first = counts[kind] + 1;  // number of the first of these operations
    if (fail_at[kind] != 0 && fail_at[kind] < first + n) {
      const uint64_t passing = fail_at[kind] > first ? fail_at[kind] - first : 0;
      counts[kind] += passing + 1;
      fired = true;
      *err = fail_errno[kind];
      return static_cast<size_t>(passing);
    }
    counts[kind] += n;
    return n;
  }

  bool IsCrashed() const {
    std::lock_guard<std::mutex> lock(mutex);
    return crashed;
  }

  // Saves what a write of [offset, offset+length) or a truncate to `offset` (length =
  // kToEnd) would destroy. REQUIRES: io_mutex held exclusively.
  static constexpr uint64_t kToEnd = UINT64_MAX;
  Status Record(const std::shared_ptr<File>& file, uint64_t offset, uint64_t length) {
    ZQ_ASSIGN_OR_RETURN(uint64_t old_size, file->Size());
    const size_t alignment = file->alignment();
    const uint64_t begin = AlignDown(offset, alignment);
    uint64_t end = AlignUp(old_size, alignment);  // bytes past this are zeros anyway
    if (length != kToEnd) end = std::min(end, AlignUp(offset + length, alignment));
    UndoRecord record;
    record.file = file;
    record.offset = begin;
    record.old_size = old_size;
    if (end > begin) {
      record.old_bytes =
          AlignedBuffer(static_cast<size_t>(end - begin), std::max(alignment, kBufferAlignment));
      Result<size_t> read = file->ReadAt(begin, record.old_bytes.data(), record.old_bytes.size());
      if (!read.ok()) return read.status().WithPrefix("fault injection: saving old contents");
    }
    std::lock_guard<std::mutex> lock(mutex);
    undo_log.push_back(std::move(record));
    return Status::OK();
  }

  // REQUIRES: io_mutex held exclusively.
  void ForgetSynced(const File* file) {
    std::lock_guard<std::mutex> lock(mutex);
    std::erase_if(undo_log, [file](const UndoRecord& record) { return record.file.get() == file; });
  }
};

FaultController::FaultController() : impl_(std::make_shared<Impl>()) {}

void FaultController::FailNth(Op op, uint64_t n, int err) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  const size_t kind = OpIndex(op);
  impl_->fail_at[kind] = n == 0 ? 0 : impl_->counts[kind] + n;
  impl_->fail_errno[kind] = err;
}

uint64_t FaultController::count(Op op) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->counts[OpIndex(op)];
}

bool FaultController::fired() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->fired;
}

void FaultController::TrackUnsynced(bool enable) {
  std::unique_lock<std::shared_mutex> io_lock(impl_->io_mutex);
  impl_->tracking.store(enable);
  if (!enable) {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->undo_log.clear();
  }
}

Status FaultController::Crash() {
  std::unique_lock<std::shared_mutex> io_lock(impl_->io_mutex);
  std::vector<Impl::UndoRecord> undo_log;
  {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->crashed = true;
    undo_log.swap(impl_->undo_log);
  }
  Status first_error;
  for (auto record = undo_log.rbegin(); record != undo_log.rend(); ++record) {
    Status status;
    if (record->old_bytes.size() > 0) {
      status =
          record->file->WriteAt(record->offset, record->old_bytes.data(), record->old_bytes.size());
    }
    if (status.ok()) status = record->file->Truncate(record->old_size);
    if (!status.ok() && first_error.ok()) first_error = status.WithPrefix("crash simulation");
  }
  return first_error;
}

class FaultInjectingFile final : public File {
 public:
  FaultInjectingFile(std::shared_ptr<File> base, std::shared_ptr<FaultController> controller)
      : base_(std::move(base)), controller_(std::move(controller)), impl_(*controller_->impl_) {}

  Result<size_t> ReadAt(uint64_t offset, void* buffer, size_t length) override {
    int err = 0;
    if (impl_.Admit(FaultController::Op::kRead, 1, &err) == 0) {
      return Injected("read", offset, length, err);
    }
    return base_->ReadAt(offset, buffer, length);
  }

  Status WriteAt(uint64_t offset, const void* buffer, size_t length) override {
    const IoRequest request{offset, const_cast<void*>(buffer), length};
    return Write(std::span<const IoRequest>(&request, 1), /*batch=*/false);
  }

  Status ReadBatch(std::span<const IoRequest> requests) override {
    int err = 0;
    const size_t admitted = impl_.Admit(FaultController::Op::kRead, requests.size(), &err);
    ZQ_RETURN_IF_ERROR(base_->ReadBatch(requests.first(admitted)));
    if (admitted < requests.size()) {
      return Injected("read", requests[admitted].offset, requests[admitted].length, err);
    }
    return Status::OK();
  }

  Status WriteBatch(std::span<const IoRequest> requests) override {
    return Write(requests, /*batch=*/true);
  }

  Status Sync() override {
    auto lock = LockForChange();
    int err = 0;
    if (impl_.Admit(FaultController::Op::kSync, 1, &err) == 0) {
      return Status::FromErrno(err, base_->path() + ": fdatasync failed (injected fault)");
    }
    ZQ_RETURN_IF_ERROR(base_->Sync());
    if (lock.tracked) impl_.ForgetSynced(base_.get());
    return Status::OK();
  }

  Result<uint64_t> Size() override {
    ZQ_RETURN_IF_ERROR(FailIfCrashed("size"));
    return base_->Size();
  }

  Status Truncate(uint64_t size) override {
    auto lock = LockForChange();
    ZQ_RETURN_IF_ERROR(FailIfCrashed("truncate"));
    if (lock.tracked) ZQ_RETURN_IF_ERROR(impl_.Record(base_, size, FaultController::Impl::kToEnd));
    return base_->Truncate(size);
  }

  Status DropCache(uint64_t offset, uint64_t length) override {
    ZQ_RETURN_IF_ERROR(FailIfCrashed("drop cache"));
    return base_->DropCache(offset, length);
  }

  Result<uint64_t> NextData(uint64_t offset) override {
    ZQ_RETURN_IF_ERROR(FailIfCrashed("seek data"));
    return base_->NextData(offset);
  }

  Result<uint64_t> NextHole(uint64_t offset) override {
    ZQ_RETURN_IF_ERROR(FailIfCrashed("seek hole"));
    return base_->NextHole(offset);
  }

  bool direct_io() const override { return base_->direct_io(); }
  size_t alignment() const override { return base_->alignment(); }
  const std::string& path() const override { return base_->path(); }

 private:
  // An exclusive io_mutex lock while tracking unsynced writes, a shared one otherwise.
  struct ChangeLock {
    std::unique_lock<std::shared_mutex> exclusive;
    std::shared_lock<std::shared_mutex> shared;
    bool tracked = false;
  };
  ChangeLock LockForChange() {
    ChangeLock lock;
    lock.tracked = impl_.tracking.load();
    if (lock.tracked) {
      lock.exclusive = std::unique_lock<std::shared_mutex>(impl_.io_mutex);
    } else {
      lock.shared = std::shared_lock<std::shared_mutex>(impl_.io_mutex);
    }
    return lock;
  }

  Status Write(std::span<const IoRequest> requests, bool batch) {
    auto lock = LockForChange();
    int err = 0;
    const size_t admitted = impl_.Admit(FaultController::Op::kWrite, requests.size(), &err);
    const auto passing = requests.first(admitted);
    if (lock.tracked) {
      for (const IoRequest& request : passing) {
        ZQ_RETURN_IF_ERROR(impl_.Record(base_, request.offset, request.length));
      }
    }
    if (batch) {
      ZQ_RETURN_IF_ERROR(base_->WriteBatch(passing));
    } else if (!passing.empty()) {
      ZQ_RETURN_IF_ERROR(base_->WriteAt(passing[0].offset, passing[0].buffer, passing[0].length));
    }
    if (admitted < requests.size()) {
      return Injected("write", requests[admitted].offset, requests[admitted].length, err);
    }
    return Status::OK();
  }

  Status Injected(const char* operation, uint64_t offset, size_t length, int err) const {
    return Status::FromErrno(err, base_->path() + ": " + operation + " of " +
                                      std::to_string(length) + " bytes at offset " +
                                      std::to_string(offset) + " failed (injected fault)");
  }

  Status FailIfCrashed(const char* operation) const {
    if (!impl_.IsCrashed()) return Status::OK();
    return Status::FromErrno(EIO, base_->path() + ": " + operation + " failed (after crash)");
  }

  const std::shared_ptr<File> base_;
  const std::shared_ptr<FaultController> controller_;  // keeps impl_ alive
  FaultController::Impl& impl_;
};

std::unique_ptr<File> MakeFaultInjectingFile(std::unique_ptr<File> base,
                                             std::shared_ptr<FaultController> controller) {
  return std::make_unique<FaultInjectingFile>(std::shared_ptr<File>(std::move(base)),
                                              std::move(controller));
}

}  // namespace zqcow::io
