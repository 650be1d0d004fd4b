#include "session.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "smtplb/proxy_protocol.hpp"
#include "smtplb/smtp_reply.hpp"
#include "uv_util.hpp"
#include "worker.hpp"

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

void alloc_scratch(uv_handle_t* h, size_t, uv_buf_t* buf) { *buf = static_cast<Worker*>(h->loop->data)->scratch(); }

}  // namespace

Session::Session(Worker& worker, std::shared_ptr<const Snapshot> snapshot, ListenerRuntime& listener)
    : worker_(worker),
      snap_(std::move(snapshot)),
      listener_(listener),
      pool_(*snap_->pools[listener.pool].cfg),
      pool_index_(listener.pool) {
  uv_tcp_init(worker_.loop(), &client_);
  uv_timer_init(worker_.loop(), &timer_);
  client_.data = this;
  timer_.data = this;
  pending_closes_ = 2;  // client_ and timer_
  worker_.link(this);
}

Session::~Session() {
  if (counted_) {
    listener_.state->current.fetch_sub(1, std::memory_order_relaxed);
    worker_.link().connections.fetch_sub(1, std::memory_order_relaxed);
  }
  worker_.unlink(this);
}

void Session::start(const SocketAddress& peer) {
  const uint64_t now = uv_now(worker_.loop());
  t_accept_ = last_activity_ = now;
  peer_ = peer;  // from accept4: no getpeername call
  uv_tcp_nodelay(&client_, 1);

  counted_ = true;
  bump(listener_.state->per_worker[worker_.index()].connections);
  const uint32_t process = worker_.link().connections.fetch_add(1, std::memory_order_relaxed) + 1;
  const uint32_t here = listener_.state->current.fetch_add(1, std::memory_order_relaxed) + 1;
  uv_read_start(as_stream(&client_), alloc_scratch, on_client_read);
  if (process > snap_->config->global.max_connections || here > listener_.cfg->max_connections) {
    reply_unavailable({'R', 'C'});
    return;
  }
  if (listener_.cfg->proxy_protocol != ProxyIn::none) {
    const auto& trusted = listener_.cfg->trusted_proxies;
    if (std::none_of(trusted.begin(), trusted.end(), [&](const Cidr& c) { return c.contains(peer_); })) {
      refuse_proxy("sender is not in trusted_proxies", {'P', 'R'});
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
  const auto accept = want == ProxyIn::v1 ? proxy::Accept::v1 : want == ProxyIn::v2 ? proxy::Accept::v2 : proxy::Accept::any;
  proxy::ParseResult r = proxy::parse(held_, accept);
  if (r.status == proxy::ParseResult::Status::need_more) return;
  if (r.status == proxy::ParseResult::Status::error) {
    refuse_proxy("malformed PROXY header: " + r.error, {'P', 'R'});
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
    spdlog::warn("listener {}: closing connection from {}: {} (further ones within a second are only counted)",
                 listener_.cfg->name, peer_.to_string(), why);
  finish(term);
}

void Session::kill() {
  const char phase = state_ == State::relaying       ? 'D'
                     : state_ == State::greeting     ? 'H'
                     : state_ == State::queued       ? 'Q'
                     : state_ == State::proxy_header ? 'R'
                                                     : 'C';
  finish({'K', phase});
}

void Session::drain() {
  switch (state_) {
    case State::proxy_header:
      finish({'K', 'R'});
      break;
    case State::queued:
    case State::connecting:
    case State::greeting:
      reply_unavailable({'K', state_ == State::queued ? 'Q' : state_ == State::greeting ? 'H' : 'C'});
      break;
    case State::relaying:
    case State::replying:
    case State::closing:
      break;
  }
}

// ---- client side ----------------------------------------------------------------------

void Session::on_client_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  auto* self = owner_of<Session>(s);
  if (n > 0) self->client_data(buf->base, size_t(n));
  else if (n < 0) self->client_end(n);
}

void Session::client_data(const char* data, size_t len) {
  bytes_in_ += len;
  last_activity_ = uv_now(worker_.loop());
  switch (state_) {
    case State::relaying:
      forward(false, data, len);
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
  client_paused_ = true;  // libuv stopped reading
  // A client that half-closes after talking first (`printf ... | nc -N`) still wants its
  // answers: deliver what it sent after the greeting, then forward the FIN.
  if (status == UV_EOF && !held_.empty() && state_ != State::proxy_header &&
      (state_ == State::queued || state_ == State::connecting || state_ == State::greeting))
    return;
  switch (state_) {
    case State::proxy_header:
      finish({'C', 'R'});
      break;
    case State::queued:
      finish({'C', 'Q'});
      break;
    case State::connecting:
      finish({'C', 'C'});
      break;
    case State::greeting:
      finish({'C', 'H'});
      break;
    case State::relaying:
      if (status != UV_EOF) {
        finish({'C', 'D'});
        return;
      }
      half_close(false);
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
  Worker::Pick p = worker_.pick(snap_->pools[pool_index_], std::span<const uint32_t>(tried_.data(), tries_));
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
      worker_.enqueue(this, snap_->pools[pool_index_].state.get());
      arm_timer(uint64_t(pool_.queue_timeout.count()));
    }
    return;
  }
  leave_queue();
  if (p.all_full) {
    term_ = {'s', 'Q'};
    snap_->pools[pool_index_].state->queue_timeouts.fetch_add(1, std::memory_order_relaxed);
  } else if (tries_ == 0) {
    term_ = {'S', 'C'};
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
  worker_.dequeue(this, snap_->pools[pool_index_].state.get());
  tw_ += int64_t(uv_now(worker_.loop()) - t_queued_);
}

void Session::release_server(const std::shared_ptr<ServerRuntime>& server) {
  if (server->release()) worker_.slot_freed(server->pool_state.get());
}

void Session::connect_to(size_t index) {
  tried_[tries_++] = uint32_t(index);
  const auto& server = snap_->pools[pool_index_].servers[index];
  server_name_ = &server->cfg.name;

  up_ = new Upstream;
  up_->owner = this;
  up_->server = server;
  up_->tcp.data = up_;
  uv_tcp_init(worker_.loop(), &up_->tcp);
  state_ = State::connecting;
  t_attempt_ = uv_now(worker_.loop());
  tc_ = tb_ = -1;
  int rc = uv_tcp_connect(&up_->connect_req, &up_->tcp, server->cfg.addr.sa(), on_connect);
  if (rc == UV_EMFILE || rc == UV_ENFILE || rc == UV_ENOBUFS || rc == UV_ENOMEM || rc == UV_EADDRNOTAVAIL) {
    // Out of descriptors, memory or source ports here: not the server's fault, so no
    // passive failure and no retry on another server that would fail the same way.
    last_failure_ = std::string("connect: ") + uv_strerror(rc);
    abandon_upstream();
    reply_unavailable({'R', 'C'});
    return;
  }
  if (rc < 0) {
    attempt_failed('S', 'C', ConnError::refused, std::string("connect: ") + uv_strerror(rc));
    return;
  }
  arm_timer(uint64_t(pool_.connect_timeout.count()));
}

void Session::on_connect(uv_connect_t* req, int status) {
  auto* up = static_cast<Upstream*>(req->handle->data);
  if (up->owner) up->owner->connected(status);
}

void Session::connected(int status) {
  if (state_ != State::connecting) return;
  if (status < 0) {
    const ConnError kind = status == UV_ETIMEDOUT ? ConnError::timeout
                           : status == UV_ECONNRESET ? ConnError::reset
                                                     : ConnError::refused;
    attempt_failed(status == UV_ETIMEDOUT ? 's' : 'S', 'C', kind, std::string("connect: ") + uv_strerror(status));
    return;
  }
  tc_ = int64_t(uv_now(worker_.loop()) - t_attempt_);
  uv_tcp_nodelay(&up_->tcp, 1);
  if (pool_.proxy_protocol != ProxyOut::none) {
    // Written before anything else; a PROXY-aware server reads it before it greets.
    if (local_.len == 0) {  // looked up only when needed (and unless a PROXY header gave it)
      int len = sizeof local_.storage;
      if (uv_tcp_getsockname(&client_, reinterpret_cast<sockaddr*>(&local_.storage), &len) == 0) local_.len = len;
    }
    proxy::Header h;
    h.local = proxy_local_;
    h.source = peer_;
    h.destination = local_;
    const std::string header =
        proxy::encode(pool_.proxy_protocol == ProxyOut::v1 ? proxy::Version::v1 : proxy::Version::v2, h);
    if (!forward(false, header.data(), header.size())) return;
  }
  uv_read_start(as_stream(&up_->tcp), alloc_scratch, on_upstream_read);
  upstream_paused_ = false;
  last_activity_ = uv_now(worker_.loop());
  if (pool_.handoff == Handoff::connect) {
    handoff(nullptr, 0);
    return;
  }
  state_ = State::greeting;
  arm_timer(uint64_t(pool_.banner_timeout.count()));
}

void Session::on_upstream_read(uv_stream_t* s, ssize_t n, const uv_buf_t* buf) {
  auto* up = static_cast<Upstream*>(s->data);
  if (!up->owner) return;
  if (n > 0) up->owner->upstream_data(buf->base, size_t(n));
  else if (n < 0) up->owner->upstream_end(n);
}

void Session::upstream_data(const char* data, size_t len) {
  last_activity_ = uv_now(worker_.loop());
  if (state_ == State::relaying) {
    bytes_out_ += len;
    forward(true, data, len);
    return;
  }
  if (state_ != State::greeting) return;
  // The first line decides; it almost always arrives in one read, so the common path
  // copies nothing.
  std::string_view chunk(data, len);
  size_t nl = chunk.find('\n');
  if (nl == std::string_view::npos) {
    if (greeting_.size() + len > kGreetingLineLimit) {
      attempt_failed('S', 'H', ConnError::banner,
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
    attempt_failed('S', 'H', ConnError::banner, "greeting " + printable(line));
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
      attempt_failed('S', 'H', status == UV_ECONNRESET ? ConnError::reset : ConnError::banner,
                     status == UV_EOF ? std::string("closed before greeting")
                                      : std::string("greeting: ") + uv_strerror(int(status)));
      break;
    case State::relaying:
      upstream_eof_ = true;
      upstream_paused_ = true;
      if (status != UV_EOF) {
        finish({'S', 'D'});
        return;
      }
      half_close(true);
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

void Session::attempt_failed(char cause, char phase, ConnError kind, const std::string& why) {
  if (up_) bump(up_->server->per_worker[worker_.index()].errors[size_t(kind)]);
  spdlog::debug("client {}: server {} failed ({}), try {} of {}", peer_.to_string(), up_ ? up_->server->label : "?",
                why, tries_, pool_.retries + 1);
  term_ = {cause, phase};
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
  up->owner = nullptr;
  uv_close(as_handle(&up->tcp), on_upstream_closed);
  release_server(up->server);
}

void Session::handoff(const char* data, size_t len) {
  const uint64_t now = uv_now(worker_.loop());
  tb_ = int64_t(now - t_attempt_) - tc_;
  state_ = State::relaying;
  term_ = {'-', '-'};
  relayed_ = up_->server.get();
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
  if (client_eof_) half_close(false);
  else if (to_upstream_queued_ == 0) resume_client();
  arm_idle_timer();
}

// ---- replies from smtplb itself ---------------------------------------------------------

void Session::reply_unavailable(TermCode term) {
  std::string text = "421 4.3.2 " + snap_->config->global.hostname + " Service not available, try again later\r\n";
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
  if (term.cause == 'K') return;  // stopping: not a refusal of this client
  PoolState& ps = *snap_->pools[pool_index_].state;
  std::string why;
  if (term.cause == 'R') {
    listener_.state->rejected_limit.fetch_add(1, std::memory_order_relaxed);
  } else {
    listener_.state->rejected_no_server.fetch_add(1, std::memory_order_relaxed);
    if (term.phase != 'Q') ps.no_server.fetch_add(1, std::memory_order_relaxed);
  }
  const int64_t now = int64_t(uv_now(worker_.loop()));
  int64_t last = listener_.state->last_refusal_log_ms.load(std::memory_order_relaxed);
  if (now - last < 1000 || !listener_.state->last_refusal_log_ms.compare_exchange_strong(last, now)) return;
  if (term.cause == 'R' && tries_ > 0)
    why = "out of local resources (" + last_failure_ + ")";
  else if (term.cause == 'R')
    why = "connection limit reached (listener max_connections " + std::to_string(listener_.cfg->max_connections) +
          ", global max_connections " + std::to_string(snap_->config->global.max_connections) + ")";
  else if (term.phase == 'Q')
    why = "every server of pool " + pool_.name + " stayed full for queue_timeout " +
          format_duration(pool_.queue_timeout);
  else if (tries_ == 0)
    why = "no usable server in pool " + pool_.name;
  else
    why = "no server of pool " + pool_.name + " could take it after " + std::to_string(tries_) + " tries (last: " +
          last_failure_ + ")";
  spdlog::warn("listener {}: client {} answered 421 4.3.2: {} (further refusals within a second are only counted)",
               listener_.cfg->name, peer_.to_string(), why);
}

// ---- relay --------------------------------------------------------------------------------

bool Session::forward(bool to_client, const char* data, size_t len) {
  client_turn_ = to_client;
  uv_stream_t* dst = to_client ? as_stream(&client_) : as_stream(&up_->tcp);
  unsigned& queued = to_client ? to_client_queued_ : to_upstream_queued_;
  size_t done = 0;
  if (queued == 0) {
    uv_buf_t b = uv_buf_init(const_cast<char*>(data), unsigned(len));
    int r = uv_try_write(dst, &b, 1);
    if (r == int(len)) return true;
    if (r < 0 && r != UV_EAGAIN) {
      finish(to_client ? TermCode{'C', 'D'} : TermCode{'S', 'D'});
      return false;
    }
    done = r > 0 ? size_t(r) : 0;
  }
  // The receiver is slow: keep the rest in one buffer and stop reading the sender until it
  // is written, so memory per session stays bounded by one read.
  size_t rest = len - done;
  auto* ob = static_cast<OutBuf*>(std::malloc(offsetof(OutBuf, data) + rest));
  ob->session = this;
  ob->to_client = to_client;
  std::memcpy(ob->data, data + done, rest);
  uv_buf_t b = uv_buf_init(ob->data, unsigned(rest));
  ob->req.data = ob;
  if (uv_write(&ob->req, dst, &b, 1, on_write_done) != 0) {
    std::free(ob);
    finish(to_client ? TermCode{'C', 'D'} : TermCode{'S', 'D'});
    return false;
  }
  ++queued;
  if (to_client) pause_upstream();
  else pause_client();
  return true;
}

void Session::on_write_done(uv_write_t* req, int status) {
  auto* ob = static_cast<OutBuf*>(req->data);
  Session* self = ob->session;
  const bool to_client = ob->to_client;
  std::free(ob);
  unsigned& queued = to_client ? self->to_client_queued_ : self->to_upstream_queued_;
  --queued;
  if (status == UV_ECANCELED || self->state_ == State::closing) return;
  if (status < 0) {
    self->finish(to_client ? TermCode{'C', 'D'} : TermCode{'S', 'D'});
    return;
  }
  if (queued == 0 && self->state_ == State::relaying) {
    if (to_client) self->resume_upstream();
    else self->resume_client();
    self->maybe_done();
  }
}

void Session::pause_client() {
  if (client_paused_) return;
  uv_read_stop(as_stream(&client_));
  client_paused_ = true;
}

void Session::resume_client() {
  if (!client_paused_ || client_eof_ || state_ == State::closing) return;
  if (state_ != State::replying && held_.size() >= kHoldLimit) return;
  uv_read_start(as_stream(&client_), alloc_scratch, on_client_read);
  client_paused_ = false;
}

void Session::pause_upstream() {
  if (upstream_paused_ || !up_) return;
  uv_read_stop(as_stream(&up_->tcp));
  upstream_paused_ = true;
}

void Session::resume_upstream() {
  if (!upstream_paused_ || upstream_eof_ || !up_ || state_ != State::relaying) return;
  uv_read_start(as_stream(&up_->tcp), alloc_scratch, on_upstream_read);
  upstream_paused_ = false;
}

void Session::half_close(bool to_client) {
  bool& done = to_client ? client_shut_ : upstream_shut_;
  if (done) return;
  if (!to_client && !up_) return;
  done = true;
  uv_shutdown_t* req = to_client ? &client_shutdown_ : &upstream_shutdown_;
  req->data = this;
  // Queued after pending writes by libuv, so nothing in flight is cut off.
  uv_shutdown(req, to_client ? as_stream(&client_) : as_stream(&up_->tcp), [](uv_shutdown_t*, int) {});
}

void Session::maybe_done() {
  if (state_ == State::relaying && client_eof_ && upstream_eof_ && to_client_queued_ == 0 &&
      to_upstream_queued_ == 0)
    finish({'-', '-'});
}

// ---- timers -----------------------------------------------------------------------------

void Session::arm_timer(uint64_t ms) { uv_timer_start(&timer_, on_timer, ms, 0); }

void Session::on_timer(uv_timer_t* t) { owner_of<Session>(t)->timer_fired(); }

void Session::timer_fired() {
  switch (state_) {
    case State::proxy_header:
      refuse_proxy("no complete PROXY header within " + format_duration(Millis(kProxyHeaderTimeoutMs)), {'c', 'R'});
      break;
    case State::queued:
      leave_queue();
      term_ = {'s', 'Q'};
      snap_->pools[pool_index_].state->queue_timeouts.fetch_add(1, std::memory_order_relaxed);
      reply_unavailable(term_);
      break;
    case State::connecting:
      attempt_failed('s', 'C', ConnError::timeout, "connect timeout after " + format_duration(pool_.connect_timeout));
      break;
    case State::greeting:
      attempt_failed('s', 'H', ConnError::banner, "no greeting within " + format_duration(pool_.banner_timeout));
      break;
    case State::relaying:
      if (upstream_eof_) {
        // Server gone, client still open after the linger: normal if everything reached it.
        finish(to_client_queued_ ? TermCode{'c', 'D'} : TermCode{'-', '-'});
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
    finish(client_turn ? TermCode{'c', 'D'} : TermCode{'s', 'D'});
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
    bump(lc.terms[term_index(term_.cause, term_.phase)]);
    lc.duration.observe(kDurationBounds, double(uv_now(worker_.loop()) - t_accept_) / 1000.0);
  }
  if (relayed_) {
    ServerWorkerCounters& sc = relayed_->per_worker[worker_.index()];
    bump(sc.bytes_in, bytes_out_);
    bump(sc.bytes_out, bytes_in_);
  }
  if (up_) {
    Upstream* up = up_;
    up_ = nullptr;
    ++pending_closes_;  // the upstream's close callback reports to us: owner stays set
    uv_close(as_handle(&up->tcp), on_upstream_closed);
    release_server(up->server);
  }
  uv_close(as_handle(&client_), on_closed);
  uv_close(as_handle(&timer_), on_closed);
}

void Session::on_closed(uv_handle_t* h) { static_cast<Session*>(h->data)->closed_one(); }

void Session::on_upstream_closed(uv_handle_t* h) {
  auto* up = static_cast<Upstream*>(h->data);
  Session* owner = up->owner;
  delete up;
  if (owner) owner->closed_one();
}

void Session::closed_one() {
  if (--pending_closes_ == 0) delete this;
}

void Session::log_access() {
  if (!worker_.access_log() || !counted_) return;
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
  spdlog::info("{}", worker_.log_json() ? format_access_json(r) : format_access_text(r));
}

}  // namespace smtplb
