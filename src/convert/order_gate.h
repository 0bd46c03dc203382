// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// The reorder stage for in-order writing (-W off): work items carry sequence numbers 0, 1,
// 2, ... in guest order; a worker that finished item n waits until items 0..n-1 were
// written, writes, then lets n+1 go. Workers still compress in parallel; only the writes
// are serialised in guest order.
//
// No deadlock: items are taken from a FIFO in sequence order, so the lowest unwritten
// sequence number is always held by a worker that is running, never by one that waits.

#ifndef ZQCOW_CONVERT_ORDER_GATE_H_
#define ZQCOW_CONVERT_ORDER_GATE_H_

#include <condition_variable>
#include <cstdint>
#include <mutex>

namespace zqcow::convert {

// Threading: all methods may be called from any thread.
class OrderGate {
 public:
  // Waits until it is `sequence`'s turn. False when the gate was stopped instead.
  bool WaitTurn(uint64_t sequence);
  // Ends the current turn. REQUIRES: the caller's WaitTurn returned true.
  void Advance();
  // Wakes every waiter; WaitTurn returns false from now on.
  void Stop();

 private:
  std::mutex mutex_;
  std::condition_variable turn_changed_;
  uint64_t next_ = 0;     // guarded by mutex_
  bool stopped_ = false;  // guarded by mutex_
};

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_ORDER_GATE_H_
