#include "data/session.hpp"

#include <spdlog/spdlog.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "data/worker.hpp"
#include "runtime/uv_util.hpp"
#include "smtplb/proto/proxy_protocol.hpp"
#include "smtplb/proto/smtp_reply.hpp"

namespace smtplb {

namespace {

// Client bytes held before the server has greeted (a client that talks first is
// misbehaving; it gets paused rather than buffered without bound).
constexpr size_t kHoldLimit = 4096;
// Longest first greeting line accepted from a server.
constexpr size_t kGreetingLineLimit = 2048;
// After smtplb's own 421 and FIN, how long to wait for the client to close, so the
// reply is not destroyed by a reset from unread client bytes.
constexpr uint64_t kReplyLingerMs = 5000;
// After the server closed and its last bytes were sent on, how long the client may keep
// its side open.
constexpr uint64_t kFinLingerMs = 5000;
// An upstream balancer sends its PROXY header at once; one that does not within this
// time is misconfigured or hostile.
constexpr uint64_t kProxyHeaderTimeoutMs = 5000;

// Reads per event before a socket yields to the others (each up to the 64 KiB scratch).
constexpr int kReadBurst = 16;

void set_nodelay(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// SMTP is lockstep: whatever smtplb reads, it answers soon (it forwards the command, then
// the reply comes back the other way). Delayed-ACK ("pingpong") mode lets the ACK ride on
// that answer instead of costing a packet of its own; Linux enters the mode by itself only
// after the first exchange. Set on the client's socket at the handoff, and on the
// server's when the first client bytes go to it (where Linux itself starts counting): not
// before connect (a delayed final handshake ACK would stall a server that speaks first),
// and not while the greeting may still come (a server that writes a multi-line greeting
// in pieces with Nagle on would wait for our delayed ACK).
void delay_acks(int fd) {
  const int zero = 0;
  ::setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &zero, sizeof zero);
}

// libuv's error codes are negated errno values on Unix; the rest of smtplb speaks them.
int uv_code(int err) {
  return -err;
}

}  // namespace

Session::Session(Worker& worker, std::shared_ptr<const Snapshot> snapshot, ListenerRuntime& listener)
    : worker_(worker),
      snap_(std::move(snapshot)),
      listener_(listener),
      pool_(*snap_->pools[listener.pool].cfg),
      pool_index_(listener.pool) {
  uv_timer_init(worker_.loop(), &timer_);
  client_.owner = this;
  timer_.data = this;
  pending_closes_ = 1;  // timer_
  worker_.link(this);
}

Session::~Session() {
  if (counted_) {
    listener_.state->current.fetch_sub(1, std::memory_order_relaxed);
    worker_.link().connections.fetch_sub(1, std::memory_order_relaxed);
  }
  worker_.unlink(this);
}

void Session::start(int fd, const SocketAddress& peer) {
  const uint64_t now = uv_now(worker_.loop());
  t_accept_ = last_activity_ = now;
  peer_ = peer;  // from accept4: no getpeername call
  client_.fd = fd;
  counted_ = true;  // the worker counted it against the limits (Worker::on_readable)
  bump(listener_.state->per_worker[worker_.index()].connections);
  if (!worker_.watch(client_)) {
    // The epoll set is full (fs.epoll.max_user_watches): say so, best effort, and close.
    const std::string text = service_unavailable_reply(snap_->config->global.hostname);
    (void)!::send(fd, text.data(), text.size(), MSG_NOSIGNAL);
    finish({Cause::resource, Phase::connect});
    return;
  }
  // TCP_NODELAY comes from the listening socket.
  client_.reading = true;
  if (listener_.cfg->proxy_protocol != ProxyIn::none) {
    const auto& trusted = listener_.cfg->trusted_proxies;
    if (std::none_of(trusted.begin(), trusted.end(), [&](const Cidr& c) { return c.contains(peer_); })) {
      refuse_proxy("sender is not in trusted_proxies", {Cause::proxy, Phase::proxy_header});
      return;
    }
    state_ = State::proxy_header;
    arm_timer(kProxyHeaderTimeoutMs);
    return;
  }
  next_attempt();
}

void Session::proxy_header_data() {
  const ProxyIn want = listener_.cfg->proxy_protocol;
  const auto accept = want == ProxyIn::v1   ? proxy::Accept::v1
                      : want == ProxyIn::v2 ? proxy::Accept::v2
                                            : proxy::Accept::any;
  proxy::ParseResult r = proxy::parse(held_, accept);
  if (r.status == proxy::ParseResult::Status::need_more) return;
  if (r.status == proxy::ParseResult::Status::error) {
    refuse_proxy("malformed PROXY header: " + r.error, {Cause::proxy, Phase::proxy_header});
    return;
  }
  held_.erase(0, r.consumed);
  if (r.header.local) {
    // The upstream balancer's own connection (its health check, typically): relayed, and
    // passed on as LOCAL too, so no backend mistakes a balancer for the client.
    proxy_local_ = true;
  } else {
    peer_ = r.header.source;
    local_ = r.header.destination;
  }
  if (held_.size() >= kHoldLimit) pause_client();
  next_attempt();
}

void Session::refuse_proxy(const std::string& why, TermCode term) {
  listener_.state->rejected_proxy.fetch_add(1, std::memory_order_relaxed);
  const int64_t now = int64_t(uv_now(worker_.loop()));
  int64_t last = listener_.state->last_proxy_log_ms.load(std::memory_order_relaxed);
  if (now - last >= 1000 && listener_.state->last_proxy_log_ms.compare_exchange_strong(last, now))
    worker_.log(spdlog::level::warn,
                "listener {}: closing connection from {}: {} (further ones within a second are only counted)",
                listener_.cfg->name, peer_.to_string(), why);
  finish(term);
}

void Session::kill() {
  const Phase phase = state_ == State::relaying       ? Phase::data
                      : state_ == State::greeting     ? Phase::greeting
                      : state_ == State::queued       ? Phase::queue
                      : state_ == State::proxy_header ? Phase::proxy_header
                                                      : Phase::connect;
  finish({Cause::killed, phase});
}

void Session::drain() {
  switch (state_) {
    case State::proxy_header:
      finish({Cause::killed, Phase::proxy_header});
      break;
    case State::queued:
    case State::connecting:
    case State::greeting:
      reply_unavailable({Cause::killed, state_ == State::queued     ? Phase::queue
                                        : state_ == State::greeting ? Phase::greeting
                                                                    : Phase::connect});
      break;
    case State::relaying:
    case State::replying:
    case State::closing:
      break;
  }
}

// ---- socket events --------------------------------------------------------------------

void Session::io(Conn& c, uint32_t events) {
  const bool upstream = &c != &client_;
  if (upstream && state_ == State::connecting) {
    if (events & (EPOLLERR | EPOLLHUP)) {
      int err = 0;
      socklen_t len = sizeof err;
      if (::getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err == 0) err = ECONNREFUSED;
      connected(uv_code(err));
      return;
    }
    if (!(events & EPOLLOUT)) return;
    connected(0);
    // The greeting may have come with the connect's completion (same event).
    if (state_ == State::closing || !up_ || &up_->conn != &c) return;
  }
  if (c.blocked() && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
    flush(c);
    if (state_ == State::closing || c.owner != this) return;
  }
  if (c.reading && (events & (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLERR | EPOLLHUP))) read_from(c, events);
}

void Session::read_from(Conn& c, uint32_t events) {
  const bool upstream = &c != &client_;
  char* buf = worker_.scratch();
  for (int i = 0; i < kReadBurst; ++i) {
    const ssize_t n = ::read(c.fd, buf, Worker::kScratchSize);
    if (n > 0) {
      // A short read emptied the socket (unless urgent data cut it short); with RDHUP in
      // the event the FIN is next (unless an error came too: then read on and report it).
      const bool drained = size_t(n) < Worker::kScratchSize && !(events & EPOLLPRI);
      const bool eof = drained && (events & EPOLLRDHUP) && !(events & EPOLLERR);
      if (upstream)
        upstream_data(buf, size_t(n), eof);
      else
        client_data(buf, size_t(n), eof);
      if (state_ == State::closing || c.owner != this || !c.reading) return;
      if (!drained) continue;
      if (eof) {
        if (upstream)
          upstream_end(UV_EOF);
        else
          client_end(UV_EOF);
      }
      return;
    }
    if (n == 0) {
      if (upstream)
        upstream_end(UV_EOF);
      else
        client_end(UV_EOF);
      return;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return;
    if (upstream)
      upstream_end(uv_code(errno));
    else
      client_end(uv_code(errno));
    return;
  }
  // Still more to read: let the other sockets have their turn and come back.
  worker_.rearm(c);
}

// ---- client side ----------------------------------------------------------------------

void Session::client_data(const char* data, size_t len, bool eof_follows) {
  bytes_in_ += len;
  last_activity_ = uv_now(worker_.loop());
  switch (state_) {
    case State::relaying:
      forward(false, data, len, eof_follows);
      break;
    case State::proxy_header:
      held_.append(data, len);
      proxy_header_data();
      break;
    case State::queued:
    case State::connecting:
    case State::greeting:
      held_.append(data, len);
      if (held_.size() >= kHoldLimit) pause_client();
      break;
    case State::replying:
    case State::closing:
      break;  // discarded: the session is over
  }
}

void Session::client_end(ssize_t status) {
  client_eof_ = true;
  client_.reading = false;  // nothing more to read
  // A client that half-closes after talking first (`printf ... | nc -N`) still wants its
  // answers: deliver what it sent after the greeting, then forward the FIN.
  if (status == UV_EOF && !held_.empty() && state_ != State::proxy_header &&
      (state_ == State::queued || state_ == State::connecting || state_ == State::greeting))
    return;
  switch (state_) {
    case State::proxy_header:
      finish({Cause::client, Phase::proxy_header});
      break;
    case State::queued:
      finish({Cause::client, Phase::queue});
      break;
    case State::connecting:
      if (up_ && pool_.proxy_protocol != ProxyOut::none) {
        // The backend may already have accepted us: a PROXY server that then reads EOF
        // before the header warns about a broken upstream (Postfix: "haproxy read: EOF").
        // Finish the connect, send the header and close, so it ends like any client that
        // left after connecting. connect_timeout still bounds the wait.
        client_gone_ = true;
        return;
      }
      finish({Cause::client, Phase::connect});
      break;
    case State::greeting:
      finish({Cause::client, Phase::greeting});
      break;
    case State::relaying:
      if (status != UV_EOF) {
        finish({Cause::client, Phase::data});
        return;
      }
      // The server closed already: when the session ends right now, close() sends the
      // FIN (after any bytes still corked by MSG_MORE).
      if (!upstream_eof_ || !done_when_flushed()) half_close(false);
      maybe_done();
      break;
    case State::replying:
      finish(term_);
      break;
    case State::closing:
      break;
  }
}

// ---- server side ----------------------------------------------------------------------

void Session::next_attempt() {
  if (tries_ > pool_.retries) {
    leave_queue();
    reply_unavailable(term_);
    return;
  }
  const Selection p = worker_.pick(snap_->pools[pool_index_], std::span<const uint32_t>(tried_.data(), tries_));
  if (p.index) {
    leave_queue();
    connect_to(*p.index);
    return;
  }
  if (p.all_full && pool_.queue_timeout.count() > 0) {
    if (!in_queue_) {
      in_queue_ = true;
      state_ = State::queued;
      t_queued_ = uv_now(worker_.loop());
      arm_timer(uint64_t(pool_.queue_timeout.count()));
      // May hand this session (or an older waiter) a slot freed meanwhile, right away.
      worker_.enqueue(this, snap_->pools[pool_index_].state);
    }
    return;
  }
  leave_queue();
  if (p.all_full) {
    term_ = {Cause::server_timeout, Phase::queue};
    snap_->pools[pool_index_].state->queue_timeouts.fetch_add(1, std::memory_order_relaxed);
  } else if (tries_ == 0) {
    term_ = {Cause::server, Phase::connect};
  }
  reply_unavailable(term_);
}

bool Session::retry_from_queue() {
  next_attempt();
  return !in_queue_;
}

void Session::leave_queue() {
  if (!in_queue_) return;
  in_queue_ = false;
  worker_.dequeue(this, *snap_->pools[pool_index_].state);
  tw_ += int64_t(uv_now(worker_.loop()) - t_queued_);
}

void Session::release_server(const std::shared_ptr<ServerRuntime>& server) {
  if (server->release()) worker_.slot_freed(*server->pool_state);
}

void Session::connect_to(size_t index) {
  tried_[tries_++] = uint32_t(index);
  const auto& server = snap_->pools[pool_index_].servers[index];
  server_name_ = &server->cfg.name;

  up_ = new Upstream;
  up_->conn.owner = this;
  up_->server = server;
  state_ = State::connecting;
  t_attempt_ = uv_now(worker_.loop());
  tc_ = tb_ = -1;
  const sockaddr* sa = server->cfg.addr.sa();
  int rc = 0;
  const int fd = ::socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    rc = uv_code(errno);
  } else {
    up_->conn.fd = fd;
    set_nodelay(fd);
    if (::connect(fd, sa, server->cfg.addr.len) != 0 && errno != EINPROGRESS)
      rc = uv_code(errno);
    else if (!worker_.watch(up_->conn))
      rc = UV_ENOMEM;  // epoll set full: ours, not the server's
  }
  if (rc == UV_EMFILE || rc == UV_ENFILE || rc == UV_ENOBUFS || rc == UV_ENOMEM || rc == UV_EADDRNOTAVAIL) {
    // Out of descriptors, memory or source ports here: not the server's fault, so no
    // passive failure and no retry on another server that would fail the same way.
    last_failure_ = std::string("connect: ") + uv_strerror(rc);
    abandon_upstream();
    reply_unavailable({Cause::resource, Phase::connect});
    return;
  }
  if (rc < 0) {
    attempt_failed({Cause::server, Phase::connect}, ConnError::refused, std::string("connect: ") + uv_strerror(rc));
    return;
  }
  arm_timer(uint64_t(pool_.connect_timeout.count()));
}

void Session::connected(int status) {
  if (state_ != State::connecting) return;
  if (status < 0) {
    const ConnError kind = status == UV_ETIMEDOUT    ? ConnError::timeout
                           : status == UV_ECONNRESET ? ConnError::reset
                                                     : ConnError::refused;
    attempt_failed({status == UV_ETIMEDOUT ? Cause::server_timeout : Cause::server, Phase::connect}, kind,
                   std::string("connect: ") + uv_strerror(status));
    return;
  }
  tc_ = int64_t(uv_now(worker_.loop()) - t_attempt_);
  if (pool_.proxy_protocol != ProxyOut::none) {
    // Written before anything else; a PROXY-aware server reads it before it greets.
    if (local_.len == 0) {  // looked up only when needed (and unless a PROXY header gave it)
      socklen_t len = sizeof local_.storage;
      if (::getsockname(client_.fd, reinterpret_cast<sockaddr*>(&local_.storage), &len) == 0) local_.len = len;
    }
    proxy::Header h;
    h.local = proxy_local_;
    h.source = peer_;
    h.destination = local_;
    const std::string header =
        proxy::encode(pool_.proxy_protocol == ProxyOut::v1 ? proxy::Version::v1 : proxy::Version::v2, h);
    // A failed write fails this attempt (forward() says so), not the session.
    if (!forward(false, header.data(), header.size())) return;
    if (client_gone_) {
      // Header out, then our FIN (close() sends it after the queued bytes, if any).
      finish({Cause::client, Phase::connect});
      return;
    }
  }
  up_->conn.reading = true;
  last_activity_ = uv_now(worker_.loop());
  if (pool_.handoff == Handoff::connect) {
    handoff(nullptr, 0);
    return;
  }
  state_ = State::greeting;
  arm_timer(uint64_t(pool_.banner_timeout.count()));
}

void Session::upstream_data(const char* data, size_t len, bool eof_follows) {
  last_activity_ = uv_now(worker_.loop());
  if (state_ == State::relaying) {
    bytes_out_ += len;
    forward(true, data, len, eof_follows);
    return;
  }
  if (state_ != State::greeting) return;
  // The first line decides; it almost always arrives in one read, so the common path
  // copies nothing.
  std::string_view chunk(data, len);
  size_t nl = chunk.find('\n');
  if (nl == std::string_view::npos) {
    if (greeting_.size() + len > kGreetingLineLimit) {
      attempt_failed({Cause::server, Phase::greeting}, ConnError::banner,
                     "greeting line longer than " + std::to_string(kGreetingLineLimit) + " bytes");
      return;
    }
    greeting_.append(data, len);
    return;
  }
  bool ok;
  if (greeting_.empty()) {
    ok = is_positive_greeting(chunk.substr(0, nl));
  } else {
    greeting_.append(data, nl);
    ok = is_positive_greeting(greeting_);
    greeting_.append(data + nl, len - nl);
  }
  if (!ok) {
    std::string line = greeting_.empty() ? std::string(chunk.substr(0, nl)) : greeting_.substr(0, greeting_.find('\n'));
    attempt_failed({Cause::server, Phase::greeting}, ConnError::banner, "greeting " + printable(line));
    return;
  }
  if (greeting_.empty()) {
    handoff(data, len);
  } else {
    std::string all = std::move(greeting_);
    greeting_.clear();
    handoff(all.data(), all.size());
  }
}

void Session::upstream_end(ssize_t status) {
  switch (state_) {
    case State::connecting:
    case State::greeting:
      attempt_failed({Cause::server, Phase::greeting}, status == UV_ECONNRESET ? ConnError::reset : ConnError::banner,
                     status == UV_EOF ? std::string("closed before greeting")
                                      : std::string("greeting: ") + uv_strerror(int(status)));
      break;
    case State::relaying:
      upstream_eof_ = true;
      if (up_) up_->conn.reading = false;
      if (status != UV_EOF) {
        finish({Cause::server, Phase::data});
        return;
      }
      // When the client has closed too and nothing waits to be sent, the session ends
      // right now and close() itself sends the FIN (in the same segment as the last bytes
      // when they are still corked).
      if (!client_eof_ || !done_when_flushed()) half_close(true);
      maybe_done();
      // The server has ended the SMTP session; give the client a short while to read the
      // rest and close, rather than its whole idle timeout.
      if (state_ == State::relaying) arm_timer(kFinLingerMs);
      break;
    case State::proxy_header:
    case State::queued:  // no backend connection while queued
    case State::replying:
    case State::closing:
      break;
  }
}

void Session::attempt_failed(TermCode term, ConnError kind, const std::string& why) {
  if (client_gone_) {
    // Nobody to retry for: the attempt only went on to end cleanly for the backend.
    if (up_) worker_.report_failure(up_->server, pool_.health_check.fall, why);
    finish({Cause::client, Phase::connect});
    return;
  }
  if (up_) bump(up_->server->per_worker[worker_.index()].errors[size_t(kind)]);
  worker_.log(spdlog::level::debug, "client {}: server {} failed ({}), try {} of {}", peer_.to_string(),
              up_ ? std::string_view(up_->server->label) : std::string_view("?"), why, tries_, pool_.retries + 1);
  term_ = term;
  last_failure_ = why;
  if (up_) worker_.report_failure(up_->server, pool_.health_check.fall, why);
  abandon_upstream();
  greeting_.clear();
  next_attempt();
}

void Session::abandon_upstream() {
  if (!up_) return;
  Upstream* up = up_;
  up_ = nullptr;
  close_conn(up->conn);
  release_server(up->server);
  worker_.retire(up);
}

void Session::close_conn(Conn& c) {
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

void Session::handoff(const char* data, size_t len) {
  const uint64_t now = uv_now(worker_.loop());
  tb_ = int64_t(now - t_attempt_) - tc_;
  state_ = State::relaying;
  term_ = {Cause::none, Phase::none};
  relayed_ = up_->server.get();
  delay_acks(client_.fd);
  ServerWorkerCounters& sc = relayed_->per_worker[worker_.index()];
  bump(sc.sessions);
  sc.connect.observe(kLatencyBounds, double(tc_ + tb_) / 1000.0);
  if (up_->server->passive_failures.load(std::memory_order_relaxed))
    up_->server->passive_failures.store(0, std::memory_order_relaxed);
  if (len) {
    bytes_out_ += len;
    if (!forward(true, data, len)) return;
  }
  if (!held_.empty()) {
    std::string held = std::move(held_);
    held_ = std::string();
    if (!forward(false, held.data(), held.size())) return;
  }
  if (client_eof_)
    half_close(false);
  else if (!up_->conn.blocked())
    resume_client();
  arm_idle_timer();
}

// ---- replies from smtplb itself ---------------------------------------------------------

void Session::reply_unavailable(TermCode term) {
  std::string text = service_unavailable_reply(snap_->config->global.hostname);
  leave_queue();
  abandon_upstream();
  term_ = term;
  note_refusal(term);
  if (client_eof_ && held_.empty()) {
    finish(term);  // the client is gone
    return;
  }
  state_ = State::replying;
  held_ = std::string();
  resume_client();  // read and discard until the client's FIN
  bytes_out_ += text.size();
  if (!forward(true, text.data(), text.size())) return;
  half_close(true);
  // A half-closed client will send no FIN: end once ours is out.
  arm_timer(client_eof_ ? 0 : kReplyLingerMs);
}

void Session::note_refusal(TermCode term) {
  if (term.cause == Cause::killed) return;  // stopping: not a refusal of this client
  PoolState& ps = *snap_->pools[pool_index_].state;
  std::string why;
  if (term.cause == Cause::resource) {
    listener_.state->rejected_limit.fetch_add(1, std::memory_order_relaxed);
  } else {
    listener_.state->rejected_no_server.fetch_add(1, std::memory_order_relaxed);
    if (term.phase != Phase::queue) ps.no_server.fetch_add(1, std::memory_order_relaxed);
  }
  const int64_t now = int64_t(uv_now(worker_.loop()));
  int64_t last = listener_.state->last_refusal_log_ms.load(std::memory_order_relaxed);
  if (now - last < 1000 || !listener_.state->last_refusal_log_ms.compare_exchange_strong(last, now)) return;
  if (term.cause == Cause::resource)
    why = "out of local resources (" + last_failure_ + ")";
  else if (term.phase == Phase::queue)
    why =
        "every server of pool " + pool_.name + " stayed full for queue_timeout " + format_duration(pool_.queue_timeout);
  else if (tries_ == 0)
    why = "no usable server in pool " + pool_.name;
  else
    why = "no server of pool " + pool_.name + " could take it after " + std::to_string(tries_) +
          " tries (last: " + last_failure_ + ")";
  worker_.log(spdlog::level::warn,
              "listener {}: client {} answered 421 4.3.2: {} (further refusals within a second are only counted)",
              listener_.cfg->name, peer_.to_string(), why);
}

// ---- relay --------------------------------------------------------------------------------

bool Session::forward(bool to_client, const char* data, size_t len, bool more) {
  client_turn_ = to_client;
  Conn& c = to_client ? client_ : up_->conn;
  if (!to_client && !upstream_acks_delayed_ && state_ == State::relaying) {
    upstream_acks_delayed_ = true;
    delay_acks(c.fd);
  }
  size_t done = 0;
  if (!c.blocked()) {
    const ssize_t r = ::send(c.fd, data, len, MSG_NOSIGNAL | (more ? MSG_MORE : 0));
    if (r == ssize_t(len)) return true;
    if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      write_failed(to_client, errno);
      return false;
    }
    done = r > 0 ? size_t(r) : 0;
  }
  // The receiver is slow: keep the rest and stop reading the sender until it is written,
  // so memory per session stays bounded by one read. The socket's EPOLLOUT edge (it is in
  // the set for both directions from the start) calls flush().
  const size_t rest = len - done;
  auto* o = static_cast<OutChunk*>(std::malloc(offsetof(OutChunk, data) + rest));
  if (!o) {
    finish({Cause::resource, state_ == State::relaying ? Phase::data : Phase::connect});
    return false;
  }
  o->next = nullptr;
  o->off = 0;
  o->len = rest;
  std::memcpy(o->data, data + done, rest);
  if (c.out_tail)
    c.out_tail->next = o;
  else
    c.out_head = o;
  c.out_tail = o;
  if (to_client)
    pause_upstream();
  else
    pause_client();
  return true;
}

void Session::flush(Conn& c) {
  const bool to_client = &c == &client_;
  while (OutChunk* o = c.out_head) {
    const ssize_t r = ::send(c.fd, o->data + o->off, o->len - o->off, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
      write_failed(to_client, errno);
      return;
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
  if (state_ == State::relaying) {
    if (to_client)
      resume_upstream();
    else
      resume_client();
    maybe_done();
  }
}

void Session::write_failed(bool to_client, int err) {
  if (!to_client && (state_ == State::connecting || state_ == State::greeting)) {
    // Only the PROXY header is written before the handoff: this server is broken for
    // us, the client has lost nothing yet. Try the next one.
    attempt_failed({Cause::server, state_ == State::connecting ? Phase::connect : Phase::greeting},
                   err == ECONNRESET ? ConnError::reset : ConnError::refused,
                   std::string("PROXY header: ") + std::strerror(err));
    return;
  }
  finish(to_client ? TermCode{Cause::client, Phase::data} : TermCode{Cause::server, Phase::data});
}

void Session::pause_client() {
  client_.reading = false;
}

void Session::resume_client() {
  if (client_.reading || client_eof_ || state_ == State::closing) return;
  if (state_ != State::replying && held_.size() >= kHoldLimit) return;
  client_.reading = true;
  worker_.rearm(client_);  // edge-triggered: what arrived meanwhile raised no new edge
}

void Session::pause_upstream() {
  if (up_) up_->conn.reading = false;
}

void Session::resume_upstream() {
  if (!up_ || up_->conn.reading || upstream_eof_ || state_ != State::relaying) return;
  up_->conn.reading = true;
  worker_.rearm(up_->conn);
}

void Session::half_close(bool to_client) {
  bool& done = to_client ? client_shut_ : upstream_shut_;
  if (done) return;
  if (!to_client && !up_) return;
  done = true;
  Conn& c = to_client ? client_ : up_->conn;
  // After pending writes, so nothing in flight is cut off.
  if (c.blocked())
    c.shut_pending = true;
  else
    ::shutdown(c.fd, SHUT_WR);
}

bool Session::done_when_flushed() const {
  return client_eof_ && upstream_eof_ && !client_.blocked() && !(up_ && up_->conn.blocked());
}

void Session::maybe_done() {
  if (state_ == State::relaying && done_when_flushed()) finish({Cause::none, Phase::none});
}

// ---- timers -----------------------------------------------------------------------------

void Session::arm_timer(uint64_t ms) {
  uv_timer_start(&timer_, on_timer, ms, 0);
}

void Session::on_timer(uv_timer_t* t) {
  owner_of<Session>(t)->timer_fired();
}

void Session::timer_fired() {
  switch (state_) {
    case State::proxy_header:
      refuse_proxy("no complete PROXY header within " + format_duration(Millis(kProxyHeaderTimeoutMs)),
                   {Cause::client_timeout, Phase::proxy_header});
      break;
    case State::queued:
      leave_queue();
      term_ = {Cause::server_timeout, Phase::queue};
      snap_->pools[pool_index_].state->queue_timeouts.fetch_add(1, std::memory_order_relaxed);
      reply_unavailable(term_);
      break;
    case State::connecting:
      attempt_failed({Cause::server_timeout, Phase::connect}, ConnError::timeout,
                     "connect timeout after " + format_duration(pool_.connect_timeout));
      break;
    case State::greeting:
      attempt_failed({Cause::server_timeout, Phase::greeting}, ConnError::banner,
                     "no greeting within " + format_duration(pool_.banner_timeout));
      break;
    case State::relaying:
      if (upstream_eof_) {
        // Server gone, client still open after the linger: normal if everything reached it.
        finish(client_.blocked() ? TermCode{Cause::client_timeout, Phase::data} : TermCode{Cause::none, Phase::none});
        return;
      }
      arm_idle_timer();
      break;
    case State::replying:
      finish(term_);
      break;
    case State::closing:
      break;
  }
}

// Idle means nobody has sent anything. Whose silence it is decides the limit: after the
// server spoke it is the client's turn (client_idle_timeout), after the client spoke the
// server's (server_idle_timeout). A slow upload keeps resetting it, so large messages are
// never cut, and the session needs one timer and no work per read but a timestamp.
void Session::arm_idle_timer() {
  const uint64_t now = uv_now(worker_.loop());
  const bool client_turn = client_turn_;
  const uint64_t last = last_activity_;
  const uint64_t limit =
      uint64_t(client_turn ? listener_.cfg->client_idle_timeout.count() : pool_.server_idle_timeout.count());
  const uint64_t idle = now - last;
  if (idle >= limit) {
    finish(client_turn ? TermCode{Cause::client_timeout, Phase::data} : TermCode{Cause::server_timeout, Phase::data});
    return;
  }
  arm_timer(limit - idle);
}

// ---- the end ----------------------------------------------------------------------------

void Session::finish(TermCode term) {
  if (state_ == State::closing) return;
  term_ = term;
  leave_queue();
  state_ = State::closing;
  log_access();
  if (counted_) {
    ListenerWorkerCounters& lc = listener_.state->per_worker[worker_.index()];
    bump(lc.terms[term_.index()]);
    lc.duration.observe(kDurationBounds, double(uv_now(worker_.loop()) - t_accept_) / 1000.0);
  }
  if (relayed_) {
    ServerWorkerCounters& sc = relayed_->per_worker[worker_.index()];
    bump(sc.bytes_in, bytes_out_);
    bump(sc.bytes_out, bytes_in_);
  }
  abandon_upstream();
  close_conn(client_);
  uv_close(as_handle(&timer_), on_closed);
}

void Session::on_closed(uv_handle_t* h) {
  static_cast<Session*>(h->data)->closed_one();
}

void Session::closed_one() {
  if (--pending_closes_ == 0) delete this;
}

void Session::log_access() {
  if (!worker_.access_log() || !counted_ || !Worker::logs(spdlog::level::info)) return;
  const uint64_t now = uv_now(worker_.loop());
  const std::string client = peer_.to_string();
  AccessRecord r;
  r.client = client;
  r.listener = listener_.cfg->name;
  r.pool = pool_.name;
  r.server = server_name_ && tc_ >= 0 ? std::string_view(*server_name_) : std::string_view("-");
  r.tries = tries_;
  r.tw_ms = tw_;
  r.tc_ms = tc_;
  r.tb_ms = tb_;
  r.tt_ms = int64_t(now - t_accept_);
  r.bytes_in = bytes_in_;
  r.bytes_out = bytes_out_;
  r.term = term_;
  worker_.log_access(r);
}

}  // namespace smtplb
