// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// What the NBD source and the NBD raw target share of libnbd.

#ifndef ZQCOW_CONVERT_NBD_HANDLE_H_
#define ZQCOW_CONVERT_NBD_HANDLE_H_

#include <libnbd.h>

#include <memory>
#include <string>

namespace zqcow::convert {

struct HandleCloser {
  void operator()(nbd_handle* handle) const { nbd_close(handle); }
};
using Handle = std::unique_ptr<nbd_handle, HandleCloser>;

// libnbd's last error on this thread, without the leading "nbd_function: ".
std::string LibnbdError();

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_NBD_HANDLE_H_
