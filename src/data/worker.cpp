#include "data/worker.hpp"

#include <spdlog/spdlog.h>

#include <pthread.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "data/edge_check.hpp"
#include "data/session.hpp"
#include "runtime/uv_util.hpp"
#include "smtplb/config/duration.hpp"
#include "smtplb/edge/address.hpp"
#include "smtplb/proto/smtp_reply.hpp"

namespace smtplb {

namespace {
constexpr uint64_t kAcceptPauseMs = 100;
// While a listener waits for room under max_connections, how often it looks.
constexpr uint64_t kLimitRecheckMs = 10;
// Events taken from the sessions' epoll set per epoll_wait.
constexpr int kEventBatch = 128;
// EPOLLPRI: urgent data makes read() stop short of the mark with more queued behind it,
// so a short read no longer means "drained" (see Session::read_from).
constexpr uint32_t kConnEvents = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET;
// A refused client's socket stays open this long after the 421 and our FIN, unless more
// than kMaxLingering are waiting (then the oldest closes early): a flood of refused
// connections costs a bounded number of descriptors for a bounded time.
constexpr uint64_t kRefusalLingerMs = 1000;
constexpr size_t kMaxLingering = 1024;

// Reads and drops what a refused client has sent, so closing sends a FIN, not a reset.
void discard_input(int fd, char* buf, size_t size) {
  for (int i = 0; i < 4; ++i)
    if (::recv(fd, buf, size, MSG_DONTWAIT) <= 0) return;
}
// A full log ring is retried this often; the loop may otherwise have nothing to wake it.
constexpr uint64_t kLogRetryMs = 10;
}  // namespace

void ControlLink::report(PassiveDown event) {
  {
    std::lock_guard<std::mutex> lock(mu);
    passive.push_back(std::move(event));
  }
  uv_async_send(wake);
}

void ControlLink::worker_done() {
  running.fetch_sub(1);
  uv_async_send(wake);
}

Worker::Worker(unsigned index, std::shared_ptr<const Snapshot> snapshot, ControlLink& link, LogWriter& log)
    : index_(index),
      link_(link),
      log_writer_(log),
      log_(log.queue(index)),
      snapshot_(std::move(snapshot)),
      scratch_(new char[kScratchSize]) {
  uv_loop_init(&loop_);
  loop_.data = this;
  uv_prepare_init(&loop_, &log_turn_);
  log_turn_.data = this;
  uv_prepare_start(&log_turn_, [](uv_prepare_t* p) { static_cast<Worker*>(p->data)->publish_log(); });
  uv_unref(as_handle(&log_turn_));
  uv_timer_init(&loop_, &log_retry_);
  log_retry_.data = this;
  uv_unref(as_handle(&log_retry_));
  uv_async_init(&loop_, &wake_, [](uv_async_t* a) { static_cast<Worker*>(a->data)->on_wake(); });
  wake_.data = this;
  uv_timer_init(&loop_, &linger_timer_);
  linger_timer_.data = this;
  linger_timer_open_ = true;
  access_log_ = snapshot_->config->log.access_log;
  log_json_ = snapshot_->config->log.format == LogFormat::json;
  epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
  if (epfd_ >= 0 && uv_poll_init(&loop_, &ep_poll_, epfd_) == 0) {
    ep_open_ = true;
    ep_poll_.data = this;
    uv_poll_start(&ep_poll_, UV_READABLE, [](uv_poll_t* p, int, int) { static_cast<Worker*>(p->data)->dispatch(); });
  } else {
    spdlog::error("worker {}: cannot create its epoll set: {}", index_, std::strerror(errno));
    if (epfd_ >= 0) ::close(epfd_);
    epfd_ = -1;
  }
}

bool Worker::watch(Conn& c) {
  if (!ep_open_) return false;
  epoll_event ev{};
  ev.events = kConnEvents;
  ev.data.ptr = &c;
  return ::epoll_ctl(epfd_, EPOLL_CTL_ADD, c.fd, &ev) == 0;
}

void Worker::rearm(Conn& c) {
  epoll_event ev{};
  ev.events = kConnEvents;
  ev.data.ptr = &c;
  ::epoll_ctl(epfd_, EPOLL_CTL_MOD, c.fd, &ev);
}

void Worker::retire(Upstream* up) {
  if (in_dispatch_)
    retired_.push_back(up);
  else
    delete up;
}

// The uv loop reported the epoll set readable: take its events and hand each to its
// session. Edge-triggered, so each socket is added once and needs no epoll_ctl when it
// switches between reading and writing; its events carry EPOLLRDHUP, so a reply that
// arrives together with the server's FIN costs no extra read to learn about the EOF.
// Sessions are freed in libuv close callbacks (after this) and abandoned backend attempts
// at the end of the batch, so an event collected for either never points at freed memory.
void Worker::dispatch() {
  epoll_event events[kEventBatch];
  for (int round = 0; round < 4; ++round) {
    const int n = ::epoll_wait(epfd_, events, kEventBatch, 0);
    if (n <= 0) break;
    in_dispatch_ = true;
    for (int i = 0; i < n; ++i) {
      auto* c = static_cast<Conn*>(events[i].data.ptr);
      if (c->owner && c->fd >= 0) c->owner->io(*c, events[i].events);
    }
    in_dispatch_ = false;
    for (Upstream* up : retired_) delete up;
    retired_.clear();
    if (n < kEventBatch) break;
  }
}

Worker::~Worker() {
  join();
  if (!thread_started_) {
    // Never ran: close what was opened so the loop can be closed cleanly.
    stop_now();
    uv_run(&loop_, UV_RUN_DEFAULT);
  }
  uv_loop_close(&loop_);
}

bool Worker::open_listeners(std::string& error) {
  if (!ep_open_) {
    error = "worker " + std::to_string(index_) + ": cannot create its epoll set";
    return false;
  }
  for (const auto& lr : snapshot_->listeners)
    if (!add_listener(lr, error)) return false;
  return true;
}

bool Worker::add_listener(const std::shared_ptr<ListenerRuntime>& lr, std::string& error) {
  const int fd = index_ < lr->fds.size() ? lr->fds[index_] : -1;
  if (fd < 0) {
    error = "listener " + lr->cfg->name + ": no socket for worker " + std::to_string(index_);
    return false;
  }
  auto* l = new Listener;
  l->worker = this;
  l->runtime = lr;
  l->fd = fd;
  lr->fds[index_] = -1;  // ours now
  uv_poll_init(&loop_, &l->poll, fd);
  uv_timer_init(&loop_, &l->pause);
  l->poll.data = l;
  l->pause.data = l;
  listeners_.push_back(l);
  resume(*l);
  return true;
}

void Worker::resume(Listener& l) {
  uv_poll_start(&l.poll, UV_READABLE, [](uv_poll_t* p, int status, int) {
    auto* self = static_cast<Listener*>(p->data);
    if (status == 0) self->worker->on_readable(*self);
  });
}

bool Worker::at_limit(const ListenerRuntime& lr) const {
  return link_.connections.load(std::memory_order_relaxed) >= snapshot_->config->global.max_connections ||
         lr.state->current.load(std::memory_order_relaxed) >= lr.cfg->max_connections;
}

void Worker::wait_for_room(Listener& l) {
  const uint64_t now = uv_now(&loop_);
  if (!l.waiting_since) {
    l.waiting_since = std::max<uint64_t>(now, 1);
    ListenerRuntime& lr = *l.runtime;
    ListenerState& st = *lr.state;
    int64_t last = st.last_refusal_log_ms.load(std::memory_order_relaxed);
    if (int64_t(now) - last >= 1000 && st.last_refusal_log_ms.compare_exchange_strong(last, int64_t(now)))
      log(spdlog::level::warn,
          "listener {}: connection limit reached (listener max_connections {}, global max_connections {}): new "
          "clients wait in the listen backlog for up to queue_timeout {} of pool {}, then get 421 4.3.2",
          lr.cfg->name, lr.cfg->max_connections, snapshot_->config->global.max_connections,
          format_duration(snapshot_->pools[lr.pool].cfg->queue_timeout), snapshot_->pools[lr.pool].cfg->name);
  }
  uv_poll_stop(&l.poll);
  uv_timer_start(
      &l.pause,
      [](uv_timer_t* t) {
        auto* self = static_cast<Listener*>(t->data);
        Worker& w = *self->worker;
        const ListenerRuntime& lr = *self->runtime;
        const uint64_t waited = uv_now(&w.loop_) - self->waiting_since;
        const bool room = !w.at_limit(lr);
        if (!room && waited < uint64_t(w.snapshot_->pools[lr.pool].cfg->queue_timeout.count())) return;
        // Room, or the oldest waiting client has waited long enough: accept again (and
        // answer 421 to those that still find no room, until the backlog is empty).
        self->refusing = !room;
        uv_timer_stop(t);
        w.resume(*self);
      },
      kLimitRecheckMs, kLimitRecheckMs);
}

std::vector<std::string> Worker::listening() const {
  std::vector<std::string> names;
  for (const Listener* l : listeners_) names.push_back(l->runtime->cfg->name);
  return names;
}

void Worker::close_listener(Listener* l) {
  listeners_.erase(std::find(listeners_.begin(), listeners_.end(), l));
  l->closing = 2;
  auto closed = [](uv_handle_t* h) {
    auto* self = static_cast<Listener*>(h->data);
    if (--self->closing > 0) return;
    ::close(self->fd);  // after the poll handle let go of it
    delete self;
  };
  uv_close(as_handle(&l->poll), closed);
  uv_close(as_handle(&l->pause), closed);
}

void Worker::start() {
  thread_started_ = true;
  link_.running.fetch_add(1);
  thread_ = std::thread([this] {
    // Named for top -H, ps -L and gdb: "smtplb-w0", "smtplb-w1", ...
    const std::string name = "smtplb-w" + std::to_string(index_);
    pthread_setname_np(pthread_self(), name.c_str());
    run();
  });
}

void Worker::join() {
  if (thread_.joinable()) thread_.join();
}

void Worker::run() {
  uv_run(&loop_, UV_RUN_DEFAULT);
  // The data path is over, so waiting for room is fine now: every line of a finished
  // session reaches the writer before the process exits.
  while (!log_.publish()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  link_.worker_done();
}

void Worker::publish_log() {
  if (!log_handles_open_) return;
  const bool published = log_.publish();
  // Also batches that append() handed over during the turn.
  if (log_.handed_over() != log_nudged_) {
    log_nudged_ = log_.handed_over();
    log_writer_.nudge();
  }
  if (published) {
    if (uv_is_active(as_handle(&log_retry_))) uv_timer_stop(&log_retry_);
    return;
  }
  // The writer is behind: keep the lines (the batch grows) and try again soon even if
  // no event comes. An active timer costs no system call, only a shorter poll timeout.
  if (!uv_is_active(as_handle(&log_retry_)))
    uv_timer_start(
        &log_retry_, [](uv_timer_t* t) { static_cast<Worker*>(t->data)->publish_log(); }, kLogRetryMs, kLogRetryMs);
}

void Worker::send_wake() {
  std::lock_guard<std::mutex> lock(wake_mu_);
  if (wake_open_) uv_async_send(&wake_);
}

void Worker::publish(std::shared_ptr<const Snapshot> snapshot) {
  {
    std::lock_guard<std::mutex> lock(pending_mu_);
    pending_.push_back(std::move(snapshot));
  }
  send_wake();
}

void Worker::request_drain() {
  int expected = 0;
  stop_mode_.compare_exchange_strong(expected, 1);
  send_wake();
}

void Worker::request_stop() {
  stop_mode_.store(2);
  send_wake();
}

void Worker::kick() {
  kicked_.store(true);
  send_wake();
}

void Worker::on_wake() {
  std::vector<std::shared_ptr<const Snapshot>> next;
  {
    std::lock_guard<std::mutex> lock(pending_mu_);
    next.swap(pending_);
  }
  // A stopping worker adopts nothing: the sockets stay with their ListenerRuntime,
  // which closes them.
  for (auto& snap : next)
    if (!draining_) apply(std::move(snap));
  const int mode = stop_mode_.load();
  if (mode == 2) {
    stop_now();
    return;
  }
  if (mode == 1 && !draining_) drain_now();
  // A reload may have added capacity (max_connections, weights, states), and a kick says
  // some appeared: queued sessions look again.
  if (kicked_.exchange(false) || !next.empty()) serve_all_queues();
  maybe_finish();
}

void Worker::apply(std::shared_ptr<const Snapshot> snapshot) {
  // Listeners: kept ones (same state object) switch to the new runtime, new ones adopt
  // their freshly bound socket, removed ones stop listening. Open sessions are untouched.
  std::vector<Listener*> old = listeners_;
  std::vector<bool> kept(old.size(), false);
  for (const auto& lr : snapshot->listeners) {
    auto it = std::find_if(old.begin(), old.end(), [&](Listener* l) { return l->runtime->state == lr->state; });
    if (it != old.end()) {
      kept[size_t(it - old.begin())] = true;
      // listen() again on a listening socket only resizes its queue: nothing is dropped.
      if ((*it)->runtime->backlog != lr->backlog && ::listen((*it)->fd, int(std::min<unsigned>(lr->backlog, INT_MAX))))
        log(spdlog::level::warn, "listener {}: cannot change the backlog to {}: {}", lr->cfg->name, lr->backlog,
            std::strerror(errno));
      (*it)->runtime = lr;
      continue;
    }
    std::string error;
    if (!add_listener(lr, error)) log(spdlog::level::err, "{}", error);  // nothing was opened
  }
  for (size_t i = 0; i < old.size(); ++i)
    if (!kept[i]) close_listener(old[i]);
  access_log_ = snapshot->config->log.access_log;
  snapshot_ = std::move(snapshot);
}

void Worker::drain_now() {
  draining_ = true;
  while (!listeners_.empty()) close_listener(listeners_.back());
  for (Session* s = sessions_; s;) {
    Session* next = s->next_;
    s->stop_gracefully();
    s = next;
  }
}

void Worker::stop_now() {
  draining_ = true;
  while (!listeners_.empty()) close_listener(listeners_.back());
  for (Session* s = sessions_; s;) {
    Session* next = s->next_;
    s->stop();
    s = next;
  }
  maybe_finish();
}

void Worker::maybe_finish() {
  if (!draining_ || sessions_) return;
  {
    std::lock_guard<std::mutex> lock(wake_mu_);
    if (!wake_open_) return;
    wake_open_ = false;
  }
  uv_close(as_handle(&wake_), nullptr);
  close_expired_refusals(true);
  if (linger_timer_open_) {
    linger_timer_open_ = false;
    uv_close(as_handle(&linger_timer_), nullptr);
  }
  if (log_handles_open_) {
    log_handles_open_ = false;
    uv_close(as_handle(&log_turn_), nullptr);
    uv_close(as_handle(&log_retry_), nullptr);
  }
  if (ep_open_) {
    ep_open_ = false;
    uv_close(as_handle(&ep_poll_), [](uv_handle_t* h) {
      auto* self = static_cast<Worker*>(h->data);
      ::close(self->epfd_);
      self->epfd_ = -1;
    });
  }
}

void Worker::on_readable(Listener& l) {
  ListenerRuntime& lr = *l.runtime;
  const auto& global = snapshot_->config->global;
  // A bounded batch per wake-up, so one busy listener cannot starve the loop.
  for (int i = 0; i < 64; ++i) {
    // The slot is taken before the accept, so the limits hold exactly across workers and
    // a client is taken from the backlog only when there is room for it (or to refuse it).
    const uint32_t process = link_.connections.fetch_add(1, std::memory_order_relaxed) + 1;
    const uint32_t here = lr.state->current.fetch_add(1, std::memory_order_relaxed) + 1;
    const bool over = process > global.max_connections || here > lr.cfg->max_connections;
    auto give_back = [&] {
      link_.connections.fetch_sub(1, std::memory_order_relaxed);
      lr.state->current.fetch_sub(1, std::memory_order_relaxed);
    };
    // At the limit, clients wait in the backlog (as they would for a slot on a full
    // server) instead of being answered 421 at once: a burst is absorbed as sessions end.
    if (over && !l.refusing && snapshot_->pools[lr.pool].cfg->queue_timeout.count() > 0) {
      give_back();
      wait_for_room(l);
      return;
    }
    SocketAddress peer;
    peer.len = sizeof peer.storage;
    const int fd = ::accept4(l.fd, reinterpret_cast<sockaddr*>(&peer.storage), &peer.len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      give_back();
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        l.waiting_since = 0;  // nobody waits any more
        l.refusing = false;
        return;
      }
      if (errno == ECONNABORTED || errno == EINTR || errno == EPROTO) continue;
      const bool no_fds = errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM;
      const uint64_t now = uv_now(&loop_);
      if (now - last_accept_error_ms_ >= 1000)
        log(spdlog::level::warn, "listener {}: accept failed: {}{}", lr.cfg->name, std::strerror(errno),
            no_fds ? "; pausing accepts (clients wait in the backlog) until descriptors free up" : "");
      last_accept_error_ms_ = now;
      if (no_fds) {
        // Stop polling briefly instead of spinning on a socket that stays readable.
        uv_poll_stop(&l.poll);
        uv_timer_start(
            &l.pause,
            [](uv_timer_t* t) {
              auto* self = static_cast<Listener*>(t->data);
              self->worker->resume(*self);
            },
            kAcceptPauseMs, 0);
      }
      return;
    }
    if (over) {
      // queue_timeout "0s", or these clients have waited it out.
      give_back();
      ListenerState& st = *lr.state;
      st.rejected_limit.fetch_add(1, std::memory_order_relaxed);
      const int64_t now = int64_t(uv_now(&loop_));
      int64_t last = st.last_refusal_log_ms.load(std::memory_order_relaxed);
      if (now - last >= 1000 && st.last_refusal_log_ms.compare_exchange_strong(last, now))
        log(spdlog::level::warn,
            "listener {}: client {} answered 421 4.3.2: connection limit reached (listener max_connections {}, global "
            "max_connections {}) (further refusals within a second are only counted)",
            lr.cfg->name, peer.to_string(), lr.cfg->max_connections, global.max_connections);
      refuse(fd, peer, lr, service_unavailable_reply(global.hostname), {Cause::resource, Phase::connect});
      continue;
    }
    // Address rules on the address accept4 reported; a PROXY listener applies them in
    // the session, once the header has said who the client is.
    ClientTable::Entry* pin = nullptr;
    if (lr.cfg->proxy_protocol == ProxyIn::none && lr.cfg->address_features()) {
      const EdgeCheck e = check_edge(lr, *snapshot_->clients, peer, int64_t(uv_now(&loop_)));
      if (e.outcome != EdgeCheck::Outcome::pass || e.dry_run) note_edge(lr, peer, e);
      if (e.outcome != EdgeCheck::Outcome::pass) {
        give_back();
        if (e.outcome == EdgeCheck::Outcome::limit)
          refuse(fd, peer, lr, too_many_connections_reply(global.hostname), {Cause::client_rule, Phase::limit});
        else
          refuse(fd, peer, lr, lr.cfg->deny_action == DenyAction::reply ? access_denied_reply(global.hostname) : "",
                 {Cause::client_rule, Phase::acl});
        continue;
      }
      pin = e.pin;
    }
    auto* s = new Session(*this, snapshot_, lr);
    s->accept(fd, peer, pin);
  }
}

void Worker::note_edge(const ListenerRuntime& lr, const SocketAddress& peer, const EdgeCheck& e) {
  ListenerState& st = *lr.state;
  const int64_t now = int64_t(uv_now(&loop_));
  int64_t last = st.last_edge_log_ms.load(std::memory_order_relaxed);
  if (now - last < 1000 || !st.last_edge_log_ms.compare_exchange_strong(last, now)) return;
  const ListenerConfig& cfg = *lr.cfg;
  std::string why;
  if (e.outcome == EdgeCheck::Outcome::deny)
    why = cfg.deny_action == DenyAction::reply ? "answered 554 5.7.1: denied by the listener's allow/deny lists"
                                               : "closed: denied by the listener's allow/deny lists";
  else if (e.verdict == ClientTable::Verdict::over_rate)
    why = std::string(e.dry_run ? "would be answered" : "answered") + " 421 4.7.0: key " + e.key.to_string() +
          " over max_connection_rate_per_ip " + cfg.max_connection_rate_per_ip.to_string();
  else
    why = std::string(e.dry_run ? "would be answered" : "answered") + " 421 4.7.0: key " + e.key.to_string() +
          " has max_connections_per_ip " + std::to_string(cfg.max_connections_per_ip) + " sessions open";
  log(spdlog::level::warn, "listener {}: client {} {}{} (further ones within a second are only counted)", cfg.name,
      peer.to_string(), why, e.dry_run ? " (limits_dry_run: served)" : "");
}

void Worker::refuse(int fd, const SocketAddress& peer, ListenerRuntime& lr, const std::string& text, TermCode term) {
  const uint64_t now = uv_now(&loop_);
  ssize_t sent = 0;
  if (!text.empty()) {
    discard_input(fd, scratch_.get(), kScratchSize);
    sent = ::send(fd, text.data(), text.size(), MSG_NOSIGNAL);
    ::shutdown(fd, SHUT_WR);
  }

  ListenerState& st = *lr.state;
  ListenerWorkerCounters& lc = st.per_worker[index_];
  bump(lc.connections);
  bump(lc.terms[term.index()]);
  lc.duration.observe(kDurationBounds, 0);
  if (access_log_) {
    const std::string client = peer.to_string();
    AccessRecord r;
    r.client = client;
    r.listener = lr.cfg->name;
    r.pool = lr.cfg->pool;
    r.server = "-";
    r.bytes_out = sent > 0 ? uint64_t(sent) : 0;
    r.term = term;
    log_access(r);
  }
  if (text.empty()) {  // nothing to deliver: no linger
    ::close(fd);
    return;
  }

  if (lingering_.size() >= kMaxLingering) close_oldest_refusal();
  lingering_.push_back({fd, now + kRefusalLingerMs});
  if (!uv_is_active(as_handle(&linger_timer_))) arm_linger_timer(now);
}

void Worker::close_oldest_refusal() {
  discard_input(lingering_.front().fd, scratch_.get(), kScratchSize);
  ::close(lingering_.front().fd);
  lingering_.pop_front();
}

void Worker::arm_linger_timer(uint64_t now) {
  uv_timer_start(
      &linger_timer_, [](uv_timer_t* t) { static_cast<Worker*>(t->data)->close_expired_refusals(false); },
      lingering_.front().deadline - now, 0);
}

void Worker::close_expired_refusals(bool all) {
  const uint64_t now = uv_now(&loop_);
  while (!lingering_.empty() && (all || lingering_.front().deadline <= now)) close_oldest_refusal();
  if (!lingering_.empty() && linger_timer_open_) arm_linger_timer(now);
}

void Worker::log_access(const AccessRecord& r) {
  if (logs(spdlog::level::info))
    log_line(spdlog::level::info, log_json_ ? format_access_json(r) : format_access_text(r));
}

Selection Worker::pick(const PoolRuntime& pr, std::span<const uint32_t> exclude, const SocketAddress* client) {
  const auto& servers = pr.servers;
  const int64_t now = int64_t(uv_now(&loop_));
  SourceChoice source;
  if (pr.source) {
    Addr128 a;
    const uint64_t key =
        client && to_addr128(*client, a) ? source_key(a, pr.cfg->hash_prefix_v4, pr.cfg->hash_prefix_v6).hash : 0;
    source = {pr.source.get(), SourceTable::bucket_of(key), pr.cfg->hash_balance_factor};
    // The usual case reads only the key's first preferences, whatever the pool's size.
    Selection sel;
    sel.index = PoolBalancer::pick_source_cached(
        source, [&](size_t i) { return servers[i]->view(now); }, exclude,
        [&](size_t i) { return servers[i]->try_acquire(); });
    if (sel.index) return sel;
  }
  views_.resize(servers.size());
  for (size_t i = 0; i < servers.size(); ++i) views_[i] = servers[i]->view(now);
  PoolBalancer& balancer = pr.state->per_worker[index_].balancer;
  const Selection sel = balancer.pick(
      pr.cfg->algorithm, views_, exclude, pr.cfg->slow_start.count(),
      [&](size_t i) { return servers[i]->try_acquire(); }, pr.source ? &source : nullptr);
  if (sel.detoured) pr.state->source_detours.fetch_add(1, std::memory_order_relaxed);
  return sel;
}

void Worker::enqueue(SessionCore* s, const std::shared_ptr<PoolState>& pool) {
  PoolWorkerState& q = pool->per_worker[index_];
  if (!q.head) waiting_pools_.push_back(pool);
  s->q_prev_ = q.tail;
  s->q_next_ = nullptr;
  if (q.tail)
    q.tail->q_next_ = s;
  else
    q.head = s;
  q.tail = s;
  // Pairs with ServerRuntime::release (both read-modify-write `queued`, acquire and
  // release): a slot freed before this point is seen by the look below, one freed after
  // it sees `queued` and wakes a worker.
  pool->queued.fetch_add(1, std::memory_order_acq_rel);
  serve_queue(*pool);
}

void Worker::dequeue(SessionCore* s, PoolState& pool) {
  PoolWorkerState& q = pool.per_worker[index_];
  if (s->q_prev_)
    s->q_prev_->q_next_ = s->q_next_;
  else
    q.head = s->q_next_;
  if (s->q_next_)
    s->q_next_->q_prev_ = s->q_prev_;
  else
    q.tail = s->q_prev_;
  s->q_prev_ = s->q_next_ = nullptr;
  pool.queued.fetch_sub(1, std::memory_order_relaxed);
  if (!q.head) std::erase_if(waiting_pools_, [&](const std::shared_ptr<PoolState>& p) { return p.get() == &pool; });
}

void Worker::serve_queue(PoolState& pool) {
  PoolWorkerState& q = pool.per_worker[index_];
  while (SessionCore* s = q.head)
    if (!s->slot_offered(uv_now(&loop_))) break;
}

void Worker::serve_all_queues() {
  // Serving a queue may empty it and drop the pool from waiting_pools_: walk a copy.
  const std::vector<std::shared_ptr<PoolState>> pools = waiting_pools_;
  for (const auto& p : pools) serve_queue(*p);
}

void Worker::slot_freed(PoolState& pool) {
  if (pool.per_worker[index_].head) {
    serve_queue(pool);
    return;
  }
  // The waiters are on other workers.
  for (Worker* w : peers_)
    if (w != this) w->kick();
}

void Worker::report_failure(const std::shared_ptr<ServerRuntime>& server, unsigned fall, const std::string& reason) {
  const uint32_t n = server->passive_failures.fetch_add(1, std::memory_order_relaxed) + 1;
  if (n > fall || server->health.load(std::memory_order_relaxed) != Health::up) return;
  log(spdlog::level::warn, "server {} session attempt failed ({}), {} of {} before DOWN", server->label, reason, n,
      fall);
  if (n == fall) {
    // The control loop writes this worker's lines before it logs the DOWN they cause.
    log_.publish();
    link_.report({server, reason});
  }
}

void Worker::link(Session* s) {
  s->next_ = sessions_;
  s->prev_ = nullptr;
  if (sessions_) sessions_->prev_ = s;
  sessions_ = s;
}

void Worker::unlink(Session* s) {
  if (s->prev_)
    s->prev_->next_ = s->next_;
  else
    sessions_ = s->next_;
  if (s->next_) s->next_->prev_ = s->prev_;
  s->next_ = s->prev_ = nullptr;
  maybe_finish();
}

}  // namespace smtplb
