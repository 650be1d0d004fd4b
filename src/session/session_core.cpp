#include "smtplb/session/session_core.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "smtplb/proto/proxy_protocol.hpp"
#include "smtplb/proto/smtp_reply.hpp"

namespace smtplb {

namespace {

// "connection refused": the system's text for an errno, as libuv words it.
std::string errno_text(int err) {
  const char* d = ::strerrordesc_np(err);
  std::string s = d ? d : "error " + std::to_string(err);
  if (!s.empty() && s[0] >= 'A' && s[0] <= 'Z' && !(s.size() > 1 && s[1] >= 'A' && s[1] <= 'Z')) s[0] = char(s[0] + 32);
  return s;
}

// Out of descriptors, memory or source ports here: not the server's fault.
bool local_shortage(int err) {
  return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM || err == EADDRNOTAVAIL;
}

}  // namespace

SessionCore::SessionCore(const ListenerConfig& listener, const PoolConfig& pool) : listener_(&listener), pool_(&pool) {}

// ---- start and stop -------------------------------------------------------------------

void SessionCore::start(uint64_t now, const SocketAddress& peer) {
  now_ = stats_.t_accept = last_activity_ = now;
  peer_ = peer;
  client_reading_ = true;  // the owner watches the client's socket for reading from the start
  if (listener_->proxy_protocol != ProxyIn::none) {
    const auto& trusted = listener_->trusted_proxies;
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

void SessionCore::proxy_header_data() {
  const ProxyIn want = listener_->proxy_protocol;
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
    if (listener_->address_features()) {
      // Rules on the client's address cannot be applied to a connection without one.
      refuse_proxy("a PROXY header without a client address (LOCAL or UNKNOWN) on a listener with address rules",
                   {Cause::proxy, Phase::proxy_header});
      return;
    }
    // The upstream balancer's own connection (its health check, typically): relayed, and
    // passed on as LOCAL too, so no backend mistakes a balancer for the client.
    proxy_local_ = true;
  } else {
    peer_ = r.header.source;
    local_ = r.header.destination;
    if (listener_->address_features()) {
      switch (admit()) {
        case Admission::pass:
          break;
        case Admission::deny_close:
          finish({Cause::client_rule, Phase::acl});
          return;
        case Admission::deny_reply:
          reply_and_close(access_denied_reply(hostname()), {Cause::client_rule, Phase::acl});
          return;
        case Admission::limit:
          reply_and_close(too_many_connections_reply(hostname()), {Cause::client_rule, Phase::limit});
          return;
      }
    }
  }
  if (held_.size() >= kHoldLimit) pause(Side::client);
  next_attempt();
}

void SessionCore::refuse_proxy(const std::string& why, TermCode term) {
  proxy_refused(why);
  finish(term);
}

void SessionCore::kill(uint64_t now) {
  now_ = now;
  const Phase phase = state_ == State::relaying       ? Phase::data
                      : state_ == State::greeting     ? Phase::greeting
                      : state_ == State::queued       ? Phase::queue
                      : state_ == State::proxy_header ? Phase::proxy_header
                                                      : Phase::connect;
  finish({Cause::killed, phase});
}

void SessionCore::start_failed(uint64_t now, const SocketAddress& peer, TermCode term) {
  now_ = stats_.t_accept = last_activity_ = now;
  peer_ = peer;
  finish(term);
}

void SessionCore::drain(uint64_t now) {
  now_ = now;
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

// ---- the client -------------------------------------------------------------------------

void SessionCore::client_data(uint64_t now, const char* data, size_t len, bool eof_follows) {
  now_ = last_activity_ = now;
  stats_.bytes_in += len;
  switch (state_) {
    case State::relaying:
      forward(Side::server, data, len, eof_follows);
      break;
    case State::proxy_header:
      held_.append(data, len);
      proxy_header_data();
      break;
    case State::queued:
    case State::connecting:
    case State::greeting:
      held_.append(data, len);
      if (held_.size() >= kHoldLimit) pause(Side::client);
      break;
    case State::replying:
    case State::closing:
      break;  // discarded: the session is over
  }
}

void SessionCore::client_end(uint64_t now, int err) {
  now_ = now;
  client_eof_ = true;
  pause(Side::client);  // nothing more to read
  // A client that half-closes after talking first (`printf ... | nc -N`) still wants its
  // answers: deliver what it sent after the greeting, then forward the FIN.
  if (err == 0 && !held_.empty() &&
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
      if (has_server_ && pool_->proxy_protocol != ProxyOut::none) {
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
      if (err != 0) {
        finish({Cause::client, Phase::data});
        return;
      }
      // The server closed already: when the session ends right now, the owner's close
      // sends the FIN (after any bytes still corked by MSG_MORE).
      if (!server_eof_ || !done_when_flushed()) half_close(Side::server);
      maybe_done();
      break;
    case State::replying:
      finish(term_);
      break;
    case State::closing:
      break;
  }
}

// ---- choosing and connecting a server ------------------------------------------------------

void SessionCore::next_attempt() {
  if (tries_ > pool_->retries) {
    leave_queue();
    reply_unavailable(term_);
    return;
  }
  const Selection p = pick(tried());
  if (p.index) {
    leave_queue();
    connect_to(uint32_t(*p.index));
    return;
  }
  if (p.all_full && pool_->queue_timeout.count() > 0) {
    if (!in_queue_) {
      in_queue_ = true;
      state_ = State::queued;
      t_queued_ = now_;
      arm_timer(uint64_t(pool_->queue_timeout.count()));
      // May hand this session (or an older waiter) a slot freed meanwhile, right away.
      enqueue();
    }
    return;
  }
  leave_queue();
  if (p.all_full)
    term_ = {Cause::server_timeout, Phase::queue};
  else if (tries_ == 0)
    term_ = {Cause::server, Phase::connect};
  reply_unavailable(term_);
}

bool SessionCore::slot_offered(uint64_t now) {
  now_ = now;
  if (!in_queue_) return true;
  refresh();
  next_attempt();
  return !in_queue_;
}

void SessionCore::leave_queue() {
  if (!in_queue_) return;
  in_queue_ = false;
  dequeue();
  stats_.tw += int64_t(now_ - t_queued_);
}

void SessionCore::queue_timed_out() {
  leave_queue();
  term_ = {Cause::server_timeout, Phase::queue};
  reply_unavailable(term_);
}

void SessionCore::connect_to(uint32_t index) {
  tried_[tries_++] = index;
  has_server_ = true;
  server_reading_ = server_blocked_ = server_eof_ = false;
  state_ = State::connecting;
  t_attempt_ = now_;
  stats_.tc = stats_.tb = -1;
  const int err = connect(index);
  if (err != 0 && local_shortage(err)) {
    // Not the server's fault: no passive failure, and no retry on another server that
    // would fail the same way.
    last_failure_ = "connect: " + errno_text(err);
    abandon_server();
    reply_unavailable({Cause::resource, Phase::connect});
    return;
  }
  if (err != 0) {
    fail_attempt({Cause::server, Phase::connect}, ConnError::refused, "connect: " + errno_text(err));
    return;
  }
  arm_timer(uint64_t(pool_->connect_timeout.count()));
}

void SessionCore::connected(uint64_t now, int err) {
  now_ = now;
  if (state_ != State::connecting) return;
  if (err != 0) {
    const ConnError kind = err == ETIMEDOUT    ? ConnError::timeout
                           : err == ECONNRESET ? ConnError::reset
                                               : ConnError::refused;
    fail_attempt({err == ETIMEDOUT ? Cause::server_timeout : Cause::server, Phase::connect}, kind,
                 "connect: " + errno_text(err));
    return;
  }
  stats_.tc = int64_t(now - t_attempt_);
  if (pool_->proxy_protocol != ProxyOut::none) {
    // Written before anything else; a PROXY-aware server reads it before it greets.
    if (local_.len == 0) local_ = local_address();  // unless a PROXY header gave it
    proxy::Header h;
    h.local = proxy_local_;
    h.source = peer_;
    h.destination = local_;
    const std::string header =
        proxy::encode(pool_->proxy_protocol == ProxyOut::v1 ? proxy::Version::v1 : proxy::Version::v2, h);
    // A failed write fails this attempt (send_failed says so), not the session.
    if (!forward(Side::server, header.data(), header.size())) return;
    if (client_gone_) {
      // Header out, then our FIN (the owner's close sends it after the queued bytes).
      finish({Cause::client, Phase::connect});
      return;
    }
  }
  server_reading_ = true;
  read(Side::server, true, false);  // this very event may carry the greeting
  last_activity_ = now;
  if (pool_->handoff == Handoff::connect) {
    handoff(nullptr, 0);
    return;
  }
  state_ = State::greeting;
  arm_timer(uint64_t(pool_->banner_timeout.count()));
}

// ---- the server -------------------------------------------------------------------------

void SessionCore::server_data(uint64_t now, const char* data, size_t len, bool eof_follows) {
  now_ = last_activity_ = now;
  if (state_ == State::relaying) {
    stats_.bytes_out += len;
    forward(Side::client, data, len, eof_follows);
    return;
  }
  if (state_ != State::greeting) return;
  // The first line decides; it almost always arrives in one read, so the common path
  // copies nothing.
  std::string_view chunk(data, len);
  const size_t nl = chunk.find('\n');
  if (nl == std::string_view::npos) {
    if (greeting_.size() + len > kGreetingLineLimit) {
      fail_attempt({Cause::server, Phase::greeting}, ConnError::banner,
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
    fail_attempt({Cause::server, Phase::greeting}, ConnError::banner, "greeting " + printable(line));
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

void SessionCore::server_end(uint64_t now, int err) {
  now_ = now;
  switch (state_) {
    case State::connecting:
    case State::greeting:
      fail_attempt({Cause::server, Phase::greeting}, err == ECONNRESET ? ConnError::reset : ConnError::banner,
                   err == 0 ? std::string("closed before greeting") : "greeting: " + errno_text(err));
      break;
    case State::relaying:
      server_eof_ = true;
      pause(Side::server);
      if (err != 0) {
        finish({Cause::server, Phase::data});
        return;
      }
      // When the client has closed too and nothing waits to be sent, the session ends
      // right now and the owner's close sends the FIN (in the same segment as the last
      // bytes when they are still corked).
      if (!client_eof_ || !done_when_flushed()) half_close(Side::client);
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

void SessionCore::fail_attempt(TermCode term, ConnError kind, const std::string& why) {
  if (client_gone_) {
    // Nobody to retry for: the attempt only went on to end cleanly for the backend.
    if (has_server_) attempt_failed(server(), kind, why, false);
    finish({Cause::client, Phase::connect});
    return;
  }
  term_ = term;
  last_failure_ = why;
  if (has_server_) attempt_failed(server(), kind, why, true);
  abandon_server();
  greeting_.clear();
  next_attempt();
}

void SessionCore::abandon_server() {
  if (!has_server_) return;
  has_server_ = server_reading_ = server_blocked_ = false;
  close_server();
}

void SessionCore::handoff(const char* data, size_t len) {
  stats_.tb = int64_t(now_ - t_attempt_) - stats_.tc;
  state_ = State::relaying;
  term_ = {Cause::none, Phase::none};
  handed_off_ = true;
  delay_acks(Side::client);
  handed_off(server());
  if (len) {
    stats_.bytes_out += len;
    if (!forward(Side::client, data, len)) return;
  }
  if (!held_.empty()) {
    std::string held = std::move(held_);
    held_ = std::string();
    if (!forward(Side::server, held.data(), held.size())) return;
  }
  if (client_eof_)
    half_close(Side::server);
  else if (!server_blocked_)
    resume(Side::client);
  arm_idle_timer();
}

// ---- smtplb's own reply -----------------------------------------------------------------

void SessionCore::reply_unavailable(TermCode term) {
  leave_queue();
  abandon_server();
  refused(term);
  reply_and_close(service_unavailable_reply(hostname()), term);
}

void SessionCore::reply_and_close(const std::string& text, TermCode term) {
  term_ = term;
  if (client_eof_ && held_.empty()) {
    finish(term);  // the client is gone
    return;
  }
  state_ = State::replying;
  held_ = std::string();
  resume(Side::client);  // read and discard until the client's FIN
  stats_.bytes_out += text.size();
  if (!forward(Side::client, text.data(), text.size())) return;
  half_close(Side::client);
  // A half-closed client will send no FIN: end once ours is out.
  arm_timer(client_eof_ ? 0 : kReplyLingerMs);
}

std::string SessionCore::refusal_reason(TermCode term) const {
  if (term.cause == Cause::resource) return "out of local resources (" + last_failure_ + ")";
  if (term.phase == Phase::queue)
    return "every server of pool " + pool_->name + " stayed full for queue_timeout " +
           format_duration(pool_->queue_timeout);
  if (tries_ == 0) return "no usable server in pool " + pool_->name;
  return "no server of pool " + pool_->name + " could take it after " + std::to_string(tries_) +
         " tries (last: " + last_failure_ + ")";
}

// ---- relaying -----------------------------------------------------------------------------

bool SessionCore::forward(Side to, const char* data, size_t len, bool more) {
  client_turn_ = to == Side::client;
  if (to == Side::server && !server_acks_delayed_ && state_ == State::relaying) {
    server_acks_delayed_ = true;
    delay_acks(Side::server);
  }
  const int r = send(to, std::string_view(data, len), more);
  if (r == kSent) return true;
  if (r == kQueued) {
    // The receiver is slow: stop reading the sender until the rest is written, so memory
    // per session stays bounded by one read.
    (to == Side::client ? client_blocked_ : server_blocked_) = true;
    pause(to == Side::client ? Side::server : Side::client);
    return true;
  }
  send_failed(to, r);
  return false;
}

void SessionCore::write_failed(uint64_t now, Side to, int err) {
  now_ = now;
  send_failed(to, err);
}

void SessionCore::send_failed(Side to, int err) {
  if (err == ENOMEM) {
    finish({Cause::resource, state_ == State::relaying ? Phase::data : Phase::connect});
    return;
  }
  if (to == Side::server && (state_ == State::connecting || state_ == State::greeting)) {
    // Only the PROXY header is written before the handoff: this server is broken for
    // us, the client has lost nothing yet. Try the next one.
    fail_attempt({Cause::server, state_ == State::connecting ? Phase::connect : Phase::greeting},
                 err == ECONNRESET ? ConnError::reset : ConnError::refused, "PROXY header: " + errno_text(err));
    return;
  }
  finish(to == Side::client ? TermCode{Cause::client, Phase::data} : TermCode{Cause::server, Phase::data});
}

void SessionCore::flushed(uint64_t now, Side to) {
  now_ = now;
  (to == Side::client ? client_blocked_ : server_blocked_) = false;
  if (state_ != State::relaying) return;
  resume(to == Side::client ? Side::server : Side::client);
  maybe_done();
}

void SessionCore::pause(Side from) {
  bool& reading = from == Side::client ? client_reading_ : server_reading_;
  if (!reading) return;
  reading = false;
  read(from, false, false);
}

void SessionCore::resume(Side from) {
  if (state_ == State::closing) return;
  if (from == Side::client) {
    if (client_reading_ || client_eof_) return;
    if (state_ != State::replying && held_.size() >= kHoldLimit) return;
    client_reading_ = true;
  } else {
    if (!has_server_ || server_reading_ || server_eof_ || state_ != State::relaying) return;
    server_reading_ = true;
  }
  read(from, true, true);  // edge-triggered: what arrived meanwhile raised no new event
}

void SessionCore::half_close(Side to) {
  bool& done = to == Side::client ? client_shut_ : server_shut_;
  if (done) return;
  if (to == Side::server && !has_server_) return;
  done = true;
  shutdown(to);
}

bool SessionCore::done_when_flushed() const {
  return client_eof_ && server_eof_ && !client_blocked_ && !(has_server_ && server_blocked_);
}

void SessionCore::maybe_done() {
  if (state_ == State::relaying && done_when_flushed()) finish({Cause::none, Phase::none});
}

// ---- timers -------------------------------------------------------------------------------

void SessionCore::timer(uint64_t now) {
  now_ = now;
  switch (state_) {
    case State::proxy_header:
      refuse_proxy("no complete PROXY header within " + format_duration(Millis(kProxyHeaderTimeoutMs)),
                   {Cause::client_timeout, Phase::proxy_header});
      break;
    case State::queued:
      queue_timed_out();
      break;
    case State::connecting:
      fail_attempt({Cause::server_timeout, Phase::connect}, ConnError::timeout,
                   "connect timeout after " + format_duration(pool_->connect_timeout));
      break;
    case State::greeting:
      fail_attempt({Cause::server_timeout, Phase::greeting}, ConnError::banner,
                   "no greeting within " + format_duration(pool_->banner_timeout));
      break;
    case State::relaying:
      if (server_eof_) {
        // Server gone, client still open after the linger: normal if everything reached it.
        finish(client_blocked_ ? TermCode{Cause::client_timeout, Phase::data} : TermCode{Cause::none, Phase::none});
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
void SessionCore::arm_idle_timer() {
  const uint64_t limit =
      uint64_t(client_turn_ ? listener_->client_idle_timeout.count() : pool_->server_idle_timeout.count());
  const uint64_t idle = now_ - last_activity_;
  if (idle >= limit) {
    finish(client_turn_ ? TermCode{Cause::client_timeout, Phase::data} : TermCode{Cause::server_timeout, Phase::data});
    return;
  }
  arm_timer(limit - idle);
}

// ---- the end ------------------------------------------------------------------------------

void SessionCore::finish(TermCode term) {
  if (state_ == State::closing) return;
  term_ = term;
  leave_queue();
  state_ = State::closing;
  abandon_server();
  finished();
}

}  // namespace smtplb
