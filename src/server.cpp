#include "server.hpp"

#include <signal.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <thread>

#include "listener.hpp"
#include "smtplb/version.hpp"
#include "uv_util.hpp"

namespace smtplb {

Server::Server(std::shared_ptr<const Config> config) : config_(std::move(config)), signals_(4) {
  uv_loop_init(&loop_);
}

Server::~Server() {
  // Handles are all closed by the time run() returns; workers join in their destructors.
  workers_.clear();
  checkers_.clear();
  if (snapshot_)
    for (auto& l : snapshot_->listeners) close_listener_fds(*l);
  uv_loop_close(&loop_);
}

int Server::run() {
  snapshot_ = build_snapshot(config_, 1);
  unsigned n = config_->global.workers;
  if (n == 0) n = std::max(1u, std::thread::hardware_concurrency());

  std::string error;
  for (auto& l : snapshot_->listeners) {
    if (!bind_listener(*l, n, error)) {
      spdlog::error("{}", error);
      return 1;
    }
  }
  for (unsigned i = 0; i < n; ++i) {
    workers_.push_back(std::make_unique<Worker>(i, snapshot_, link_));
    if (!workers_.back()->open_listeners(error)) {
      spdlog::error("{}", error);
      return 1;
    }
  }
  std::vector<Worker*> peers;
  for (auto& w : workers_) peers.push_back(w.get());
  for (auto& w : workers_) w->set_peers(peers);
  uv_async_init(&loop_, &passive_async_, [](uv_async_t* a) { static_cast<Server*>(a->data)->on_passive_reports(); });
  passive_async_.data = this;
  link_.wake = &passive_async_;

  // The first checks start at once, about 2 ms apart (200 servers: within 0.4 s), so a
  // restarted balancer takes traffic within one check dialogue, sends none to an
  // unchecked server, and does not probe a large fleet in the same millisecond.
  size_t total = 0;
  for (const auto& p : snapshot_->pools) total += p.servers.size();
  const uint64_t window = std::max<uint64_t>(1, 2 * total);
  std::minstd_rand rng(std::random_device{}());
  for (size_t p = 0; p < snapshot_->pools.size(); ++p) {
    const PoolConfig& pc = *snapshot_->pools[p].cfg;
    for (auto& s : snapshot_->pools[p].servers) {
      auto c = std::make_unique<HealthChecker>(
          &loop_, p, s, pc.health_check,
          [this](HealthChecker& hc, Health from, Health to, const CheckResult& r) { on_transition(hc, from, to, r); });
      if (s->cfg.state == AdminState::maint)
        spdlog::info("server {} is in maintenance (state = \"maint\"): not checked, no sessions", s->label);
      else
        c->start(std::min<uint64_t>(rng() % window, uint64_t(pc.health_check.interval.count())));
      if (s->cfg.state == AdminState::drain)
        spdlog::info("server {} is draining (state = \"drain\"): checked, no new sessions", s->label);
      checkers_.push_back(std::move(c));
    }
  }

  const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGUSR1};
  for (size_t i = 0; i < 4; ++i) {
    uv_signal_init(&loop_, &signals_[i]);
    signals_[i].data = this;
    uv_signal_start(&signals_[i], [](uv_signal_t* h, int signum) { static_cast<Server*>(h->data)->on_signal(signum); },
                    sigs[i]);
  }
  ::signal(SIGPIPE, SIG_IGN);

  for (auto& w : workers_) w->start();
  for (auto& l : snapshot_->listeners)
    spdlog::info("listener {} listening on {} for pool {} ({} workers)", l->cfg->name, l->bound.to_string(),
                 l->cfg->pool, n);
  spdlog::info("smtplb {} started: {} listeners, {} pools, {} servers", kVersion, snapshot_->listeners.size(),
               snapshot_->pools.size(), checkers_.size());

  uv_run(&loop_, UV_RUN_DEFAULT);
  for (auto& w : workers_) w->join();
  spdlog::info("smtplb stopped");
  return 0;
}

void Server::on_signal(int signum) {
  switch (signum) {
    case SIGINT:
    case SIGTERM:
      spdlog::info("received {}, stopping", signum == SIGINT ? "SIGINT" : "SIGTERM");
      stop();
      break;
    case SIGHUP:
      spdlog::warn("received SIGHUP: reloading is not available in this version; restart smtplb to apply changes");
      break;
    case SIGUSR1:
      spdlog::info("received SIGUSR1: logs go to stderr, nothing to reopen");
      break;
  }
}

void Server::stop() {
  if (stopping_) return;
  stopping_ = true;
  for (auto& w : workers_) w->request_stop();
  for (auto& c : checkers_) c->stop();
  uv_close(as_handle(&passive_async_), nullptr);
  for (auto& s : signals_) uv_close(as_handle(&s), nullptr);
}

void Server::on_transition(HealthChecker& c, Health from, Health to, const CheckResult& r) {
  const PoolRuntime& pool = snapshot_->pools[c.pool_index()];
  size_t up = 0, unchecked = 0;
  for (const auto& s : pool.servers) {
    const Health h = s->health.load(std::memory_order_relaxed);
    up += h == Health::up;
    unchecked += h == Health::unknown;
  }
  const size_t total = pool.servers.size();
  ServerRuntime& server = c.server();
  if (to == Health::up) {
    server.passive_failures.store(0, std::memory_order_relaxed);
    const auto ramp = pool.cfg->slow_start;
    if (from == Health::down && ramp.count() > 0) {
      server.ramp_start_ms.store(int64_t(uv_now(&loop_)), std::memory_order_relaxed);
      spdlog::info("server {} slow start: weight ramps to {} over {}", server.label, server.cfg.weight,
                   format_duration(ramp));
    }
    // New capacity: sessions queued for a full pool may go now.
    for (auto& w : workers_) w->kick();
  } else {
    server.ramp_start_ms.store(-1, std::memory_order_relaxed);
  }
  if (to == Health::up) {
    spdlog::info("server {} is UP: check passed{}, {} of {} servers up", c.server().label,
                 from == Health::unknown ? " (first check)" : "", up, total);
  } else {
    if (r.passive)
      spdlog::warn("server {} is DOWN: {} failed sessions in a row ({}), {} of {} servers up", server.label,
                   pool.cfg->health_check.fall, r.reason, up, total);
    else
      spdlog::warn("server {} is DOWN: check failed ({}), {} of {} servers up", server.label, r.reason, up, total);
    if (up == 0 && unchecked == 0) spdlog::error("pool {} has no usable server: clients get 421 4.3.2", pool.cfg->name);
  }
}

void Server::on_passive_reports() {
  std::vector<PassiveDown> events;
  {
    std::lock_guard<std::mutex> lock(link_.mu);
    events.swap(link_.passive);
  }
  for (auto& e : events)
    for (auto& c : checkers_)
      if (&c->server() == e.server.get()) c->force_down(e.reason);
}

}  // namespace smtplb
