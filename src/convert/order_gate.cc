// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "convert/order_gate.h"

namespace zqcow::convert {

bool OrderGate::WaitTurn(uint64_t sequence) {
  std::unique_lock lock(mutex_);
  turn_changed_.wait(lock, [&] { return stopped_ || next_ == sequence; });
  return !stopped_;
}

void OrderGate::Advance() {
  {
    std::lock_guard lock(mutex_);
    ++next_;
  }
  // Several workers may wait for different turns; only one of them is next.
  turn_changed_.notify_all();
}

void OrderGate::Stop() {
  {
    std::lock_guard lock(mutex_);
    stopped_ = true;
  }
  turn_changed_.notify_all();
}

}  // namespace zqcow::convert
