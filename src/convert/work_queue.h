// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A FIFO hand-off from one producer (the reader) to several consumers (the workers).
// Unbounded by itself: the pipeline bounds it by the chunk pool (every item refers to a
// chunk, and there are only so many chunks).

#ifndef ZQCOW_CONVERT_WORK_QUEUE_H_
#define ZQCOW_CONVERT_WORK_QUEUE_H_

#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <utility>

namespace zqcow::convert {

// Threading: all methods may be called from any thread.
template <class T>
class WorkQueue {
 public:
  void Push(T item) {
    {
      std::lock_guard lock(mutex_);
      items_.push_back(std::move(item));
    }
    ready_.notify_one();
  }

  // The next item, in push order. std::nullopt when the queue was closed and is empty, or
  // when it was stopped (remaining items are then dropped).
  std::optional<T> Pop() {
    std::unique_lock lock(mutex_);
    ready_.wait(lock, [this] { return stopped_ || closed_ || !items_.empty(); });
    if (stopped_ || items_.empty()) return std::nullopt;
    T item = std::move(items_.front());
    items_.pop_front();
    return item;
  }

  // No more items will be pushed; consumers drain what is left, then get nullopt.
  void Close() {
    {
      std::lock_guard lock(mutex_);
      closed_ = true;
    }
    ready_.notify_all();
  }

  // Abandon the work: every Pop returns nullopt from now on.
  void Stop() {
    {
      std::lock_guard lock(mutex_);
      stopped_ = true;
    }
    ready_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<T> items_;   // guarded by mutex_
  bool closed_ = false;   // guarded by mutex_
  bool stopped_ = false;  // guarded by mutex_
};

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_WORK_QUEUE_H_
