#include "data/relay.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace smtplb::relay {

int send(Conn& c, std::string_view bytes, bool more) {
  size_t done = 0;
  if (!c.blocked()) {
    const ssize_t r = ::send(c.fd, bytes.data(), bytes.size(), MSG_NOSIGNAL | (more ? MSG_MORE : 0));
    if (r == ssize_t(bytes.size())) return kSent;
    if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) return errno;
    done = r > 0 ? size_t(r) : 0;
  }
  // The receiver is slow: keep the rest. The socket's EPOLLOUT edge (it is in the set for
  // both directions from the start) calls flush().
  const size_t rest = bytes.size() - done;
  auto* o = static_cast<OutChunk*>(std::malloc(offsetof(OutChunk, data) + rest));
  if (!o) return ENOMEM;
  o->next = nullptr;
  o->off = 0;
  o->len = rest;
  std::memcpy(o->data, bytes.data() + done, rest);
  if (c.out_tail)
    c.out_tail->next = o;
  else
    c.out_head = o;
  c.out_tail = o;
  return kQueued;
}

int flush(Conn& c) {
  while (OutChunk* o = c.out_head) {
    const ssize_t r = ::send(c.fd, o->data + o->off, o->len - o->off, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return kQueued;
      return errno;
    }
    o->off += size_t(r);
    if (o->off < o->len) continue;  // partial: try again, an EAGAIN arms the next edge
    c.out_head = o->next;
    if (!c.out_head) c.out_tail = nullptr;
    std::free(o);
  }
  if (c.shut_pending) {
    c.shut_pending = false;
    ::shutdown(c.fd, SHUT_WR);
  }
  return kSent;
}

void shutdown_after_flush(Conn& c) {
  if (c.blocked())
    c.shut_pending = true;
  else
    ::shutdown(c.fd, SHUT_WR);
}

void close(Conn& c) {
  c.owner = nullptr;
  c.reading = false;
  if (c.fd >= 0) ::close(c.fd);  // also leaves the epoll set
  c.fd = -1;
  while (OutChunk* o = c.out_head) {
    c.out_head = o->next;
    std::free(o);
  }
  c.out_tail = nullptr;
}

}  // namespace smtplb::relay
