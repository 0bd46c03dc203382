// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A heap buffer whose address is aligned for O_DIRECT. Move-only; owns its memory.

#ifndef ZQCOW_IO_ALIGNED_BUFFER_H_
#define ZQCOW_IO_ALIGNED_BUFFER_H_

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <span>
#include <utility>

namespace zqcow::io {

// Alignment used for every buffer that may meet an O_DIRECT file: covers every logical
// block size seen in practice and is a multiple of any smaller one.
inline constexpr size_t kBufferAlignment = 4096;

inline constexpr uint64_t AlignDown(uint64_t value, uint64_t alignment) {
  return value / alignment * alignment;
}
inline constexpr uint64_t AlignUp(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // Zero-filled buffer of `size` bytes (size rounded up internally to the alignment).
  explicit AlignedBuffer(size_t size, size_t alignment = kBufferAlignment) : size_(size) {
    if (size == 0) return;
    size_t rounded = static_cast<size_t>(AlignUp(size, alignment));
    data_ = static_cast<uint8_t*>(std::aligned_alloc(alignment, rounded));
    if (data_ == nullptr) throw std::bad_alloc();
    std::memset(data_, 0, rounded);
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(AlignedBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    if (this != &other) {
      std::free(data_);
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<uint8_t> span() { return {data_, size_}; }
  std::span<const uint8_t> span() const { return {data_, size_}; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace zqcow::io

#endif  // ZQCOW_IO_ALIGNED_BUFFER_H_
