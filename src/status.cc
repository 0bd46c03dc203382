// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "zqcow/status.h"

#include <cerrno>
#include <cstring>

namespace zqcow {

Status Status::FromErrno(int err, std::string_view context) {
  std::string msg(context);
  msg += ": ";
  msg += std::strerror(err);
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return Status(Code::kNotFound, std::move(msg), err);
    case EEXIST:
      return Status(Code::kAlreadyExists, std::move(msg), err);
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
      return Status(Code::kNoSpace, std::move(msg), err);
    case EINVAL:
      return Status(Code::kInvalidArgument, std::move(msg), err);
    case EOPNOTSUPP:
      return Status(Code::kNotSupported, std::move(msg), err);
    case EINTR:
      return Status(Code::kInterrupted, std::move(msg), err);
    default:
      return Status(Code::kIOError, std::move(msg), err);
  }
}

Status Status::WithPrefix(std::string_view prefix) const {
  if (ok()) return *this;
  std::string msg(prefix);
  msg += ": ";
  msg += message_;
  return Status(code_, std::move(msg), errno_);
}

}  // namespace zqcow
