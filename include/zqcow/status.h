// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Status and Result<T>: how every zqcow API reports success or failure. No exception
// crosses the public API. A failed Status carries one line of text that names the file (or
// object) and the cause, e.g. "/data/vm.qcow2: L1 table offset 0x1000 overlaps the header".

#ifndef ZQCOW_STATUS_H_
#define ZQCOW_STATUS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "zqcow/export.h"

namespace zqcow {

class ZQCOW_EXPORT Status {
 public:
  enum class Code : uint8_t {
    kOk = 0,
    kInvalidArgument,  // the caller asked for something impossible
    kNotFound,         // ENOENT and friends
    kAlreadyExists,    // EEXIST: target exists and overwriting was not asked for
    kIOError,          // any other I/O failure (EIO, ...)
    kNoSpace,          // ENOSPC / EDQUOT: the file system is full
    kCorruption,       // the image is malformed or inconsistent
    kNotSupported,     // a valid image that uses a feature zqcow does not implement
    kInterrupted,      // cancelled by the caller (signal, progress callback)
  };

  Status() = default;  // OK

  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string msg) { return {Code::kInvalidArgument, std::move(msg)}; }
  static Status NotFound(std::string msg) { return {Code::kNotFound, std::move(msg)}; }
  static Status AlreadyExists(std::string msg) { return {Code::kAlreadyExists, std::move(msg)}; }
  static Status IOError(std::string msg, int err = 0) {
    return {Code::kIOError, std::move(msg), err};
  }
  static Status NoSpace(std::string msg) { return {Code::kNoSpace, std::move(msg), 28 /*ENOSPC*/}; }
  static Status Corruption(std::string msg) { return {Code::kCorruption, std::move(msg)}; }
  static Status NotSupported(std::string msg) { return {Code::kNotSupported, std::move(msg)}; }
  static Status Interrupted(std::string msg) { return {Code::kInterrupted, std::move(msg)}; }

  // Maps an errno value to the matching code; the message is "<context>: <strerror(err)>".
  static Status FromErrno(int err, std::string_view context);

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  // errno behind an I/O failure, 0 when there is none.
  int error_number() const { return errno_; }
  const std::string& message() const { return message_; }
  // "OK" or the message (which already names the file and the cause).
  std::string ToString() const { return ok() ? std::string("OK") : message_; }

  // Returns a copy whose message is "<prefix>: <message>" (used to add the file name).
  Status WithPrefix(std::string_view prefix) const;

  bool IsNoSpace() const { return code_ == Code::kNoSpace; }
  bool IsCorruption() const { return code_ == Code::kCorruption; }
  bool IsNotFound() const { return code_ == Code::kNotFound; }

 private:
  Status(Code code, std::string msg, int err = 0)
      : code_(code), errno_(err), message_(std::move(msg)) {}

  Code code_ = Code::kOk;
  int errno_ = 0;
  std::string message_;
};

// A value or the Status that explains why there is none.
template <class T>
class Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {}  // NOLINT: implicit by design
  // REQUIRES: !status.ok() when constructing from a Status.

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }

  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace zqcow

#define ZQ_CONCAT_INNER_(a, b) a##b
#define ZQ_CONCAT_(a, b) ZQ_CONCAT_INNER_(a, b)

// Returns the Status from the enclosing function if `expr` is not OK.
#define ZQ_RETURN_IF_ERROR(expr)                 \
  do {                                           \
    ::zqcow::Status zq_status_ = (expr);         \
    if (!zq_status_.ok()) return zq_status_;     \
  } while (0)

// `ZQ_ASSIGN_OR_RETURN(auto x, Foo());` declares x from a Result or returns its Status.
#define ZQ_ASSIGN_OR_RETURN(lhs, expr) \
  ZQ_ASSIGN_OR_RETURN_IMPL_(ZQ_CONCAT_(zq_result_, __LINE__), lhs, expr)
#define ZQ_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()

#endif  // ZQCOW_STATUS_H_
