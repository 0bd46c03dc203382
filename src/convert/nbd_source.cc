// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// An NBD export as a Source, through libnbd (no NBD protocol code of our own):
// - Read splits each request into pieces no larger than the server's maximum block size
//   and keeps many of them in flight at once (nbd_aio_pread), spread over several
//   connections when the server advertises multi-conn.
// - DataRanges asks the base:allocation meta context, so ranges the server reports as
//   reading zeros are never read; DirtyRanges asks qemu:dirty-bitmap:NAME.
// - A connection that fails (server killed, reset) makes every later call fail with one
//   line naming the URI; nothing is silently read as zeros.

#include <fmt/format.h>
#include <libnbd.h>
#include <poll.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string_view>
#include <utility>

#include "convert/nbd_handle.h"
#include "convert/source.h"
#include "io/aligned_buffer.h"

namespace zqcow::convert {

namespace {

using io::AlignDown;
using io::AlignUp;

constexpr const char* kBaseAllocation = "base:allocation";
constexpr std::string_view kDirtyBitmapPrefix = "qemu:dirty-bitmap:";
// base:allocation flags (NBD protocol): the range is a hole / reads as zeros. Only the
// zero flag lets a range go unread: a hole without it may read as anything.
constexpr uint32_t kStateZero = LIBNBD_STATE_ZERO;
// qemu:dirty-bitmap:NAME flags: the range changed since the bitmap's checkpoint.
constexpr uint32_t kStateDirty = 1;

// Connections opened when the server advertises multi-conn (each one more stream of
// reads the server serves in parallel; QEMU serves each connection's requests concurrently
// too, so a few suffice).
constexpr size_t kMaxConnections = 4;
// How long the extra connections may take to open; those that do not are left out (a
// server limiting its clients may accept the socket and never answer the handshake).
constexpr auto kExtraConnectTimeout = std::chrono::seconds(5);
// How long the first connection's handshake may take before the open fails.
constexpr auto kConnectTimeout = std::chrono::seconds(30);
// Largest read request when the server names no maximum block size (the NBD protocol's
// default ceiling).
constexpr uint64_t kDefaultMaxBlock = uint64_t{32} << 20;
// Reads are cut into pieces of at most this many bytes, so a batch of a few MiB becomes
// enough requests to keep every connection busy. Memory: none; pieces read straight into
// the caller's buffers.
constexpr uint64_t kPieceBytes = uint64_t{256} << 10;
// Requests in flight per connection (QEMU's NBD server handles 16 per client at once; more
// would only wait in its socket).
constexpr size_t kMaxInFlightPerConnection = 16;
// Block status is asked for at most this many bytes at a time (the NBD length is 32-bit).
constexpr uint64_t kBlockStatusBytes = uint64_t{1} << 30;


// Creates a handle asking for `contexts` when it connects.
Result<Handle> NewHandle(const std::string& uri, const std::vector<std::string>& contexts) {
  Handle handle(nbd_create());
  if (!handle) return Status::IOError(uri + ": cannot create an NBD handle: " + LibnbdError());
  for (const std::string& context : contexts) {
    if (nbd_add_meta_context(handle.get(), context.c_str()) == -1) {
      return Status::IOError(uri + ": " + LibnbdError());
    }
  }
  return handle;
}

// Merges [start, stop) into sorted `ranges`.
void AddRange(std::vector<ByteRange>& ranges, uint64_t start, uint64_t stop) {
  if (start >= stop) return;
  if (!ranges.empty() && ranges.back().end() == start) {
    ranges.back().length += stop - start;
  } else {
    ranges.push_back({start, stop - start});
  }
}

class NbdSource final : public Source {
 public:
  NbdSource(std::string uri, std::vector<Handle> handles, uint64_t size, bool has_allocation,
            std::string bitmap_context)
      : uri_(std::move(uri)),
        handles_(std::move(handles)),
        size_(size),
        has_allocation_(has_allocation),
        bitmap_context_(std::move(bitmap_context)) {
    nbd_handle* first = handles_.front().get();
    const int64_t minimum = nbd_get_block_size(first, LIBNBD_SIZE_MINIMUM);
    const int64_t maximum = nbd_get_block_size(first, LIBNBD_SIZE_MAXIMUM);
    min_block_ = minimum > 0 ? static_cast<uint64_t>(minimum) : 1;
    const uint64_t max_block = maximum > 0 ? static_cast<uint64_t>(maximum) : kDefaultMaxBlock;
    piece_bytes_ = std::max(min_block_, AlignDown(std::min(kPieceBytes, max_block), min_block_));
  }

  ~NbdSource() override { (void)Close(); }

  const std::string& path() const override { return uri_; }
  const char* format() const override { return "raw"; }
  uint64_t size() const override { return size_; }
  // Unaligned reads are widened to the server's minimum block size here.
  size_t read_alignment() const override { return 1; }
  std::vector<std::string> files() const override { return {}; }

  Result<std::vector<ByteRange>> DataRanges(uint64_t offset, uint64_t length) override {
    if (!has_allocation_) {
      std::vector<ByteRange> ranges;
      AddRange(ranges, offset, std::min(offset + length, size_));
      return ranges;
    }
    return Extents(kBaseAllocation, offset, length,
                   [](uint32_t flags) { return (flags & kStateZero) == 0; });
  }

  Result<std::vector<ByteRange>> DirtyRanges(uint64_t offset, uint64_t length) override {
    if (bitmap_context_.empty()) return Source::DirtyRanges(offset, length);
    return Extents(bitmap_context_.c_str(), offset, length,
                   [](uint32_t flags) { return (flags & kStateDirty) != 0; });
  }

  Status Read(std::span<const io::IoRequest> requests) override;

  Status Close() override {
    for (Handle& handle : handles_) {
      if (handle && nbd_aio_is_ready(handle.get()) == 1) (void)nbd_shutdown(handle.get(), 0);
      handle.reset();
    }
    handles_.clear();
    return Status::OK();
  }

 private:
  // One nbd_aio_pread: where its bytes go and how it ended.
  struct Piece {
    uint8_t* buffer = nullptr;
    uint64_t offset = 0;
    uint64_t length = 0;
    int error = 0;  // errno the server (or libnbd) reported; 0 = read
    bool done = false;
  };

  template <class Wanted>
  Result<std::vector<ByteRange>> Extents(const char* context, uint64_t offset, uint64_t length,
                                         Wanted wanted);
  // Splits [offset, offset + length) (inside the export, aligned to min_block_ or ending at
  // size_) into pieces reading into `buffer`.
  void AddPieces(uint8_t* buffer, uint64_t offset, uint64_t length, std::vector<Piece>& pieces);
  // Issues every piece, keeping up to kMaxInFlightPerConnection in flight per connection,
  // and waits for them all.
  Status ReadPieces(std::vector<Piece>& pieces);
  // Waits until one of the connections with requests in flight made progress.
  Status PollOnce();
  // The connection failed (server killed, reset, shut down) while doing `what`: this and
  // every later call fail, naming the URI and libnbd's cause.
  Status Lost(const std::string& what) {
    return Broken(Status::IOError(fmt::format(
        "{}: the connection to the NBD server was lost while {} ({})", uri_, what, LibnbdError())));
  }
  Status Broken(Status status) {
    if (broken_.ok()) broken_ = status;
    return status;
  }

  const std::string uri_;
  std::vector<Handle> handles_;
  const uint64_t size_;
  const bool has_allocation_;
  const std::string bitmap_context_;  // "" without a bitmap
  uint64_t min_block_ = 1;
  uint64_t piece_bytes_ = kPieceBytes;
  Status broken_;  // set once a connection failed: every later call fails the same way
};

template <class Wanted>
Result<std::vector<ByteRange>> NbdSource::Extents(const char* context, uint64_t offset,
                                                  uint64_t length, Wanted wanted) {
  ZQ_RETURN_IF_ERROR(broken_);
  if (handles_.empty()) return Status::IOError(uri_ + ": the NBD source is closed");
  std::vector<ByteRange> ranges;
  const uint64_t end = std::min(offset + length, size_);
  // The server takes requests aligned to its minimum block size; the export's end need
  // not be.
  uint64_t pos = AlignDown(offset, min_block_);
  struct Reply {
    const char* context;
    std::vector<std::pair<uint64_t, uint32_t>> extents;  // length, flags
    int error = 0;
  } reply{context, {}, 0};
  nbd_extent_callback callback{};
  callback.user_data = &reply;
  callback.callback = [](void* user_data, const char* metacontext, uint64_t, uint32_t* entries,
                         size_t count, int* error) -> int {
    auto* r = static_cast<Reply*>(user_data);
    if (std::strcmp(metacontext, r->context) != 0) return 0;
    if (*error != 0) r->error = *error;
    for (size_t i = 0; i + 1 < count; i += 2) r->extents.emplace_back(entries[i], entries[i + 1]);
    return 0;
  };
  while (pos < end) {
    const uint64_t ask = std::min(AlignUp(end, min_block_), size_) - pos;
    reply.extents.clear();
    reply.error = 0;
    if (nbd_block_status(handles_.front().get(), std::min(ask, kBlockStatusBytes), pos, callback,
                         0) == -1) {
      if (nbd_aio_is_dead(handles_.front().get()) == 1) {
        return Lost(fmt::format("asking block status at offset {}", pos));
      }
      return Status::IOError(
          fmt::format("{}: block status at offset {} failed: {}", uri_, pos, LibnbdError()));
    }
    if (reply.error != 0) {
      return Status::FromErrno(
          reply.error, fmt::format("{}: block status of {} at offset {}", uri_, context, pos));
    }
    const uint64_t start = pos;
    for (const auto& [extent_length, flags] : reply.extents) {
      if (extent_length == 0 || pos >= end) break;
      const uint64_t stop = std::min(pos + extent_length, end);
      if (wanted(flags)) AddRange(ranges, std::max(pos, offset), stop);
      pos = stop;
    }
    if (pos == start) {
      return Status::IOError(
          fmt::format("{}: the NBD server answered block status of {} at "
                      "offset {} with no extent",
                      uri_, context, pos));
    }
  }
  return ranges;
}

void NbdSource::AddPieces(uint8_t* buffer, uint64_t offset, uint64_t length,
                          std::vector<Piece>& pieces) {
  for (uint64_t done = 0; done < length;) {
    const uint64_t piece = std::min(piece_bytes_, length - done);
    pieces.push_back({buffer + done, offset + done, piece, 0, false});
    done += piece;
  }
}

Status NbdSource::Read(std::span<const io::IoRequest> requests) {
  ZQ_RETURN_IF_ERROR(broken_);
  if (handles_.empty()) return Status::IOError(uri_ + ": the NBD source is closed");
  std::vector<Piece> pieces;
  // Requests not aligned to the server's minimum block size read an aligned span into a
  // bounce buffer first (servers may refuse unaligned requests; QEMU's only advertise a
  // minimum above 1 when they open the image with O_DIRECT).
  struct Bounce {
    const io::IoRequest* request;
    uint64_t offset;
    std::vector<uint8_t> bytes;
  };
  std::vector<Bounce> bounces;
  for (const io::IoRequest& request : requests) {
    auto* out = static_cast<uint8_t*>(request.buffer);
    const uint64_t inside =
        request.offset >= size_ ? 0 : std::min<uint64_t>(request.length, size_ - request.offset);
    if (inside < request.length) std::memset(out + inside, 0, request.length - inside);
    if (inside == 0) continue;
    const uint64_t end = request.offset + inside;
    if (request.offset % min_block_ == 0 && (end % min_block_ == 0 || end == size_)) {
      AddPieces(out, request.offset, inside, pieces);
      continue;
    }
    const uint64_t start = AlignDown(request.offset, min_block_);
    const uint64_t stop = std::min(AlignUp(end, min_block_), size_);
    bounces.push_back({&request, start, std::vector<uint8_t>(stop - start)});
  }
  for (Bounce& bounce : bounces) {
    AddPieces(bounce.bytes.data(), bounce.offset, bounce.bytes.size(), pieces);
  }
  ZQ_RETURN_IF_ERROR(ReadPieces(pieces));
  for (const Bounce& bounce : bounces) {
    const io::IoRequest& request = *bounce.request;
    const uint64_t inside = std::min<uint64_t>(request.length, size_ - request.offset);
    std::memcpy(request.buffer, bounce.bytes.data() + (request.offset - bounce.offset), inside);
  }
  return Status::OK();
}

Status NbdSource::ReadPieces(std::vector<Piece>& pieces) {
  nbd_completion_callback completion{};
  completion.callback = [](void* user_data, int* error) -> int {
    auto* piece = static_cast<Piece*>(user_data);
    piece->error = *error;
    piece->done = true;
    return 1;  // retire the command: nobody asks for it by cookie
  };
  Status failure;  // the first failure; no new pieces are issued after it
  size_t next = 0;
  size_t connection = 0;
  for (;;) {
    // Issue pieces round-robin over the connections that have room.
    size_t full = 0;
    while (failure.ok() && next < pieces.size() && full < handles_.size()) {
      nbd_handle* handle = handles_[connection].get();
      connection = (connection + 1) % handles_.size();
      if (nbd_aio_in_flight(handle) >= static_cast<int>(kMaxInFlightPerConnection)) {
        ++full;
        continue;
      }
      full = 0;
      Piece& piece = pieces[next];
      completion.user_data = &piece;
      if (nbd_aio_pread(handle, piece.buffer, piece.length, piece.offset, completion, 0) == -1) {
        if (nbd_aio_is_dead(handle) == 1) {
          failure = Lost(fmt::format("reading {} bytes at offset {}", piece.length, piece.offset));
        } else {
          failure = Status::IOError(fmt::format("{}: reading {} bytes at offset {} failed: {}",
                                                uri_, piece.length, piece.offset, LibnbdError()));
        }
        break;
      }
      ++next;
    }
    bool in_flight = false;
    for (const Handle& handle : handles_) {
      if (nbd_aio_is_dead(handle.get()) != 1 && nbd_aio_in_flight(handle.get()) > 0) {
        in_flight = true;
      }
    }
    if (!in_flight && (next == pieces.size() || !failure.ok())) break;
    if (in_flight) {
      Status status = PollOnce();
      if (!status.ok() && failure.ok()) failure = std::move(status);
    }
  }
  if (!failure.ok()) return failure;
  for (const Piece& piece : pieces) {
    if (piece.error == 0 && piece.done) continue;
    const int error = piece.error != 0 ? piece.error : EIO;
    if (error == ENOTCONN || error == ESHUTDOWN || error == ECONNRESET || error == EPIPE) {
      // The server went away (killed, restarted, shut down) with the read in flight.
      return Broken(Status::IOError(
          fmt::format("{}: the connection to the NBD server was lost while reading {} bytes at "
                      "offset {} ({})",
                      uri_, piece.length, piece.offset, std::strerror(error)),
          error));
    }
    return Status::FromErrno(
        error, fmt::format("{}: reading {} bytes at offset {}", uri_, piece.length, piece.offset));
  }
  return Status::OK();
}

Status NbdSource::PollOnce() {
  std::vector<pollfd> fds;
  std::vector<nbd_handle*> polled;
  for (const Handle& handle : handles_) {
    nbd_handle* h = handle.get();
    if (nbd_aio_is_dead(h) == 1 || nbd_aio_in_flight(h) <= 0) continue;
    const int fd = nbd_aio_get_fd(h);
    const unsigned direction = nbd_aio_get_direction(h);
    if (fd < 0) continue;
    short events = 0;
    if (direction & LIBNBD_AIO_DIRECTION_READ) events |= POLLIN;
    if (direction & LIBNBD_AIO_DIRECTION_WRITE) events |= POLLOUT;
    fds.push_back({fd, events, 0});
    polled.push_back(h);
  }
  if (fds.empty()) return Status::OK();
  int ready;
  do {
    ready = poll(fds.data(), fds.size(), -1);
  } while (ready < 0 && errno == EINTR);
  if (ready < 0) return Status::FromErrno(errno, uri_ + ": waiting for the NBD server");
  Status failure;
  for (size_t i = 0; i < fds.size(); ++i) {
    int rc = 0;
    if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) {
      rc = nbd_aio_notify_read(polled[i]);
    } else if (fds[i].revents & POLLOUT) {
      rc = nbd_aio_notify_write(polled[i]);
    }
    if (rc == -1 && failure.ok()) {
      failure = Lost("reading");
    }
  }
  return failure;
}

// Drives the handshakes of `handles` (started with nbd_aio_connect_uri) until each is
// ready or failed, or `deadline` passes.
void WaitForHandshakes(const std::vector<Handle>& handles,
                       std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    std::vector<pollfd> fds;
    std::vector<nbd_handle*> polled;
    for (const Handle& handle : handles) {
      if (nbd_aio_is_connecting(handle.get()) != 1) continue;
      const int fd = nbd_aio_get_fd(handle.get());
      if (fd < 0) continue;
      const unsigned direction = nbd_aio_get_direction(handle.get());
      short events = 0;
      if (direction & LIBNBD_AIO_DIRECTION_READ) events |= POLLIN;
      if (direction & LIBNBD_AIO_DIRECTION_WRITE) events |= POLLOUT;
      fds.push_back({fd, events, 0});
      polled.push_back(handle.get());
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (fds.empty() || left.count() <= 0) return;
    const int ready = poll(fds.data(), fds.size(), static_cast<int>(left.count()));
    if (ready < 0 && errno != EINTR) return;
    for (size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents & (POLLIN | POLLHUP | POLLERR)) {
        (void)nbd_aio_notify_read(polled[i]);
      } else if (fds[i].revents & POLLOUT) {
        (void)nbd_aio_notify_write(polled[i]);
      }
    }
  }
}

// Connects to `uri` asking for `contexts`. A server that accepts the socket but does not
// answer the handshake (qemu-nbd serving its only client, without -e) fails after
// kConnectTimeout instead of hanging.
Result<Handle> Connect(const std::string& uri, const std::vector<std::string>& contexts) {
  ZQ_ASSIGN_OR_RETURN(Handle handle, NewHandle(uri, contexts));
  if (uri.starts_with("nbds") && nbd_supports_tls(handle.get()) != 1) {
    return Status::NotSupported(uri + ": TLS (nbds://) is not supported by this libnbd");
  }
  std::vector<Handle> handles;
  if (nbd_aio_connect_uri(handle.get(), uri.c_str()) == -1) {
    return Status::IOError(uri + ": cannot connect to the NBD server: " + LibnbdError());
  }
  handles.push_back(std::move(handle));
  WaitForHandshakes(handles, std::chrono::steady_clock::now() + kConnectTimeout);
  nbd_handle* h = handles.front().get();
  if (nbd_aio_is_ready(h) == 1) return std::move(handles.front());
  if (nbd_aio_is_connecting(h) == 1) {
    return Status::IOError(
        fmt::format("{}: cannot connect to the NBD server: no handshake within {} s (does it serve "
                    "another client already? qemu-nbd takes more with -e N)",
                    uri, kConnectTimeout.count()));
  }
  return Status::IOError(uri + ": cannot connect to the NBD server: " + LibnbdError());
}

// Opens up to kMaxConnections - 1 more connections next to the first; keeps those that
// are ready within kExtraConnectTimeout and agree on the size.
void AddConnections(const std::string& uri, const std::vector<std::string>& contexts, uint64_t size,
                    std::vector<Handle>& handles) {
  std::vector<Handle> connecting;
  for (size_t i = 1; i < kMaxConnections; ++i) {
    Result<Handle> handle = NewHandle(uri, contexts);
    if (!handle.ok()) break;
    if (nbd_aio_connect_uri(handle->get(), uri.c_str()) == -1) break;
    connecting.push_back(std::move(handle).value());
  }
  WaitForHandshakes(connecting, std::chrono::steady_clock::now() + kExtraConnectTimeout);
  for (Handle& handle : connecting) {
    if (nbd_aio_is_ready(handle.get()) == 1 &&
        nbd_get_size(handle.get()) == static_cast<int64_t>(size)) {
      handles.push_back(std::move(handle));
    }
  }
}

}  // namespace

bool IsNbdUri(const std::string& path) {
  for (std::string_view scheme : {"nbd://", "nbds://", "nbd+", "nbds+"}) {
    if (path.starts_with(scheme)) return path.find("://") != std::string::npos;
  }
  return false;
}

Result<std::unique_ptr<Source>> OpenNbdSource(const std::string& uri,
                                              const SourceOptions& options) {
  if (!options.format.empty() && options.format != "raw") {
    return Status::InvalidArgument(uri + ": an NBD export is read as raw; format '" +
                                   options.format + "' over NBD is not supported");
  }
  std::vector<std::string> contexts = {kBaseAllocation};
  std::string bitmap_context;
  if (!options.bitmap.empty()) {
    bitmap_context = std::string(kDirtyBitmapPrefix) + options.bitmap;
    contexts.push_back(bitmap_context);
  }
  ZQ_ASSIGN_OR_RETURN(Handle first, Connect(uri, contexts));
  const int64_t size = nbd_get_size(first.get());
  if (size < 0) return Status::IOError(uri + ": cannot get the export size: " + LibnbdError());
  const bool has_allocation = nbd_can_meta_context(first.get(), kBaseAllocation) == 1;
  if (!bitmap_context.empty() && nbd_can_meta_context(first.get(), bitmap_context.c_str()) != 1) {
    return Status::NotFound(uri + ": dirty bitmap '" + options.bitmap +
                            "' is not exported by the server");
  }
  const bool multi_conn = nbd_can_multi_conn(first.get()) == 1;
  std::vector<Handle> handles;
  handles.push_back(std::move(first));
  if (multi_conn) AddConnections(uri, contexts, static_cast<uint64_t>(size), handles);
  return std::unique_ptr<Source>(
      std::make_unique<NbdSource>(uri, std::move(handles), static_cast<uint64_t>(size),
                                  has_allocation, std::move(bitmap_context)));
}

std::string LibnbdError() {
  const char* error = nbd_get_error();
  if (error == nullptr || *error == '\0') return "unknown libnbd error";
  std::string_view text(error);
  if (text.starts_with("nbd_")) {
    const size_t colon = text.find(": ");
    if (colon != std::string_view::npos) text.remove_prefix(colon + 2);
  }
  return std::string(text);
}

}  // namespace zqcow::convert
