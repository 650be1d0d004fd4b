#include "worker.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "session.hpp"
#include "uv_util.hpp"

namespace smtplb {

namespace {
constexpr int kBacklog = 4096;  // the kernel caps it at net.core.somaxconn
}

void ControlLink::report(PassiveDown event) {
  {
    std::lock_guard<std::mutex> lock(mu);
    passive.push_back(std::move(event));
  }
  uv_async_send(wake);
}

Worker::Worker(unsigned index, std::shared_ptr<const Snapshot> snapshot, ControlLink& link)
    : index_(index), link_(link), snapshot_(std::move(snapshot)), scratch_(new char[kScratchSize]) {
  uv_loop_init(&loop_);
  loop_.data = this;
  uv_async_init(&loop_, &wake_, [](uv_async_t* a) { static_cast<Worker*>(a->data)->on_wake(); });
  wake_.data = this;
  access_log_ = snapshot_->config->log.access_log;
  balancers_.resize(snapshot_->pools.size());
  queues_.resize(snapshot_->pools.size());
}

bool Worker::open_listeners(std::string& error) {
  for (const auto& lr : snapshot_->listeners) {
    auto l = std::make_unique<Listener>();
    l->worker = this;
    l->runtime = lr;
    uv_tcp_init(&loop_, &l->tcp);
    l->tcp.data = l.get();
    int rc = uv_tcp_open(&l->tcp, lr->fds.at(index_));
    if (rc == 0) lr->fds[index_] = -1;  // the handle owns it now
    if (rc == 0)
      rc = uv_listen(as_stream(&l->tcp), kBacklog, [](uv_stream_t* s, int status) {
        auto* self = static_cast<Listener*>(s->data);
        self->worker->on_connection(*self, status);
      });
    listeners_.push_back(std::move(l));
    if (rc != 0) {
      error = "listener " + lr->cfg->name + ": cannot listen on " + lr->bound.to_string() + ": " + uv_strerror(rc);
      return false;
    }
  }
  return true;
}

Worker::~Worker() {
  join();
  if (!thread_started_) {
    // Never ran: close what the constructor opened so the loop can be closed cleanly.
    stop_now();
    uv_run(&loop_, UV_RUN_DEFAULT);
  }
  uv_loop_close(&loop_);
}

void Worker::start() {
  thread_started_ = true;
  thread_ = std::thread([this] { run(); });
}

void Worker::request_stop() {
  stop_requested_.store(true);
  uv_async_send(&wake_);
}

void Worker::join() {
  if (thread_.joinable()) thread_.join();
}

void Worker::run() {
  uv_run(&loop_, UV_RUN_DEFAULT);
}

void Worker::kick() {
  kicked_.store(true);
  uv_async_send(&wake_);
}

void Worker::on_wake() {
  if (stop_requested_.load()) {
    stop_now();
    return;
  }
  if (kicked_.exchange(false))
    for (size_t p = 0; p < queues_.size(); ++p) serve_queue(p);
}

void Worker::stop_now() {
  for (auto& l : listeners_)
    if (!uv_is_closing(as_handle(&l->tcp))) uv_close(as_handle(&l->tcp), nullptr);
  for (Session* s = sessions_; s;) {
    Session* next = s->next_;
    s->kill();
    s = next;
  }

  if (!uv_is_closing(as_handle(&wake_))) uv_close(as_handle(&wake_), nullptr);
}

void Worker::on_connection(Listener& l, int status) {
  if (status < 0) {
    spdlog::warn("listener {}: accept failed: {}", l.runtime->cfg->name, uv_strerror(status));
    return;
  }
  auto* s = new Session(*this, snapshot_, *l.runtime);
  if (uv_accept(as_stream(&l.tcp), as_stream(s->client())) != 0) {
    s->kill();
    return;
  }
  s->start();
}

Worker::Pick Worker::pick(const Snapshot& snap, size_t pool, std::span<const uint32_t> exclude) {
  const PoolRuntime& pr = snap.pools[pool];
  const auto& servers = pr.servers;
  const size_t n = servers.size();
  candidates_.resize(n);
  // Backup servers only stand in while no regular server is usable (full ones count as
  // usable: their clients queue rather than spill over to the backups).
  bool regular_usable = false;
  for (const auto& s : servers) regular_usable |= !s->cfg.backup && s->usable();
  const int64_t now = pr.cfg->slow_start.count() ? int64_t(uv_now(&loop_)) : 0;
  bool any_usable = false, any_free = false;
  for (size_t i = 0; i < n; ++i) {
    const ServerRuntime& s = *servers[i];
    const bool usable = s.usable() && s.cfg.backup != regular_usable;
    const bool free = usable && !s.full();
    any_usable |= usable;
    any_free |= free;
    const int64_t ramp = s.ramp_start_ms.load(std::memory_order_relaxed);
    candidates_[i] = {effective_weight(s.cfg.weight, ramp < 0 ? -1 : now - ramp, pr.cfg->slow_start.count()),
                      s.active.load(std::memory_order_relaxed),
                      free && std::find(exclude.begin(), exclude.end(), i) == exclude.end()};
  }
  Pick result;
  if (!any_free) {
    result.all_full = any_usable;
    return result;
  }
  PoolBalancer& b = balancers_[pool];
  const bool lc = pr.cfg->algorithm == Algorithm::leastconn;
  bool widened = false;
  for (size_t round = 0; round <= n; ++round) {
    auto picked = lc ? b.lc.pick(candidates_) : b.rr.pick(candidates_);
    if (!picked) {
      if (widened) break;
      // Every free server was tried already: a retry may go back to one of them.
      widened = true;
      for (size_t i = 0; i < n; ++i) candidates_[i].eligible = servers[i]->usable() && !servers[i]->full() &&
                                                               servers[i]->cfg.backup != regular_usable;
      continue;
    }
    if (servers[*picked]->try_acquire()) {
      result.index = picked;
      return result;
    }
    // Another worker took the last slot in the meantime.
    candidates_[*picked].eligible = false;
  }
  result.all_full = true;
  return result;
}

void Worker::enqueue(Session* s, size_t pool) {
  Queue& q = queues_[pool];
  s->q_prev_ = q.tail;
  s->q_next_ = nullptr;
  if (q.tail) q.tail->q_next_ = s;
  else q.head = s;
  q.tail = s;
  snapshot_->pools[pool].state->queued.fetch_add(1, std::memory_order_relaxed);
}

void Worker::dequeue(Session* s, size_t pool) {
  Queue& q = queues_[pool];
  if (s->q_prev_) s->q_prev_->q_next_ = s->q_next_;
  else q.head = s->q_next_;
  if (s->q_next_) s->q_next_->q_prev_ = s->q_prev_;
  else q.tail = s->q_prev_;
  s->q_prev_ = s->q_next_ = nullptr;
  snapshot_->pools[pool].state->queued.fetch_sub(1, std::memory_order_relaxed);
}

void Worker::serve_queue(size_t pool) {
  while (Session* s = queues_[pool].head)
    if (!s->retry_from_queue()) break;
}

void Worker::slot_freed(size_t pool) {
  if (queues_[pool].head) {
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
  spdlog::warn("server {} session attempt failed ({}), {} of {} before DOWN", server->label, reason, n, fall);
  if (n == fall) link_.report({server, reason});
}

void Worker::link(Session* s) {
  s->next_ = sessions_;
  s->prev_ = nullptr;
  if (sessions_) sessions_->prev_ = s;
  sessions_ = s;
}

void Worker::unlink(Session* s) {
  if (s->prev_) s->prev_->next_ = s->next_;
  else sessions_ = s->next_;
  if (s->next_) s->next_->prev_ = s->prev_;
  s->next_ = s->prev_ = nullptr;
}

}  // namespace smtplb
