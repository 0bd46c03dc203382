// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.

#include "qcow2/metadata_cache.h"

#include <algorithm>
#include <utility>

namespace zqcow::qcow2 {

MetadataCache::MetadataCache(size_t budget_bytes, uint32_t cluster_size)
    : max_entries_(std::max(kMinEntries, budget_bytes / cluster_size)) {}

std::shared_ptr<CachedTable> MetadataCache::Find(uint64_t host_offset) {
  auto it = entries_.find(host_offset);
  if (it == entries_.end()) return nullptr;
  lru_.splice(lru_.begin(), lru_, it->second);
  return *it->second;
}

std::shared_ptr<CachedTable> MetadataCache::Insert(uint64_t host_offset, TableKind kind,
                                                   io::AlignedBuffer data, bool dirty) {
  if (entries_.size() >= max_entries_) Trim();
  auto table = std::make_shared<CachedTable>();
  table->host_offset = host_offset;
  table->kind = kind;
  table->dirty = dirty;
  table->data = std::move(data);
  lru_.push_front(table);
  entries_[host_offset] = lru_.begin();
  return table;
}

void MetadataCache::Erase(uint64_t host_offset) {
  auto it = entries_.find(host_offset);
  if (it == entries_.end()) return;
  lru_.erase(it->second);
  entries_.erase(it);
}

std::vector<std::shared_ptr<CachedTable>> MetadataCache::Dirty(TableKind kind) const {
  std::vector<std::shared_ptr<CachedTable>> out;
  for (const auto& table : lru_) {
    if (table->dirty && table->kind == kind) out.push_back(table);
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a->host_offset < b->host_offset; });
  return out;
}

bool MetadataCache::HasDirty() const {
  return std::any_of(lru_.begin(), lru_.end(), [](const auto& t) { return t->dirty; });
}

void MetadataCache::Trim() {
  // Walk from the least recently used end; stop once within budget (keeping room for one
  // insertion is the caller's business: Insert trims at the limit).
  auto it = lru_.end();
  while (entries_.size() >= max_entries_ && it != lru_.begin()) {
    --it;
    const auto& table = *it;
    // use_count() == 1: only the cache holds it, nobody is using it (all callers hold the
    // image's metadata mutex, so the count cannot change under us).
    if (table->dirty || table.use_count() > 1) continue;
    entries_.erase(table->host_offset);
    it = lru_.erase(it);
  }
}

}  // namespace zqcow::qcow2
