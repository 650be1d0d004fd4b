#pragma once
// The relay's mechanics, apart from any decision: one socket of a session in the
// worker's edge-triggered epoll set, its output queue under backpressure, reads in
// bursts, and a FIN sent only after everything queued. What the bytes mean and when to
// pause, resume or close is the session core's business (smtplb/session/session_core.hpp).
#include <sys/epoll.h>
#include <sys/types.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace smtplb {

class Session;

// Bytes a receiver could not take at once, in arrival order; allocated only under
// backpressure.
struct OutChunk {
  OutChunk* next;
  size_t off;
  size_t len;
  char data[1];
};

// One socket of a session (the client's, or one backend attempt's), registered once in
// its worker's edge-triggered epoll set and removed by close(). See Worker::dispatch.
struct Conn {
  int fd = -1;
  bool reading = false;       // events lead to reads; false while paused (backpressure,
                              // hold limit), before the connect completes, and after EOF
  bool shut_pending = false;  // shutdown(SHUT_WR) once the output queue is flushed
  Session* owner = nullptr;   // cleared when the session lets go of it
  OutChunk* out_head = nullptr;
  OutChunk* out_tail = nullptr;
  bool blocked() const { return out_head != nullptr; }
};

namespace relay {

// What send() and flush() report besides an errno (same values as SessionCore's).
inline constexpr int kSent = 0;
inline constexpr int kQueued = -1;

// Sends `bytes` after anything already queued; what the socket cannot take now is
// queued (its EPOLLOUT edge calls flush()). kSent, kQueued, or an errno (ENOMEM: the
// queue could not grow). `more`: a FIN follows at once, so both may share a segment.
int send(Conn& c, std::string_view bytes, bool more);
// Writes what is queued: kSent once all is out (and a pending FIN sent), kQueued while
// the socket is still full, or an errno.
int flush(Conn& c);
// FIN after whatever is queued.
void shutdown_after_flush(Conn& c);
// Closes the socket (which leaves the epoll set) and frees its queue.
void close(Conn& c);

// Reads per event before a socket yields to the others (each up to the scratch size).
inline constexpr int kReadBurst = 16;

// Reads what `c` has into `buf` and reports it to `sink`: data(bytes, len, eof_follows)
// and end(err) (0 for EOF). `events` are the epoll flags that announced it. Stops when
// sink.go_on() turns false (the owner paused or closed the socket). Returns true when
// the burst ended with bytes still unread (the caller re-arms the socket).
template <typename Sink>
bool read_burst(Conn& c, uint32_t events, char* buf, size_t cap, Sink&& sink);

// ---- implementation ----

template <typename Sink>
bool read_burst(Conn& c, uint32_t events, char* buf, size_t cap, Sink&& sink) {
  for (int i = 0; i < kReadBurst; ++i) {
    const ssize_t n = ::read(c.fd, buf, cap);
    if (n > 0) {
      // A short read emptied the socket (unless urgent data cut it short); with RDHUP in
      // the event the FIN is next (unless an error came too: then read on and report it).
      const bool drained = size_t(n) < cap && !(events & EPOLLPRI);
      const bool eof = drained && (events & EPOLLRDHUP) && !(events & EPOLLERR);
      sink.data(buf, size_t(n), eof);
      if (!sink.go_on()) return false;
      if (!drained) continue;
      if (eof) sink.end(0);
      return false;
    }
    if (n == 0) {
      sink.end(0);
      return false;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
    sink.end(errno);
    return false;
  }
  return true;  // still more to read: let the other sockets have their turn
}

}  // namespace relay
}  // namespace smtplb
