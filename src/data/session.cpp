#include "data/session.hpp"

#include <spdlog/spdlog.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "data/edge_check.hpp"
#include "data/worker.hpp"
#include "runtime/uv_util.hpp"
#include "smtplb/proto/smtp_reply.hpp"

namespace smtplb {

static_assert(relay::kSent == SessionCore::kSent && relay::kQueued == SessionCore::kQueued);

Session::Session(Worker& worker, std::shared_ptr<const Snapshot> snapshot, ListenerRuntime& listener)
    : SessionCore(*listener.cfg, *snapshot->pools[listener.pool].cfg),
      worker_(worker),
      snap_(std::move(snapshot)),
      listener_(&listener),
      pool_index_(listener.pool) {
  uv_timer_init(worker_.loop(), &timer_);
  client_.owner = this;
  timer_.data = this;
  pending_closes_ = 1;  // timer_
  worker_.link(this);
}

Session::~Session() {
  if (pin_) snap_->clients->release(pin_);
  if (counted_) {
    listener_->state->current.fetch_sub(1, std::memory_order_relaxed);
    worker_.link().connections.fetch_sub(1, std::memory_order_relaxed);
  }
  worker_.unlink(this);
}

uint64_t Session::now() const {
  return uv_now(worker_.loop());
}

ServerRuntime* Session::server_at(uint32_t index) const {
  const auto& servers = pool().servers;
  return index < servers.size() ? servers[index].get() : nullptr;
}

void Session::accept(int fd, const SocketAddress& peer, ClientTable::Entry* pin) {
  client_.fd = fd;
  pin_ = pin;
  counted_ = true;  // the worker counted it against the limits (Worker::on_readable)
  bump(listener_->state->per_worker[worker_.index()].connections);
  if (!worker_.watch(client_)) {
    // The epoll set is full (fs.epoll.max_user_watches): say so, best effort, and close.
    const std::string text = service_unavailable_reply(hostname());
    (void)!::send(fd, text.data(), text.size(), MSG_NOSIGNAL);
    start_failed(now(), peer, {Cause::resource, Phase::connect});
    return;
  }
  // TCP_NODELAY comes from the listening socket.
  client_.reading = true;
  start(now(), peer);  // from accept4: no getpeername call
}

void Session::stop() {
  kill(now());
}

void Session::stop_gracefully() {
  drain(now());
}

// ---- socket events --------------------------------------------------------------------

void Session::io(Conn& c, uint32_t events) {
  const bool upstream = &c != &client_;
  if (upstream && state() == State::connecting) {
    if (events & (EPOLLERR | EPOLLHUP)) {
      int err = 0;
      socklen_t len = sizeof err;
      if (::getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err == 0) err = ECONNREFUSED;
      connected(now(), err);
      return;
    }
    if (!(events & EPOLLOUT)) return;
    connected(now(), 0);
    // The greeting may have come with the connect's completion (same event).
    if (closing() || c.owner != this) return;
  }
  if (c.blocked() && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
    const int r = relay::flush(c);
    if (r == relay::kSent)
      flushed(now(), upstream ? Side::server : Side::client);
    else if (r != relay::kQueued)
      write_failed(now(), upstream ? Side::server : Side::client, r);
    if (closing() || c.owner != this) return;
  }
  if (c.reading && (events & (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLERR | EPOLLHUP))) read_from(c, events);
}

struct Session::Reader {
  Session& s;
  Conn& c;
  bool upstream;
  void data(const char* bytes, size_t len, bool eof) {
    if (upstream)
      s.server_data(s.now(), bytes, len, eof);
    else
      s.client_data(s.now(), bytes, len, eof);
  }
  void end(int err) {
    if (upstream)
      s.server_end(s.now(), err);
    else
      s.client_end(s.now(), err);
  }
  bool go_on() const { return !s.closing() && c.owner == &s && c.reading; }
};

void Session::read_from(Conn& c, uint32_t events) {
  if (relay::read_burst(c, events, worker_.scratch(), Worker::kScratchSize, Reader{*this, c, &c != &client_}))
    worker_.rearm(c);  // still more to read: the other sockets have their turn first
}

// ---- effects: balancing and the queue -------------------------------------------------

Selection Session::pick(std::span<const uint32_t> tried) {
  return worker_.pick(pool(), tried, &peer());
}

void Session::enqueue() {
  // A copy: serving the queue may move this session to a newer snapshot (refresh) and
  // free the one that holds pool().state.
  const std::shared_ptr<PoolState> state = pool().state;
  worker_.enqueue(this, state);
}

void Session::dequeue() {
  worker_.dequeue(this, *pool().state);
}

// ---- effects: sockets -----------------------------------------------------------------

int Session::connect(uint32_t index) {
  const auto& server = pool().servers[index];
  up_ = new Upstream;
  up_->conn.owner = this;
  up_->server = server;
  const sockaddr* sa = server->cfg.addr.sa();
  const int fd = ::socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return errno;
  up_->conn.fd = fd;
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (::connect(fd, sa, server->cfg.addr.len) != 0 && errno != EINPROGRESS) return errno;
  if (!worker_.watch(up_->conn)) return ENOMEM;  // epoll set full: ours, not the server's
  return 0;
}

void Session::close_server() {
  if (!up_) return;
  Upstream* up = up_;
  up_ = nullptr;
  relay::close(up->conn);
  if (up->server->release()) worker_.slot_freed(*up->server->pool_state);
  worker_.retire(up);
}

int Session::send(Side to, std::string_view bytes, bool more) {
  Conn* c = conn(to);
  return c ? relay::send(*c, bytes, more) : EBADF;
}

void Session::shutdown(Side to) {
  if (Conn* c = conn(to)) relay::shutdown_after_flush(*c);
}

void Session::read(Side from, bool on, bool look) {
  Conn* c = conn(from);
  if (!c) return;
  c->reading = on;
  if (on && look) worker_.rearm(*c);
}

// SMTP is lockstep: whatever smtplb reads, it answers soon (it forwards the command, then
// the reply comes back the other way). Delayed-ACK ("pingpong") mode lets the ACK ride on
// that answer instead of costing a packet of its own; Linux enters the mode by itself only
// after the first exchange. The core sets it on the client's socket at the handoff, and on
// the server's when the first client bytes go to it (where Linux itself starts counting):
// not before connect (a delayed final handshake ACK would stall a server that speaks
// first), and not while the greeting may still come (a server that writes a multi-line
// greeting in pieces with Nagle on would wait for our delayed ACK).
void Session::delay_acks(Side side) {
  const int zero = 0;
  if (Conn* c = conn(side)) ::setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &zero, sizeof zero);
}

void Session::arm_timer(uint64_t ms) {
  uv_timer_start(&timer_, on_timer, ms, 0);
}

void Session::on_timer(uv_timer_t* t) {
  Session* s = owner_of<Session>(t);
  s->timer(s->now());
}

// Reloads build new snapshots; a session keeps the one it started with, except while it
// waits in the queue: then it looks for a slot in the newest one, so a server a reload
// added (or a raised max_connections) serves it without waiting for queue_timeout. It
// moves only when its listener and pool live on in the new snapshot (same state objects:
// the queue and the counters belong to them); servers it tried are followed by identity.
void Session::refresh() {
  const std::shared_ptr<const Snapshot>& latest = worker_.snapshot();
  if (!latest || latest == snap_) return;
  const ListenerRuntime* next = nullptr;
  for (const auto& lr : latest->listeners)
    if (lr->state == listener_->state) next = lr.get();
  if (!next || latest->pools[next->pool].state != pool().state) return;
  const PoolRuntime& old_pool = pool();
  const PoolRuntime& new_pool = latest->pools[next->pool];
  remap_tried([&](uint32_t i) -> long {
    if (i >= old_pool.servers.size()) return -1;
    for (size_t j = 0; j < new_pool.servers.size(); ++j)
      if (new_pool.servers[j] == old_pool.servers[i]) return long(j);
    return -1;
  });
  rebind(*next->cfg, *new_pool.cfg);
  listener_ = next;
  pool_index_ = next->pool;
  snap_ = latest;  // last: the old snapshot owned what the lines above read
}

SessionCore::Admission Session::admit() {
  const EdgeCheck e = check_edge(*listener_, *snap_->clients, peer(), int64_t(now()));
  if (e.outcome != EdgeCheck::Outcome::pass || e.dry_run) worker_.note_edge(*listener_, peer(), e);
  pin_ = e.pin;
  switch (e.outcome) {
    case EdgeCheck::Outcome::pass:
      return Admission::pass;
    case EdgeCheck::Outcome::limit:
      return Admission::limit;
    case EdgeCheck::Outcome::deny:
      break;
  }
  return listener_->cfg->deny_action == DenyAction::reply ? Admission::deny_reply : Admission::deny_close;
}

SocketAddress Session::local_address() {
  SocketAddress local;
  socklen_t len = sizeof local.storage;
  if (::getsockname(client_.fd, reinterpret_cast<sockaddr*>(&local.storage), &len) == 0) local.len = len;
  return local;
}

std::string_view Session::hostname() const {
  return snap_->config->global.hostname;
}

// ---- effects: outcomes ----------------------------------------------------------------

void Session::attempt_failed(uint32_t, ConnError kind, const std::string& why, bool count) {
  if (!up_) return;
  if (count) {
    bump(up_->server->per_worker[worker_.index()].errors[size_t(kind)]);
    worker_.log(spdlog::level::debug, "client {}: server {} failed ({}), try {} of {}", peer().to_string(),
                up_->server->label, why, tried().size(), pool().cfg->retries + 1);
  }
  worker_.report_failure(up_->server, pool().cfg->health_check.fall, why);
}

void Session::handed_off(uint32_t) {
  ServerRuntime& server = *up_->server;
  ServerWorkerCounters& sc = server.per_worker[worker_.index()];
  bump(sc.sessions);
  sc.connect.observe(kLatencyBounds, double(stats().tc + stats().tb) / 1000.0);
  if (server.passive_failures.load(std::memory_order_relaxed))
    server.passive_failures.store(0, std::memory_order_relaxed);
}

void Session::refused(TermCode term) {
  PoolState& ps = *pool().state;
  if (term == TermCode{Cause::server_timeout, Phase::queue}) ps.queue_timeouts.fetch_add(1, std::memory_order_relaxed);
  if (term.cause == Cause::killed) return;  // stopping: not a refusal of this client
  if (term.cause == Cause::resource) {
    listener_->state->rejected_limit.fetch_add(1, std::memory_order_relaxed);
  } else {
    listener_->state->rejected_no_server.fetch_add(1, std::memory_order_relaxed);
    if (term.phase != Phase::queue) ps.no_server.fetch_add(1, std::memory_order_relaxed);
  }
  const int64_t t = int64_t(now());
  int64_t last = listener_->state->last_refusal_log_ms.load(std::memory_order_relaxed);
  if (t - last < 1000 || !listener_->state->last_refusal_log_ms.compare_exchange_strong(last, t)) return;
  worker_.log(spdlog::level::warn,
              "listener {}: client {} answered 421 4.3.2: {} (further refusals within a second are only counted)",
              listener_->cfg->name, peer().to_string(), refusal_reason(term));
}

void Session::proxy_refused(const std::string& why) {
  listener_->state->rejected_proxy.fetch_add(1, std::memory_order_relaxed);
  const int64_t t = int64_t(now());
  int64_t last = listener_->state->last_proxy_log_ms.load(std::memory_order_relaxed);
  if (t - last >= 1000 && listener_->state->last_proxy_log_ms.compare_exchange_strong(last, t))
    worker_.log(spdlog::level::warn,
                "listener {}: closing connection from {}: {} (further ones within a second are only counted)",
                listener_->cfg->name, peer().to_string(), why);
}

void Session::finished() {
  log_access();
  if (counted_) {
    ListenerWorkerCounters& lc = listener_->state->per_worker[worker_.index()];
    bump(lc.terms[term().index()]);
    lc.duration.observe(kDurationBounds, double(now() - stats().t_accept) / 1000.0);
  }
  if (was_handed_off()) {
    if (ServerRuntime* relayed = server_at(server())) {
      ServerWorkerCounters& sc = relayed->per_worker[worker_.index()];
      bump(sc.bytes_in, stats().bytes_out);
      bump(sc.bytes_out, stats().bytes_in);
    }
  }
  relay::close(client_);
  uv_close(as_handle(&timer_), on_closed);
}

void Session::on_closed(uv_handle_t* h) {
  auto* s = static_cast<Session*>(h->data);
  if (--s->pending_closes_ == 0) delete s;
}

void Session::log_access() {
  if (!worker_.access_log() || !counted_ || !Worker::logs(spdlog::level::info)) return;
  const Stats& st = stats();
  const std::string client = peer().to_string();
  const ServerRuntime* srv = !tried().empty() && st.tc >= 0 ? server_at(server()) : nullptr;
  AccessRecord r;
  r.client = client;
  r.listener = listener_->cfg->name;
  r.pool = pool().cfg->name;
  r.server = srv ? std::string_view(srv->cfg.name) : std::string_view("-");
  r.tries = uint32_t(tried().size());
  r.tw_ms = st.tw;
  r.tc_ms = st.tc;
  r.tb_ms = st.tb;
  r.tt_ms = int64_t(now() - st.t_accept);
  r.bytes_in = st.bytes_in;
  r.bytes_out = st.bytes_out;
  r.term = term();
  worker_.log_access(r);
}

}  // namespace smtplb
