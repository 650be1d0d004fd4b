// relay_floor: the cheapest correct TCP relay we know how to write, as a yardstick.
//
// Not part of smtplb and never installed. scripts/bench.py runs it next to smtplb and
// HAProxy (--floor) to show how much of a proxy's cost per session is the kernel's TCP
// work on the two connections, which no relaying proxy can avoid, and how much is the
// proxy's own. It has none of smtplb's features: no SMTP (no greeting check, no retry),
// no health checks, no timeouts, no limits, no log, no metrics, no reload. Backends are
// taken in turn (round robin), and a backend that is down costs the client its session.
//
//   relay_floor PORT BACKEND[,BACKEND...] [plain|splice|sockmap]
//
// BACKEND is IPv4 ADDRESS:PORT. It listens on 127.0.0.1:PORT with one thread and one
// edge-triggered epoll set, and relays each client to a backend:
//   plain    read() and send() through a 16 KiB stack buffer (what smtplb and HAProxy do),
//            with smtplb's packet savings: delayed ACKs (TCP_QUICKACK 0) on the client's
//            socket from the start and on the backend's from the first client bytes, and
//            the FIN in the segment of the last bytes (MSG_MORE)
//   splice   splice() through a pipe per direction, no copy to user space
//   sockmap  after the greeting, a BPF sk_skb verdict program redirects each socket's
//            bytes to its peer inside the kernel (a SOCKHASH keyed by the 4-tuple); user
//            space only passes FIN on once everything received has been written. Needs
//            root (CAP_BPF and CAP_NET_ADMIN).
// A client's FIN is passed to the backend (and the other way) only after the bytes before
// it, so a half-closing peer is served correctly.
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/sockios.h>
#include <linux/tcp.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

enum class Mode { plain, splice, sockmap };

struct Conn {
  int fd = -1;
  Conn* peer = nullptr;
  std::string pending;  // plain: bytes for this fd that it would not take yet
  size_t pending_off = 0;
  int pipe_r = -1, pipe_w = -1;  // splice: the pipe that feeds this fd
  size_t piped = 0;              // bytes in that pipe
  bool connected = false;
  bool active = false;        // we connected it (the backend side)
  bool fin_seen = false;      // an event said EPOLLRDHUP: the peer's FIN is in
  bool greeted = false;       // backend side: bytes from it went to the client from user space
  bool acks_delayed = false;  // TCP_QUICKACK 0 set
  bool eof_in = false;        // read EOF from this fd
  bool shut_out = false;      // shut down this fd's write side
  bool blocked = false;       // not reading: the peer has bytes waiting
  bool in_map = false;
  bool map_refused = false;
  bool draining = false;  // sockmap: EOF seen, waiting for the kernel to write out the rest
  std::chrono::steady_clock::time_point draining_since;
  bool closed = false;
  // sockmap: the 4-tuple key, filled when the socket is made (no extra calls later).
  uint32_t remote_ip4 = 0, local_ip4 = 0;
  uint16_t remote_port = 0, local_port = 0;  // network order, as in sockaddr_in
};

Mode mode = Mode::plain;
int map_fd = -1;
std::vector<sockaddr_in> backends;
size_t next_backend = 0;
std::vector<Conn*> graveyard;  // closed this batch; freed after it
std::vector<Conn*> draining;
constexpr auto kDrainLimit = std::chrono::seconds(10);  // a peer that takes nothing more

struct Key {  // as the verdict program builds it from struct __sk_buff
  uint32_t remote_ip4, local_ip4, remote_port, local_port;
};

long bpf(int cmd, bpf_attr* attr) {
  return syscall(__NR_bpf, cmd, attr, sizeof *attr);
}

[[noreturn]] void die(const char* what) {
  std::perror(what);
  std::exit(1);
}

void setup_sockmap() {
  bpf_attr a{};
  a.map_type = BPF_MAP_TYPE_SOCKHASH;
  a.key_size = sizeof(Key);
  a.value_size = sizeof(uint32_t);
  a.max_entries = 65536;
  map_fd = static_cast<int>(bpf(BPF_MAP_CREATE, &a));
  if (map_fd < 0) die("bpf(BPF_MAP_CREATE)");
  auto ins = [](uint8_t code, uint8_t dst, uint8_t src, int16_t off, int32_t imm) {
    bpf_insn i{};
    i.code = code;
    i.dst_reg = dst & 0xf;
    i.src_reg = src & 0xf;
    i.off = off;
    i.imm = imm;
    return i;
  };
  // An empty skb (a FIN after the data) stays on its socket: redirected, it fails the peer's
  // transmit with EPIPE. Otherwise key = {remote_ip4, local_ip4, remote_port, local_port} of
  // the socket the bytes came in on, and bpf_sk_redirect_hash(skb, map, &key, 0) sends them
  // out through the peer stored there. SK_PASS either way: where the lookup fails, the bytes
  // stay on their socket for read() instead of being dropped.
  const bpf_insn prog[] = {
      ins(BPF_ALU64 | BPF_MOV | BPF_X, 6, 1, 0, 0),
      ins(BPF_LDX | BPF_MEM | BPF_W, 2, 6, offsetof(__sk_buff, len), 0),
      ins(BPF_JMP | BPF_JNE | BPF_K, 2, 0, 2, 0),
      ins(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, SK_PASS),
      ins(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
      ins(BPF_LDX | BPF_MEM | BPF_W, 2, 6, offsetof(__sk_buff, remote_ip4), 0),
      ins(BPF_STX | BPF_MEM | BPF_W, 10, 2, -16, 0),
      ins(BPF_LDX | BPF_MEM | BPF_W, 2, 6, offsetof(__sk_buff, local_ip4), 0),
      ins(BPF_STX | BPF_MEM | BPF_W, 10, 2, -12, 0),
      ins(BPF_LDX | BPF_MEM | BPF_W, 2, 6, offsetof(__sk_buff, remote_port), 0),
      ins(BPF_STX | BPF_MEM | BPF_W, 10, 2, -8, 0),
      ins(BPF_LDX | BPF_MEM | BPF_W, 2, 6, offsetof(__sk_buff, local_port), 0),
      ins(BPF_STX | BPF_MEM | BPF_W, 10, 2, -4, 0),
      ins(BPF_ALU64 | BPF_MOV | BPF_X, 1, 6, 0, 0),
      ins(BPF_LD | BPF_DW | BPF_IMM, 2, BPF_PSEUDO_MAP_FD, 0, map_fd),
      ins(0, 0, 0, 0, 0),
      ins(BPF_ALU64 | BPF_MOV | BPF_X, 3, 10, 0, 0),
      ins(BPF_ALU64 | BPF_ADD | BPF_K, 3, 0, 0, -16),
      ins(BPF_ALU64 | BPF_MOV | BPF_K, 4, 0, 0, 0),
      ins(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_sk_redirect_hash),
      ins(BPF_ALU64 | BPF_MOV | BPF_K, 0, 0, 0, SK_PASS),
      ins(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
  };
  static char log[16384];
  a = bpf_attr{};
  a.prog_type = BPF_PROG_TYPE_SK_SKB;
  a.insns = reinterpret_cast<uintptr_t>(prog);
  a.insn_cnt = sizeof prog / sizeof prog[0];
  a.license = reinterpret_cast<uintptr_t>("GPL");
  a.log_buf = reinterpret_cast<uintptr_t>(log);
  a.log_size = sizeof log;
  a.log_level = 1;
  const int prog_fd = static_cast<int>(bpf(BPF_PROG_LOAD, &a));
  if (prog_fd < 0) {
    std::fprintf(stderr, "%s\n", log);
    die("bpf(BPF_PROG_LOAD)");
  }
  a = bpf_attr{};
  a.target_fd = static_cast<uint32_t>(map_fd);
  a.attach_bpf_fd = static_cast<uint32_t>(prog_fd);
  a.attach_type = BPF_SK_SKB_VERDICT;
  if (bpf(BPF_PROG_ATTACH, &a) != 0) die("bpf(BPF_PROG_ATTACH)");
}

Key key_of(const Conn* c) {
  Key k{};
  k.remote_ip4 = c->remote_ip4;  // network order, as __sk_buff has it
  k.local_ip4 = c->local_ip4;
  k.remote_port = static_cast<uint32_t>(c->remote_port) << 16;  // network order, upper half
  k.local_port = ntohs(c->local_port);                          // host order
  return k;
}

bool map_put(const Key& k, int fd) {
  const uint32_t value = static_cast<uint32_t>(fd);
  bpf_attr a{};
  a.map_fd = static_cast<uint32_t>(map_fd);
  a.key = reinterpret_cast<uintptr_t>(&k);
  a.value = reinterpret_cast<uintptr_t>(&value);
  a.flags = BPF_ANY;
  return bpf(BPF_MAP_UPDATE_ELEM, &a) == 0;
}

void map_delete(const Key& k) {
  bpf_attr a{};
  a.map_fd = static_cast<uint32_t>(map_fd);
  a.key = reinterpret_cast<uintptr_t>(&k);
  bpf(BPF_MAP_DELETE_ELEM, &a);
}

// Hands the pair to the kernel after the server's greeting has gone through user space
// (as smtplb's handoff does), while no bytes wait in user space, so the kernel's bytes
// cannot overtake ours, and while neither side has sent its FIN. Joined any earlier, a
// client that sent QUIT and its FIN before the greeting sometimes never got the greeting:
// the kernel failed its redirect to the client with EPOLLERR. A client that speaks before
// the greeting is left in user space; SMTP clients wait for it.
void join_map(Conn* c) {
  Conn* p = c->peer;
  Conn* server = c->active ? c : p;
  if (mode != Mode::sockmap || c->in_map || c->map_refused || !server->greeted || !c->connected || !p->connected ||
      c->pending.size() > c->pending_off || p->pending.size() > p->pending_off || c->fin_seen || p->fin_seen ||
      c->eof_in || p->eof_in)
    return;
  const Key kc = key_of(c), kp = key_of(p);
  if (map_put(kc, p->fd)) {  // bytes arriving on c leave through its peer
    if (map_put(kp, c->fd)) {
      c->in_map = p->in_map = true;
      return;
    }
    map_delete(kc);
  }
  c->map_refused = p->map_refused = true;
}

// sockmap: everything c received before its FIN has been written to its peer (acknowledged
// or queued). tcpi_bytes_received counts the FIN, and tcpi_bytes_acked counts the SYN of the
// side that connected: both are sequence numbers, not bytes.
bool kernel_drained(const Conn* c) {
  tcp_info in{}, out{};
  socklen_t l1 = sizeof in, l2 = sizeof out;
  int queued = 0;
  if (getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &in, &l1) != 0 ||
      getsockopt(c->peer->fd, IPPROTO_TCP, TCP_INFO, &out, &l2) != 0 || ioctl(c->peer->fd, SIOCOUTQ, &queued) != 0)
    return true;
  return in.tcpi_bytes_received - 1 == out.tcpi_bytes_acked + static_cast<uint64_t>(queued) - (c->peer->active ? 1 : 0);
}

void close_pair(Conn* c) {
  if (c->closed) return;
  for (Conn* x : {c, c->peer}) {
    x->closed = true;
    close(x->fd);
    if (x->pipe_r >= 0) {
      close(x->pipe_r);
      close(x->pipe_w);
    }
    graveyard.push_back(x);
  }
}

bool finished(const Conn* c) {
  return c->eof_in && c->peer->eof_in && c->shut_out && c->peer->shut_out;
}

// c has read EOF: pass it on to the peer once the bytes before it are out.
// A backend still connecting gets it from flush() once connected: shutdown() in SYN_SENT
// would abort the connection.
void pass_fin(Conn* c) {
  Conn* p = c->peer;
  if (p->shut_out || !p->connected || p->pending.size() > p->pending_off || p->piped) return;
  if (c->in_map && !kernel_drained(c)) {
    if (!c->draining) {
      draining.push_back(c);
      c->draining_since = std::chrono::steady_clock::now();
    }
    c->draining = true;
    return;
  }
  shutdown(p->fd, SHUT_WR);
  p->shut_out = true;
}

// Writes what waits for c. 1: all written, 0: would block, -1: error.
int flush(Conn* c) {
  while (c->piped) {
    const ssize_t n = splice(c->pipe_r, nullptr, c->fd, nullptr, c->piped, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n < 0) return errno == EAGAIN ? 0 : -1;
    c->piped -= static_cast<size_t>(n);
  }
  while (c->pending_off < c->pending.size()) {
    const ssize_t n = send(c->fd, c->pending.data() + c->pending_off, c->pending.size() - c->pending_off, MSG_NOSIGNAL);
    if (n < 0) return errno == EAGAIN ? 0 : -1;
    c->pending_off += static_cast<size_t>(n);
  }
  c->pending.clear();
  c->pending_off = 0;
  if (c->peer->eof_in) pass_fin(c->peer);
  return 1;
}

// Moves bytes from c to its peer until c has none or the peer is full. `drain`: read until
// EAGAIN. Otherwise a short read ends it: edge-triggered, more bytes or a FIN make a new
// edge, and after a short read with the FIN already in (EPOLLRDHUP), EOF is next, so the
// read that would return 0 is skipped (as smtplb does). Urgent data makes a read short with
// bytes still queued, so EPOLLPRI asks for `drain`.
void pump(Conn* c, bool drain) {
  Conn* p = c->peer;
  if (c->blocked || c->eof_in || c->closed) return;
  auto eof = [&] {
    c->eof_in = true;
    pass_fin(c);
  };
  if (mode == Mode::splice) {
    if (p->pipe_w < 0) {
      int fds[2];
      if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) return close_pair(c);
      p->pipe_r = fds[0];
      p->pipe_w = fds[1];
    }
    // Always to EAGAIN: a short splice may only mean the pipe's 16 slots are full.
    for (;;) {
      const ssize_t n = splice(c->fd, nullptr, p->pipe_w, nullptr, 1 << 16, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n < 0) {
        if (errno != EAGAIN) close_pair(c);
        return;
      }
      if (n == 0) return eof();
      p->piped += static_cast<size_t>(n);
      const int r = flush(p);
      if (r < 0) return close_pair(c);
      if (r == 0) {
        c->blocked = true;
        return;
      }
    }
  }
  char buf[16384];
  for (;;) {
    const ssize_t n = read(c->fd, buf, sizeof buf);
    if (n < 0) {
      if (errno != EAGAIN) return close_pair(c);
      // A socket in the sockmap reads EAGAIN, not 0, after its FIN: the event said it.
      if (c->in_map && c->fin_seen) eof();
      return;
    }
    if (n == 0) return eof();
    const bool drained = !drain && static_cast<size_t>(n) < sizeof buf;
    // A short read with the FIN in: these are the last bytes, and MSG_MORE lets the FIN
    // that pass_fin() sends next ride in the same segment.
    const bool last = drained && c->fin_seen;
    if (!c->active && !p->acks_delayed) {
      // Delayed ACKs towards the backend from the first client bytes on, as smtplb does
      // (not before: a backend writing its greeting in pieces with Nagle would wait).
      const int zero = 0;
      setsockopt(p->fd, IPPROTO_TCP, TCP_QUICKACK, &zero, sizeof zero);
      p->acks_delayed = true;
    }
    ssize_t sent = 0;
    if (p->pending.empty()) {
      sent = send(p->fd, buf, static_cast<size_t>(n), MSG_NOSIGNAL | (last ? MSG_MORE : 0));
      if (sent < 0) {
        if (errno != EAGAIN) return close_pair(c);
        sent = 0;
      }
    }
    c->greeted = c->greeted || c->active;
    if (sent < n) {
      p->pending.append(buf + sent, static_cast<size_t>(n - sent));
      c->blocked = true;
      return;
    }
    if (drained) {
      if (last) eof();
      return;
    }
  }
}

void on_event(Conn* c, uint32_t events) {
  if (c->closed) return;
  if (events & EPOLLRDHUP) c->fin_seen = true;
  if (!c->connected) {
    // Connected when writable without an error; the error itself is not needed here.
    if (events & (EPOLLERR | EPOLLHUP)) return close_pair(c);
    if (!(events & EPOLLOUT)) return;
    c->connected = true;
  }
  if (events & EPOLLOUT) {
    const int r = flush(c);
    if (r < 0) return close_pair(c);
    if (r == 1 && c->peer->blocked) {
      c->peer->blocked = false;
      pump(c->peer, true);
    }
  }
  if (!c->closed && (events & (EPOLLIN | EPOLLRDHUP | EPOLLPRI | EPOLLHUP | EPOLLERR)))
    pump(c, (events & (EPOLLPRI | EPOLLHUP | EPOLLERR)) != 0);
  if (!c->closed && finished(c)) close_pair(c);
  if (!c->closed) join_map(c);
}

sockaddr_in parse_ipv4(const std::string& s) {
  sockaddr_in a{};
  const size_t colon = s.rfind(':');
  a.sin_family = AF_INET;
  if (colon == std::string::npos || inet_pton(AF_INET, s.substr(0, colon).c_str(), &a.sin_addr) != 1) {
    std::fprintf(stderr, "relay_floor: not IPV4:PORT: %s\n", s.c_str());
    std::exit(2);
  }
  a.sin_port = htons(static_cast<uint16_t>(std::atoi(s.c_str() + colon + 1)));
  return a;
}

void accept_all(int listen_fd, const sockaddr_in& listen_addr, int ep) {
  const int one = 1;
  for (;;) {
    sockaddr_in peer{};
    socklen_t peer_len = sizeof peer;
    const int cfd = accept4(listen_fd, reinterpret_cast<sockaddr*>(&peer), &peer_len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (cfd < 0) return;
    const int sfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (sfd < 0) {
      close(cfd);
      continue;
    }
    setsockopt(sfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    // The ACK of the client's first command rides on the reply, as in smtplb.
    const int zero = 0;
    setsockopt(cfd, IPPROTO_TCP, TCP_QUICKACK, &zero, sizeof zero);
    const sockaddr_in& b = backends[next_backend++ % backends.size()];
    if (connect(sfd, reinterpret_cast<const sockaddr*>(&b), sizeof b) != 0 && errno != EINPROGRESS) {
      close(cfd);
      close(sfd);
      continue;
    }
    Conn* client = new Conn;
    Conn* server = new Conn;
    if (mode == Mode::sockmap) {
      sockaddr_in local{};
      socklen_t len = sizeof local;
      getsockname(sfd, reinterpret_cast<sockaddr*>(&local), &len);  // the port connect() chose
      server->remote_ip4 = b.sin_addr.s_addr;
      server->remote_port = b.sin_port;
      server->local_ip4 = local.sin_addr.s_addr;
      server->local_port = local.sin_port;
      client->remote_ip4 = peer.sin_addr.s_addr;
      client->remote_port = peer.sin_port;
      client->local_ip4 = listen_addr.sin_addr.s_addr;
      client->local_port = listen_addr.sin_port;
    }
    client->fd = cfd;
    server->fd = sfd;
    client->peer = server;
    server->peer = client;
    client->connected = true;
    server->active = true;
    epoll_event e{};
    e.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET;
    e.data.ptr = client;
    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &e);
    e.data.ptr = server;
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &e);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: relay_floor PORT BACKEND[,BACKEND...] [plain|splice|sockmap]\n");
    return 2;
  }
  const std::string m = argc > 3 ? argv[3] : "plain";
  if (m == "splice")
    mode = Mode::splice;
  else if (m == "sockmap")
    mode = Mode::sockmap;
  else if (m != "plain") {
    std::fprintf(stderr, "relay_floor: unknown mode %s\n", m.c_str());
    return 2;
  }
  std::string list = argv[2];
  for (size_t start = 0; start <= list.size();) {
    size_t comma = list.find(',', start);
    if (comma == std::string::npos) comma = list.size();
    backends.push_back(parse_ipv4(list.substr(start, comma - start)));
    start = comma + 1;
  }
  if (mode == Mode::sockmap) setup_sockmap();
  std::signal(SIGPIPE, SIG_IGN);  // splice() to a closed peer has no MSG_NOSIGNAL

  const int one = 1;
  const int listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  setsockopt(listen_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // accepted sockets inherit it
  sockaddr_in la{};
  la.sin_family = AF_INET;
  la.sin_port = htons(static_cast<uint16_t>(std::atoi(argv[1])));
  la.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(listen_fd, reinterpret_cast<sockaddr*>(&la), sizeof la) != 0 || listen(listen_fd, 4096) != 0) die("listen");
  const int ep = epoll_create1(EPOLL_CLOEXEC);
  epoll_event e{};
  e.events = EPOLLIN;
  e.data.ptr = nullptr;
  epoll_ctl(ep, EPOLL_CTL_ADD, listen_fd, &e);

  epoll_event events[256];
  for (;;) {
    const int n = epoll_wait(ep, events, 256, draining.empty() ? -1 : 1);
    for (int i = 0; i < n; ++i) {
      if (events[i].data.ptr == nullptr)
        accept_all(listen_fd, la, ep);
      else
        on_event(static_cast<Conn*>(events[i].data.ptr), events[i].events);
    }
    // sockmap: pass on the FINs whose bytes the kernel has written out since. An entry
    // whose FIN flush() passed on meanwhile is done: kernel_drained() never holds again
    // once the peer's own FIN counts in its sequence numbers. pass_fin() may list c anew.
    std::vector<Conn*> waiting;
    waiting.swap(draining);
    const auto now = std::chrono::steady_clock::now();
    for (Conn* c : waiting) {
      if (c->closed) continue;
      if (!c->peer->shut_out && !kernel_drained(c)) {
        if (now - c->draining_since > kDrainLimit)
          close_pair(c);
        else
          draining.push_back(c);
        continue;
      }
      c->draining = false;
      pass_fin(c);
      if (!c->closed && finished(c)) close_pair(c);
    }
    // An entry kept above whose pair closed later (its peer's entry finished it) is freed
    // below: no entry may outlive its Conn, or a new Conn in the same memory inherits it.
    std::erase_if(draining, [](const Conn* c) { return c->closed; });
    for (Conn* c : graveyard) delete c;
    graveyard.clear();
  }
}
