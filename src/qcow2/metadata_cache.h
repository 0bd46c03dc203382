// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// A bounded write-back cache of cluster-sized metadata tables (L2 tables and refcount
// blocks), keyed by their host offset, least recently used first out.
//
// Eviction only ever drops CLEAN, UNPINNED entries: a dirty entry stays until its owner
// writes it (the image's ordered Flush) and calls MarkClean(). The budget is therefore
// soft: the owner checks over_budget() at the end of each operation and, when it is,
// runs its ordered flush and Trim(). An entry is pinned while anyone but the cache holds
// its shared_ptr, so a table in use by an operation is never dropped under it.
//
// Threading: not thread-safe; the image calls it with its metadata mutex held.

#ifndef ZQCOW_QCOW2_METADATA_CACHE_H_
#define ZQCOW_QCOW2_METADATA_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <unordered_map>
#include <vector>

#include "io/aligned_buffer.h"

namespace zqcow::qcow2 {

enum class TableKind : uint8_t { kL2, kRefcountBlock };

struct CachedTable {
  uint64_t host_offset = 0;
  TableKind kind = TableKind::kL2;
  bool dirty = false;
  io::AlignedBuffer data;  // one cluster, raw big-endian as on disk
};

class MetadataCache {
 public:
  // Holds at least kMinEntries tables whatever the budget says (so with 2 MiB clusters the
  // cache may hold 16 MiB although the default budget is 8 MiB).
  static constexpr size_t kMinEntries = 8;

  MetadataCache(size_t budget_bytes, uint32_t cluster_size);

  // The cached table at `host_offset`, marked most recently used; nullptr if absent.
  std::shared_ptr<CachedTable> Find(uint64_t host_offset);
  // Adds a table (REQUIRES: not cached yet); evicts clean unpinned entries beyond the
  // budget first. Returns the new entry.
  std::shared_ptr<CachedTable> Insert(uint64_t host_offset, TableKind kind, io::AlignedBuffer data,
                                      bool dirty);
  void MarkDirty(CachedTable& table) { table.dirty = true; }
  void MarkClean(CachedTable& table) { table.dirty = false; }
  // Drops the entry regardless of its state (the cluster was freed).
  void Erase(uint64_t host_offset);

  // Dirty entries of one kind, sorted by host offset.
  std::vector<std::shared_ptr<CachedTable>> Dirty(TableKind kind) const;
  bool HasDirty() const;

  // Evicts clean unpinned entries, least recently used first, until within budget.
  void Trim();
  bool over_budget() const { return entries_.size() > max_entries_; }
  size_t size() const { return entries_.size(); }
  size_t max_entries() const { return max_entries_; }

 private:
  using Lru = std::list<std::shared_ptr<CachedTable>>;  // front = most recently used

  size_t max_entries_;
  Lru lru_;
  std::unordered_map<uint64_t, Lru::iterator> entries_;
};

}  // namespace zqcow::qcow2

#endif  // ZQCOW_QCOW2_METADATA_CACHE_H_
