// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// Qcow2Image: construction, reads, writes, zeroes, discard, map.

#include "qcow2/qcow2_engine.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#include "codec/codec.h"
#include "format/endian.h"
#include "format/refcount.h"

namespace zqcow::qcow2 {

namespace {

using format::GuestCluster;
using format::HostCluster;
using format::HostOffset;
using format::L2Entry;

// One decompressor per thread and compression type.
codec::Decompressor* ThreadDecompressor(Compression type) {
  thread_local std::array<std::unique_ptr<codec::Decompressor>, 2> decompressors;
  auto& slot = decompressors[static_cast<size_t>(type) & 1];
  if (!slot) slot = codec::MakeDecompressor(static_cast<codec::CompressionType>(type));
  return slot.get();
}

}  // namespace

// Scratch of one Image::Read: the clusters' L2 entries and one group's compressed bytes.
// Reused per thread; a read that runs inside another one on the same thread (an overlay
// reading its backing file) gets its own, so it never clobbers the outer read's.
struct ReadScratch {
  std::vector<uint64_t> raws;
  std::vector<L2Entry> entries;
  io::AlignedBuffer group;
  bool busy = false;
};

namespace {

class ScratchLease {
 public:
  ScratchLease() {
    thread_local ReadScratch shared;
    if (shared.busy) {
      own_ = std::make_unique<ReadScratch>();
      scratch_ = own_.get();
    } else {
      scratch_ = &shared;
    }
    scratch_->busy = true;
  }
  ~ScratchLease() { scratch_->busy = false; }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  ReadScratch& get() { return *scratch_; }

 private:
  ReadScratch* scratch_ = nullptr;
  std::unique_ptr<ReadScratch> own_;
};

}  // namespace

Qcow2Image::Qcow2Image(Parts parts)
    : path_(parts.file->path()),
      file_(std::move(parts.file)),
      header_(std::move(parts.header)),
      geometry_(header_.geometry()),
      cluster_size_(geometry_.cluster_size()),
      writable_(parts.writable),
      file_size_at_open_(parts.file_size),
      header_cluster_(std::move(parts.header_cluster)) {
  const auto cluster_size = static_cast<uint32_t>(cluster_size_);
  store_ = ClusterStore::Create(file_.get(), cluster_size,
                                ClusterStore::OptionsFor(parts.io, *file_, cluster_size));
  metadata_cache_ = std::make_unique<MetadataCache>(parts.io.metadata_cache_bytes,
                                                    static_cast<uint32_t>(cluster_size_));
  cluster_map_ =
      std::make_unique<ClusterMap>(file_.get(), metadata_cache_.get(), geometry_, parts.l1_offset,
                                   header_.l1_size, std::move(parts.l1));
  backing_ = std::move(parts.backing);
  if (writable_) {
    format::RefcountGeometry refcount_geometry{header_.cluster_bits, header_.refcount_order};
    refcounts_ = std::make_unique<Refcounts>(
        file_.get(), metadata_cache_.get(), refcount_geometry, parts.refcount_table_offset,
        parts.refcount_table_clusters, std::move(parts.refcount_table), parts.next_free);
    placement_ = std::make_unique<CompressedPlacement>(geometry_, refcounts_.get(), store_.get());
  }
}

Qcow2Image::~Qcow2Image() { (void)Close(); }

ImageInfo Qcow2Image::Info() const {
  ImageInfo info;
  info.path = path_;
  info.version = header_.version;
  info.virtual_size = header_.size;
  info.cluster_size = static_cast<uint32_t>(cluster_size_);
  info.refcount_bits = 1u << header_.refcount_order;
  info.compression = static_cast<Compression>(header_.compression_type);
  info.backing_file = header_.backing_file;
  info.backing_format = BackingFormatOf(header_);
  if (backing_) info.backing_chain = backing_->files();
  std::lock_guard lock(mutex_);
  if (file_) {
    auto size = file_->Size();
    info.file_size = size.ok() ? *size : 0;
  }
  if (header_.version >= 3) {
    uint64_t incompatible = format::LoadBE64(header_cluster_.data() + kHeaderIncompatibleFeatures);
    info.dirty = (incompatible & format::kIncompatDirty) != 0;
    info.corrupt = (incompatible & format::kIncompatCorrupt) != 0;
  }
  return info;
}

Status Qcow2Image::Error(const std::string& what) const {
  return Status::InvalidArgument(path_ + ": " + what);
}

Status Qcow2Image::CheckRange(uint64_t guest_offset, uint64_t length) const {
  if (guest_offset > header_.size || length > header_.size - guest_offset) {
    return Error("guest range [" + std::to_string(guest_offset) + ", +" + std::to_string(length) +
                 ") is beyond the virtual size " + std::to_string(header_.size));
  }
  return Status::OK();
}

Status Qcow2Image::CheckWritableLocked() const {
  if (closed_) return Error("image is closed");
  if (!writable_) return Error("image is open read-only");
  return failed_;
}

Status Qcow2Image::FailLocked(const Status& status) {
  if (failed_.ok() && !status.ok()) failed_ = status;
  return status;
}

Status Qcow2Image::Fail(const Status& status) {
  std::lock_guard lock(mutex_);
  return FailLocked(status);
}

uint64_t Qcow2Image::HostLimitLocked() const {
  if (refcounts_) return refcounts_->next_free().value() * cluster_size_;
  return io::AlignUp(file_size_at_open_, cluster_size_);
}

Result<L2Entry> Qcow2Image::Decode(uint64_t raw) const {
  auto entry = format::DecodeL2Entry(raw, geometry_);
  if (!entry.ok()) return entry.status().WithPrefix(path_);
  return entry;
}

// ----------------------------------------------------------------------------- reads

Status Qcow2Image::ReadCompressed(const L2Entry& entry, std::span<uint8_t> cluster) {
  // Per-thread scratch: readers (convert workers) decompress cluster after cluster.
  thread_local std::vector<uint8_t> compressed;
  compressed.resize(entry.compressed_span);
  ZQ_RETURN_IF_ERROR(store_->Read(entry.host_offset.value(), compressed));
  return DecompressCluster(entry, compressed, cluster);
}

Status Qcow2Image::DecompressCluster(const L2Entry& entry, std::span<const uint8_t> compressed,
                                     std::span<uint8_t> cluster) const {
  Status s = ThreadDecompressor(compression())->Decompress(compressed, cluster);
  if (!s.ok()) {
    char where[64];
    snprintf(where, sizeof(where), "compressed cluster at host offset 0x%llx",
             static_cast<unsigned long long>(entry.host_offset.value()));
    return s.WithPrefix(path_ + ": " + where);
  }
  return Status::OK();
}

Status Qcow2Image::ReadUnallocated(uint64_t guest_offset, std::span<uint8_t> out) {
  const uint64_t backed = !backing_ || guest_offset >= backing_->size()
                              ? 0
                              : std::min<uint64_t>(out.size(), backing_->size() - guest_offset);
  if (backed > 0) ZQ_RETURN_IF_ERROR(backing_->Read(guest_offset, out.first(backed)));
  std::memset(out.data() + backed, 0, out.size() - backed);
  return Status::OK();
}

Status Qcow2Image::ReadWholeClusters(std::span<const uint64_t> raws, uint64_t guest_offset,
                                     std::span<uint8_t> out, ReadScratch& scratch) {
  // The decoded entries, and one group's compressed bytes read as whole aligned blocks (an
  // O_DIRECT file then reads straight into it).
  std::vector<L2Entry>& entries = scratch.entries;
  io::AlignedBuffer& group = scratch.group;
  const uint64_t alignment = std::max<uint64_t>(file_->alignment(), 1);
  entries.clear();
  for (uint64_t raw : raws) {
    ZQ_ASSIGN_OR_RETURN(L2Entry entry, Decode(raw));
    entries.push_back(entry);
  }
  size_t i = 0;
  while (i < entries.size()) {
    const L2Entry& first = entries[i];
    std::span<uint8_t> first_out = out.subspan(i * cluster_size_, cluster_size_);
    const uint64_t start = first.host_offset.value();
    size_t end = i + 1;
    if (first.kind == L2Entry::Kind::kNormal) {
      while (end < entries.size() && end - i < kReadGroupBytes / cluster_size_ &&
             entries[end].kind == L2Entry::Kind::kNormal &&
             entries[end].host_offset.value() == start + (end - i) * cluster_size_) {
        ++end;
      }
      // Consecutive host clusters hold consecutive guest clusters: straight into `out`.
      ZQ_RETURN_IF_ERROR(
          store_->Read(start, out.subspan(i * cluster_size_, (end - i) * cluster_size_)));
      i = end;
      continue;
    }
    if (first.kind == L2Entry::Kind::kUnallocated) {
      // A run of unallocated clusters: one read of the backing file.
      while (end < entries.size() && entries[end].kind == L2Entry::Kind::kUnallocated) ++end;
      ZQ_RETURN_IF_ERROR(
          ReadUnallocated(guest_offset + i * cluster_size_,
                          out.subspan(i * cluster_size_, (end - i) * cluster_size_)));
      i = end;
      continue;
    }
    if (first.kind != L2Entry::Kind::kCompressed) {
      ZQ_RETURN_IF_ERROR(ReadFromEntry(raws[i], guest_offset + i * cluster_size_, first_out));
      ++i;
      continue;
    }
    // A group spans at most kReadGroupBytes, the first cluster's data included: from 256 KiB
    // clusters on, a descriptor may claim more sectors than that (up to twice the cluster
    // size; QEMU accepts an overstated count), and such a cluster is read alone.
    uint64_t group_end = start + first.compressed_span;
    while (first.compressed_span <= kReadGroupBytes && end < entries.size() &&
           entries[end].kind == L2Entry::Kind::kCompressed) {
      const uint64_t next = entries[end].host_offset.value();
      const uint64_t next_end = next + entries[end].compressed_span;
      if (next < start || next > group_end + kReadGapBytes || next_end - start > kReadGroupBytes) {
        break;
      }
      group_end = std::max(group_end, next_end);
      ++end;
    }
    if (end - i == 1) {
      ZQ_RETURN_IF_ERROR(ReadCompressed(first, first_out));
      ++i;
      continue;
    }
    const uint64_t read_start = io::AlignDown(start, alignment);
    const uint64_t read_length = io::AlignUp(group_end, alignment) - read_start;
    if (group.size() < read_length) {
      // Holds any group (at most kReadGroupBytes, widened by less than one alignment unit at
      // each end), and this one whatever it is.
      group = io::AlignedBuffer(std::max(read_length, kReadGroupBytes + 2 * alignment),
                                std::max<size_t>(alignment, io::kBufferAlignment));
    }
    ZQ_RETURN_IF_ERROR(store_->Read(read_start, group.span().first(read_length)));
    for (size_t k = i; k < end; ++k) {
      const L2Entry& entry = entries[k];
      const std::span<const uint8_t> compressed(
          group.data() + (entry.host_offset.value() - read_start), entry.compressed_span);
      ZQ_RETURN_IF_ERROR(
          DecompressCluster(entry, compressed, out.subspan(k * cluster_size_, cluster_size_)));
    }
    i = end;
  }
  return Status::OK();
}

Status Qcow2Image::ReadFromEntry(uint64_t raw, uint64_t guest_offset, std::span<uint8_t> out) {
  ZQ_ASSIGN_OR_RETURN(L2Entry entry, Decode(raw));
  const uint64_t in_cluster = geometry_.offset_in_cluster(guest_offset);
  switch (entry.kind) {
    case L2Entry::Kind::kUnallocated:
      return ReadUnallocated(guest_offset, out);
    case L2Entry::Kind::kZero:
      std::memset(out.data(), 0, out.size());
      return Status::OK();
    case L2Entry::Kind::kCompressed: {
      if (in_cluster == 0 && out.size() == cluster_size_) return ReadCompressed(entry, out);
      thread_local std::vector<uint8_t> cluster;
      cluster.resize(cluster_size_);
      ZQ_RETURN_IF_ERROR(ReadCompressed(entry, cluster));
      std::memcpy(out.data(), cluster.data() + in_cluster, out.size());
      return Status::OK();
    }
    case L2Entry::Kind::kNormal:
      break;
  }
  // The cache holds normal clusters not yet written (and reads the file, aligned, for the
  // others).
  return store_->Read(entry.host_offset.value() + in_cluster, out);
}

Status Qcow2Image::Read(uint64_t guest_offset, std::span<uint8_t> out) {
  ZQ_RETURN_IF_ERROR(CheckRange(guest_offset, out.size()));
  if (geometry_.extended_l2) return ReadExtended(guest_offset, out);
  ScratchLease lease;
  std::vector<uint64_t>& raws = lease.get().raws;  // entries of the clusters read in one go
  const uint64_t per_l2 = geometry_.l2_entries();
  uint64_t done = 0;
  while (done < out.size()) {
    uint64_t offset = guest_offset + done;
    uint64_t in_cluster = geometry_.offset_in_cluster(offset);
    uint64_t n = std::min<uint64_t>(out.size() - done, cluster_size_ - in_cluster);
    GuestCluster cluster(offset >> geometry_.cluster_bits);
    // Whole clusters from here on, within this L2 table: looked up together, read grouped.
    uint64_t whole = 0;
    if (in_cluster == 0) {
      whole = std::min<uint64_t>({(out.size() - done) / cluster_size_,
                                  per_l2 - cluster.value() % per_l2, kReadGroupClusters});
    }
    raws.clear();
    bool has_l2 = false;
    {
      std::lock_guard lock(mutex_);
      if (closed_) return Error("image is closed");
      ZQ_ASSIGN_OR_RETURN(has_l2, cluster_map_->HasL2(cluster));
      for (uint64_t i = 0; has_l2 && i < std::max<uint64_t>(whole, 1); ++i) {
        ZQ_ASSIGN_OR_RETURN(uint64_t raw, cluster_map_->GetEntry(cluster + i, HostLimitLocked()));
        raws.push_back(raw);
      }
    }
    if (!has_l2) {
      // The whole L2 range is unallocated.
      const uint64_t per_l2_bytes = per_l2 * cluster_size_;
      uint64_t next = io::AlignDown(offset, per_l2_bytes) + per_l2_bytes;
      n = std::min<uint64_t>(out.size() - done, next - offset);
      ZQ_RETURN_IF_ERROR(ReadUnallocated(offset, out.subspan(done, n)));
      done += n;
      continue;
    }
    if (whole >= 2) {
      n = whole * cluster_size_;
      ZQ_RETURN_IF_ERROR(ReadWholeClusters(raws, offset, out.subspan(done, n), lease.get()));
    } else {
      ZQ_RETURN_IF_ERROR(ReadFromEntry(raws.front(), offset, out.subspan(done, n)));
    }
    done += n;
  }
  return Status::OK();
}

Status Qcow2Image::ReplaceEntryLocked(GuestCluster cluster, uint64_t raw) {
  uint64_t host_limit = HostLimitLocked();
  ZQ_ASSIGN_OR_RETURN(uint64_t old_raw, cluster_map_->GetEntry(cluster, host_limit));
  ZQ_RETURN_IF_ERROR(cluster_map_->SetEntry(cluster, raw, host_limit));
  if (old_raw == raw) return Status::OK();
  ZQ_ASSIGN_OR_RETURN(L2Entry old, Decode(old_raw));
  switch (old.kind) {
    case L2Entry::Kind::kUnallocated:
      break;
    case L2Entry::Kind::kZero:
    case L2Entry::Kind::kNormal:
      if (old.host_offset.value() != 0) {
        refcounts_->QueueDecrement(geometry_.host_cluster(old.host_offset));
      }
      break;
    case L2Entry::Kind::kCompressed: {
      format::HostClusterRange range = format::CompressedHostClusters(old, geometry_);
      for (HostCluster c = range.first; c <= range.last; c = c + 1) {
        refcounts_->QueueDecrement(c);
      }
      break;
    }
  }
  return Status::OK();
}

// Holds a guest cluster exclusively for one writer from construction to destruction.
class Qcow2Image::ClusterWriteGuard {
 public:
  ClusterWriteGuard(Qcow2Image* image, GuestCluster cluster)
      : image_(image), cluster_(cluster.value()) {
    std::unique_lock lock(image_->mutex_);
    image_->cluster_written_.wait(
        lock, [&] { return !image_->clusters_being_written_.contains(cluster_); });
    image_->clusters_being_written_.insert(cluster_);
  }
  ~ClusterWriteGuard() {
    {
      std::lock_guard lock(image_->mutex_);
      image_->clusters_being_written_.erase(cluster_);
    }
    image_->cluster_written_.notify_all();
  }
  ClusterWriteGuard(const ClusterWriteGuard&) = delete;
  ClusterWriteGuard& operator=(const ClusterWriteGuard&) = delete;

 private:
  Qcow2Image* image_;
  uint64_t cluster_;
};

Status Qcow2Image::WriteOneCluster(GuestCluster cluster, uint64_t in_cluster,
                                   std::span<const uint8_t> data) {
  ClusterWriteGuard exclusive(this, cluster);
  uint64_t old_raw = 0;
  uint64_t host = 0;
  bool in_place = false;
  {
    std::lock_guard lock(mutex_);
    ZQ_RETURN_IF_ERROR(CheckWritableLocked());
    ZQ_ASSIGN_OR_RETURN(old_raw, cluster_map_->GetEntry(cluster, HostLimitLocked()));
    ZQ_ASSIGN_OR_RETURN(L2Entry old, Decode(old_raw));
    if (old.kind == L2Entry::Kind::kNormal && old.copied) {
      in_place = true;
      host = old.host_offset.value();
    } else {
      Status s = cluster_map_->EnsureL2(cluster, refcounts_.get());
      if (s.ok()) {
        auto allocated = refcounts_->Allocate(1);
        s = allocated.status();
        if (s.ok()) host = geometry_.host_offset(*allocated).value();
      }
      if (!s.ok()) return FailLocked(s);
    }
  }

  // The whole cluster is written: old content below and above the new bytes is kept.
  const uint64_t cluster_start = cluster.value() << geometry_.cluster_bits;
  const uint64_t valid = std::min<uint64_t>(cluster_size_, header_.size - cluster_start);
  std::span<const uint8_t> whole = data;
  io::AlignedBuffer buffer;
  // A whole cluster goes to the store as it is (the store copies it); a direct write needs
  // an aligned buffer.
  const bool to_store = store_->holds_normal_clusters();
  if (in_cluster != 0 || data.size() < cluster_size_ || !to_store) {
    buffer = io::AlignedBuffer(cluster_size_);
    if (in_cluster != 0 || data.size() < valid) {
      Status s = ReadFromEntry(old_raw, cluster_start, buffer.span().first(valid));
      if (!s.ok()) return Fail(s);
    }
    std::memcpy(buffer.data() + in_cluster, data.data(), data.size());
    whole = buffer.span();
  }
  Status s;
  if (to_store) {
    // Through the store: its writer thread writes the cluster, joined with its neighbours.
    // An in-place cluster may still be held (or in flight) from its first write: Rewrite
    // replaces its bytes in one step, so no reader or flush sees it without them, and a
    // write of the old bytes never lands after the new ones.
    s = in_place ? store_->Rewrite(host, whole) : store_->Write(host, whole);
  } else {
    s = file_->WriteAt(host, whole.data(), cluster_size_);
  }
  if (!s.ok()) return Fail(s);
  if (in_place) return Status::OK();

  std::lock_guard lock(mutex_);
  ZQ_RETURN_IF_ERROR(CheckWritableLocked());
  s = ReplaceEntryLocked(cluster, format::EncodeNormalL2Entry(HostOffset(host), true));
  if (s.ok()) s = MaybeFlushLocked();
  return FailLocked(s);
}

Status Qcow2Image::Write(uint64_t guest_offset, std::span<const uint8_t> data) {
  ZQ_RETURN_IF_ERROR(CheckRange(guest_offset, data.size()));
  uint64_t done = 0;
  while (done < data.size()) {
    uint64_t offset = guest_offset + done;
    uint64_t in_cluster = geometry_.offset_in_cluster(offset);
    uint64_t n = std::min<uint64_t>(data.size() - done, cluster_size_ - in_cluster);
    ZQ_RETURN_IF_ERROR(WriteOneCluster(GuestCluster(offset >> geometry_.cluster_bits), in_cluster,
                                       data.subspan(done, n)));
    done += n;
  }
  return Status::OK();
}

Status Qcow2Image::CheckCompressedCluster(const CompressedCluster& cluster) const {
  ZQ_RETURN_IF_ERROR(CheckRange(cluster.guest_offset, 1));
  if (geometry_.offset_in_cluster(cluster.guest_offset) != 0) {
    return Error("compressed write at guest offset " + std::to_string(cluster.guest_offset) +
                 " is not cluster aligned");
  }
  if (cluster.data.empty() || cluster.data.size() >= cluster_size_) {
    return Error("compressed cluster of " + std::to_string(cluster.data.size()) +
                 " bytes (must be 1 .. cluster size - 1)");
  }
  return Status::OK();
}

Status Qcow2Image::WriteCompressed(uint64_t guest_offset, std::span<const uint8_t> compressed) {
  const CompressedCluster cluster{guest_offset, compressed};
  return WriteCompressedBatch({&cluster, 1});
}

Status Qcow2Image::WriteCompressedBatch(std::span<const CompressedCluster> clusters) {
  for (const CompressedCluster& cluster : clusters) {
    ZQ_RETURN_IF_ERROR(CheckCompressedCluster(cluster));
  }
  if (clusters.empty()) return Status::OK();
  auto guest_cluster = [&](const CompressedCluster& cluster) {
    return GuestCluster(cluster.guest_offset >> geometry_.cluster_bits);
  };
  // Per-thread scratch: workers call this batch after batch.
  thread_local std::vector<HostOffset> hosts;
  hosts.resize(clusters.size());
  {
    std::lock_guard lock(mutex_);
    ZQ_RETURN_IF_ERROR(CheckWritableLocked());
    // Every L2 table first, so no table allocation lands between two compressed pieces and
    // the batch's data is allocated back to back.
    for (const CompressedCluster& cluster : clusters) {
      Status s = cluster_map_->EnsureL2(guest_cluster(cluster), refcounts_.get());
      if (!s.ok()) return FailLocked(s);
    }
    Status placed = placement_->PlaceBatch(clusters, hosts);
    if (!placed.ok()) return FailLocked(placed);
  }
  // The data reaches the store before any L2 entry points at it.
  Status s = store_->WriteBatch(clusters, hosts);
  if (!s.ok()) return Fail(s);

  std::lock_guard lock(mutex_);
  ZQ_RETURN_IF_ERROR(CheckWritableLocked());
  for (size_t i = 0; i < clusters.size() && s.ok(); ++i) {
    s = ReplaceEntryLocked(
        guest_cluster(clusters[i]),
        format::EncodeCompressedL2Entry(hosts[i], clusters[i].data.size(), geometry_));
  }
  if (s.ok()) s = MaybeFlushLocked();
  return FailLocked(s);
}

Status Qcow2Image::ReplaceWholeClusters(uint64_t first, uint64_t count, uint64_t raw,
                                        bool hide_backing) {
  uint64_t cluster = first;
  const uint64_t end = first + count;
  const uint64_t per_l2 = geometry_.l2_entries();
  while (cluster < end) {
    uint64_t chunk_end = std::min(end, (cluster / per_l2 + 1) * per_l2);
    std::lock_guard lock(mutex_);
    ZQ_RETURN_IF_ERROR(CheckWritableLocked());
    ZQ_ASSIGN_OR_RETURN(bool has_l2, cluster_map_->HasL2(GuestCluster(cluster)));
    if (!has_l2 && hide_backing) {
      Status s = cluster_map_->EnsureL2(GuestCluster(cluster), refcounts_.get());
      if (!s.ok()) return FailLocked(s);
      has_l2 = true;
    }
    if (has_l2) {
      for (uint64_t c = cluster; c < chunk_end; ++c) {
        Status s = ReplaceEntryLocked(GuestCluster(c), raw);
        if (!s.ok()) return FailLocked(s);
      }
      Status s = MaybeFlushLocked();
      if (!s.ok()) return FailLocked(s);
    }
    cluster = chunk_end;
  }
  return Status::OK();
}

Status Qcow2Image::WriteZeroes(uint64_t guest_offset, uint64_t length) {
  ZQ_RETURN_IF_ERROR(CheckRange(guest_offset, length));
  const uint64_t end = guest_offset + length;
  // Whole clusters: those fully inside the range; the last (partial) cluster of the image
  // counts as whole when the range reaches the virtual size.
  uint64_t first_whole = io::AlignUp(guest_offset, cluster_size_);
  uint64_t end_whole =
      end == header_.size ? io::AlignUp(end, cluster_size_) : io::AlignDown(end, cluster_size_);
  std::vector<uint8_t> zeros;
  auto write_zeros = [&](uint64_t from, uint64_t to) -> Status {
    if (from >= to) return Status::OK();
    zeros.assign(std::min(to - from, cluster_size_), 0);  // a cluster at a time at most
    for (uint64_t pos = from; pos < to; pos += zeros.size()) {
      ZQ_RETURN_IF_ERROR(Write(pos, {zeros.data(), std::min<uint64_t>(to - pos, zeros.size())}));
    }
    return Status::OK();
  };
  // A v2 overlay has no zero clusters: unallocated would show the backing data, so its
  // zeros are written as data.
  if (first_whole >= end_whole || (header_.version < 3 && backing_)) {
    return write_zeros(guest_offset, end);
  }
  ZQ_RETURN_IF_ERROR(write_zeros(guest_offset, first_whole));
  ZQ_RETURN_IF_ERROR(write_zeros(std::min(end_whole, end), end));
  if (header_.version >= 3) {
    return ReplaceWholeClusters(first_whole >> geometry_.cluster_bits,
                                (end_whole - first_whole) >> geometry_.cluster_bits,
                                format::EncodeZeroL2Entry(), /*hide_backing=*/backing_ != nullptr);
  }
  return ReplaceWholeClusters(first_whole >> geometry_.cluster_bits,
                              (end_whole - first_whole) >> geometry_.cluster_bits,
                              format::EncodeUnallocatedL2Entry(), /*hide_backing=*/false);
}

Status Qcow2Image::Discard(uint64_t guest_offset, uint64_t length) {
  ZQ_RETURN_IF_ERROR(CheckRange(guest_offset, length));
  const uint64_t end = guest_offset + length;
  uint64_t first_whole = io::AlignUp(guest_offset, cluster_size_);
  uint64_t end_whole =
      end == header_.size ? io::AlignUp(end, cluster_size_) : io::AlignDown(end, cluster_size_);
  if (first_whole >= end_whole) return Status::OK();
  if (backing_) {
    // Unallocated would expose the backing data: a zero cluster (v3) releases the host
    // cluster and still hides it; a v2 overlay cannot, and keeps the clusters (a discard
    // is only a hint).
    if (header_.version < 3) return Status::OK();
    return ReplaceWholeClusters(first_whole >> geometry_.cluster_bits,
                                (end_whole - first_whole) >> geometry_.cluster_bits,
                                format::EncodeZeroL2Entry(), /*hide_backing=*/true);
  }
  return ReplaceWholeClusters(first_whole >> geometry_.cluster_bits,
                              (end_whole - first_whole) >> geometry_.cluster_bits,
                              format::EncodeUnallocatedL2Entry(), /*hide_backing=*/false);
}

// ----------------------------------------------------------------------------- map

Status Qcow2Image::MapUnallocated(uint64_t guest_offset, uint64_t length,
                                  const std::function<void(const MapExtent&)>& add) {
  const uint64_t end = guest_offset + length;
  const uint64_t backed_end =
      backing_ ? std::clamp(backing_->size(), guest_offset, end) : guest_offset;
  if (backed_end > guest_offset) {
    ZQ_ASSIGN_OR_RETURN(std::vector<MapExtent> below,
                        backing_->Map(guest_offset, backed_end - guest_offset));
    for (MapExtent extent : below) {
      ++extent.depth;
      add(extent);
    }
  }
  // Beyond the backing file (or without one): zeros that no file of the chain holds.
  if (end > backed_end) add({backed_end, end - backed_end, MapExtent::Kind::kUnallocated, 0, 0});
  return Status::OK();
}

Result<Qcow2Image::MapStep> Qcow2Image::LookUpForMap(uint64_t offset, uint64_t end) {
  const GuestCluster cluster(offset >> geometry_.cluster_bits);
  MapStep step;  // kUnallocated
  step.length = std::min(end - offset, cluster_size_ - geometry_.offset_in_cluster(offset));
  std::lock_guard lock(mutex_);
  if (closed_) return Error("image is closed");
  ZQ_ASSIGN_OR_RETURN(bool has_l2, cluster_map_->HasL2(cluster));
  if (!has_l2) {
    const uint64_t per_l2_bytes = geometry_.l2_entries() * cluster_size_;
    step.length = std::min(end, io::AlignDown(offset, per_l2_bytes) + per_l2_bytes) - offset;
    return step;
  }
  if (geometry_.extended_l2) return LookUpExtendedLocked(offset, end);
  ZQ_ASSIGN_OR_RETURN(uint64_t raw, cluster_map_->GetEntry(cluster, HostLimitLocked()));
  ZQ_ASSIGN_OR_RETURN(step.entry, Decode(raw));
  return step;
}

Result<std::vector<MapExtent>> Qcow2Image::Map(uint64_t guest_offset, uint64_t length) {
  ZQ_RETURN_IF_ERROR(CheckRange(guest_offset, length));
  std::vector<MapExtent> extents;
  auto add = [&extents](const MapExtent& extent) {
    if (extent.length == 0) return;
    if (!extents.empty()) {
      MapExtent& last = extents.back();
      bool same = last.kind == extent.kind && last.depth == extent.depth &&
                  last.guest_offset + last.length == extent.guest_offset;
      if (same && extent.kind == MapExtent::Kind::kData) {
        same = last.host_offset + last.length == extent.host_offset;
      }
      if (same) {
        last.length += extent.length;
        return;
      }
    }
    extents.push_back(extent);
  };
  const uint64_t end = guest_offset + length;
  uint64_t offset = guest_offset;
  while (offset < end) {
    ZQ_ASSIGN_OR_RETURN(MapStep step, LookUpForMap(offset, end));
    const L2Entry& entry = step.entry;
    const uint64_t n = step.length;
    // Unallocated clusters are collected into one run before the backing chain is asked.
    if (entry.kind == L2Entry::Kind::kUnallocated) {
      const uint64_t run_start = offset;
      offset += n;
      while (offset < end) {
        ZQ_ASSIGN_OR_RETURN(MapStep next, LookUpForMap(offset, end));
        if (next.entry.kind != L2Entry::Kind::kUnallocated) break;
        offset += next.length;
      }
      ZQ_RETURN_IF_ERROR(MapUnallocated(run_start, offset - run_start, add));
      continue;
    }
    const uint64_t in_cluster = geometry_.offset_in_cluster(offset);
    switch (entry.kind) {
      case L2Entry::Kind::kUnallocated:
        break;
      case L2Entry::Kind::kZero:
        add({offset, n, MapExtent::Kind::kZero, 0});
        break;
      case L2Entry::Kind::kNormal:
        add({offset, n, MapExtent::Kind::kData, entry.host_offset.value() + in_cluster});
        break;
      case L2Entry::Kind::kCompressed:
        add({offset, n, MapExtent::Kind::kCompressed, entry.host_offset.value()});
        break;
    }
    offset += n;
  }
  return extents;
}

}  // namespace zqcow::qcow2
