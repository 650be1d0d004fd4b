#include "control/process.hpp"

#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/resource.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "control/cpu_probe.hpp"
#include "data/listener.hpp"
#include "log/log.hpp"
#include "runtime/uv_util.hpp"
#include "smtplb/config/cpus.hpp"
#include "smtplb/config/resolve_plan.hpp"
#include "smtplb/lb/check_schedule.hpp"
#include "smtplb/version.hpp"

namespace smtplb {

namespace {

void warn_backlog(const ListenerRuntime& l) {
  if (l.backlog > l.somaxconn)
    spdlog::warn(
        "listener {}: backlog {} is above net.core.somaxconn ({}); the kernel queues at most {} (raise the "
        "sysctl)",
        l.cfg->name, l.backlog, l.somaxconn, l.somaxconn);
}

void log_listening(const ListenerRuntime& l, unsigned workers) {
  spdlog::info("listener {} listening on {} for pool {} ({} workers, backlog {})", l.cfg->name, l.bound.to_string(),
               l.cfg->pool, workers, l.backlog);
  warn_backlog(l);
}

}  // namespace

Process::Process(std::shared_ptr<const Config> config, std::optional<LogLevel> level_override)
    : config_(std::move(config)), level_override_(level_override), signals_(4) {
  uv_loop_init(&loop_);
}

Process::~Process() {
  // Handles are all closed by the time run() returns; workers join in their destructors.
  workers_.clear();
  checkers_.clear();
  agents_.clear();
  if (snapshot_)
    for (auto& l : snapshot_->listeners) close_listener_fds(*l);
  uv_loop_close(&loop_);
}

void Process::raise_fd_limit() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  if (rl.rlim_cur < rl.rlim_max) {
    const rlim_t before = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) rl.rlim_cur = before;
  }
  // Each relayed session needs two descriptors.
  spdlog::info("open files limit {} (about {} sessions)", (unsigned long long)rl.rlim_cur,
               (unsigned long long)rl.rlim_cur / 2);
}

namespace {
int64_t wall_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}
}  // namespace

int Process::run() {
  start_time_ms_ = generation_loaded_ms_ = wall_ms();
  raise_fd_limit();
  snapshot_ = build_snapshot(config_, generation_);
  worker_count_ = config_->global.workers;
  if (worker_count_ == 0) {
    // One per CPU this process may really use; never more than the per-worker counter
    // slots (a 128-CPU machine must not overrun them).
    const CpuBudget cpus = probe_cpus();
    worker_count_ = workers_for_cpus(cpus.affinity, cpus.quota, unsigned(kMaxWorkers));
    spdlog::info("workers = 0: running {} workers ({} CPUs in the affinity mask; {}{})", worker_count_, cpus.affinity,
                 cpus.quota ? fmt::format("cgroup CPU quota {:.2f} CPUs in {}", *cpus.quota, cpus.quota_source)
                            : std::string("no cgroup CPU quota"),
                 worker_count_ == kMaxWorkers && cpus.affinity > kMaxWorkers
                     ? fmt::format("; capped at {}", kMaxWorkers)
                     : std::string());
  }

  log_writer_ = std::make_unique<LogWriter>(worker_count_);
  std::string error;
  for (auto& l : snapshot_->listeners) {
    if (!bind_listener(*l, worker_count_, error)) {
      spdlog::error("{}", error);
      return 1;
    }
  }
  for (unsigned i = 0; i < worker_count_; ++i) {
    workers_.push_back(std::make_unique<Worker>(i, snapshot_, link_, *log_writer_));
    if (!workers_.back()->open_listeners(error)) {
      spdlog::error("{}", error);
      return 1;
    }
  }
  std::vector<Worker*> peers;
  for (auto& w : workers_) peers.push_back(w.get());
  for (auto& w : workers_) w->set_peers(peers);
  uv_async_init(&loop_, &control_wake_, [](uv_async_t* a) { static_cast<Process*>(a->data)->on_control_wake(); });
  control_wake_.data = this;
  link_.wake = &control_wake_;
  uv_timer_init(&loop_, &grace_timer_);
  grace_timer_.data = this;
  uv_timer_init(&loop_, &resolve_timer_);
  resolve_timer_.data = this;

  // The first checks start at once, 2 ms apart (200 servers: within 0.4 s; never longer
  // than the interval), so a restarted balancer takes traffic within one check dialogue,
  // sends none to an unchecked server, and does not probe a large fleet in one burst.
  // From then on each server keeps its own slot: N servers checked every I ms are probed
  // one every I/N ms (lb/check_schedule.hpp).
  size_t total = 0;
  for (const auto& p : snapshot_->pools) total += p.servers.size();
  uv_update_time(&loop_);
  check_epoch_ms_ = uv_now(&loop_);
  assign_check_slots(*snapshot_);
  size_t index = 0;
  for (const auto& p : snapshot_->pools)
    for (const auto& s : p.servers)
      start_checker(s, *p.cfg,
                    on_check_tick(first_check_delay(index++, total, uint64_t(p.cfg->health_check.interval.count()))));

  admin_ = std::make_unique<AdminServer>(&loop_, [this](const AdminServer::Request& r) { return admin(r); });
  if (!admin_->start(*config_, error)) {
    spdlog::error("{}", error);
    admin_->stop();
    for (auto& w : workers_) w->request_stop();
    uv_close(as_handle(&control_wake_), nullptr);
    uv_close(as_handle(&grace_timer_), nullptr);
    uv_close(as_handle(&resolve_timer_), nullptr);
    for (auto& [s, c] : checkers_) c->stop();
    for (auto& [s, a] : agents_) AgentChecker::dispose(std::move(a));
    agents_.clear();
    uv_run(&loop_, UV_RUN_DEFAULT);
    return 1;
  }

  const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGUSR1};
  for (size_t i = 0; i < 4; ++i) {
    uv_signal_init(&loop_, &signals_[i]);
    signals_[i].data = this;
    uv_signal_start(
        &signals_[i], [](uv_signal_t* h, int signum) { static_cast<Process*>(h->data)->on_signal(signum); }, sigs[i]);
  }
  ::signal(SIGPIPE, SIG_IGN);

  for (auto& w : workers_) w->start();
  for (auto& l : snapshot_->listeners) log_listening(*l, worker_count_);
  spdlog::info("smtplb {} started: generation {}, {} listeners, {} pools, {} servers", kVersion, generation_,
               snapshot_->listeners.size(), snapshot_->pools.size(), total);
  notifier_.ready("generation " + std::to_string(generation_) + " running, " +
                  std::to_string(snapshot_->listeners.size()) + " listeners");
  schedule_refresh();

  uv_run(&loop_, UV_RUN_DEFAULT);
  for (auto& w : workers_) w->join();
  // Every access line is written before the last line.
  log_writer_->stop();
  spdlog::info("smtplb stopped");
  return 0;
}

void Process::start_checker(const std::shared_ptr<ServerRuntime>& s, const PoolConfig& pool, uint64_t delay_ms) {
  if (s->cfg.addr.len == 0) {
    // Its host name did not resolve: DOWN (not unknown: nothing will check it) until an
    // answer comes and passes its check (start_candidate).
    s->health.store(Health::down, std::memory_order_relaxed);
    s->last_check_reason = "cannot resolve " + s->cfg.address;
    s->last_change_cause = s->last_check_reason;
    s->last_change_ms = wall_ms();
    spdlog::warn("server {} is DOWN: cannot resolve {}; the name is looked up again", s->label, s->cfg.address);
    return;
  }
  if (s->admin.load() == AdminState::maint) {
    spdlog::info("server {} is in maintenance (state = \"maint\"): not checked, no sessions", s->label);
    return;
  }
  if (s->admin.load() == AdminState::drain)
    spdlog::info("server {} is draining (state = \"drain\"): checked, no new sessions", s->label);
  auto c = std::make_unique<HealthChecker>(
      &loop_, pool.proxy_protocol, s, pool.health_check,
      [this](HealthChecker& hc, Health from, Health to, const CheckResult& r) { on_transition(hc, from, to, r); });
  auto slot = check_offsets_.find(s.get());
  c->set_slot(check_epoch_ms_, slot != check_offsets_.end() ? slot->second : 0);
  c->start(std::min<uint64_t>(delay_ms, uint64_t(pool.health_check.interval.count())));
  checkers_[s.get()] = std::move(c);
  start_agent(s, pool, delay_ms);
}

void Process::assign_check_slots(const Snapshot& snap) {
  size_t total = 0;
  for (const auto& p : snap.pools) total += p.servers.size();
  check_offsets_.clear();
  size_t index = 0;
  for (const auto& p : snap.pools)
    for (const auto& s : p.servers) {
      const uint64_t offset =
          on_check_tick(check_slot_offset(index++, total, uint64_t(p.cfg->health_check.interval.count())));
      check_offsets_[s.get()] = offset;
      if (auto it = checkers_.find(s.get()); it != checkers_.end()) it->second->set_slot(check_epoch_ms_, offset);
    }
}

void Process::retire_checker(ServerRuntime* s) {
  retire_agent(s);
  auto it = checkers_.find(s);
  if (it == checkers_.end()) return;
  HealthChecker::dispose(std::move(it->second));
  checkers_.erase(it);
}

void Process::start_agent(const std::shared_ptr<ServerRuntime>& s, const PoolConfig& pool, uint64_t delay_ms) {
  if (pool.health_check.agent_port == 0 || s->cfg.addr.len == 0 || agents_.count(s.get())) return;
  auto a =
      std::make_unique<AgentChecker>(&loop_, s, pool.health_check,
                                     [this](AgentChecker& ac, bool ok, const AgentReply& reply, const std::string& line,
                                            const std::string& error) { on_agent(ac, ok, reply, line, error); });
  a->start(std::min<uint64_t>(delay_ms, uint64_t(pool.health_check.agent_every().count())));
  agents_[s.get()] = std::move(a);
}

void Process::retire_agent(ServerRuntime* s) {
  auto it = agents_.find(s);
  if (it == agents_.end()) return;
  AgentChecker::dispose(std::move(it->second));
  agents_.erase(it);
}

namespace {
// What the agent says: down, drain, maint, or up (as in /status and the metrics).
const char* agent_state_name(const ServerRuntime& s) {
  if (s.agent_down.load()) return "down";
  const AdminState a = s.agent_admin.load();
  return a == AdminState::ready ? "up" : to_string(a);
}
std::string printable_line(std::string_view s) {
  std::string out;
  for (char c : s) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  return out;
}
}  // namespace

void Process::on_agent(AgentChecker& a, bool ok, const AgentReply& reply, const std::string& line,
                       const std::string& error) {
  ServerRuntime& s = a.server();
  if (!ok) {
    bump(s.agent_failures);
    if (!a.failing)
      spdlog::warn("server {} agent at {}: {}; its last answer stays in force (logged again only after it answers)",
                   s.label, a.target(), error);
    a.failing = true;
    return;
  }
  if (a.failing) spdlog::info("server {} agent at {} answers again", s.label, a.target());
  a.failing = false;
  const uint32_t weight_before = s.effective_weight();
  const std::string state_before = agent_state_name(s);
  const bool usable_before = s.usable();
  if (reply.weight_percent) s.agent_percent.store(*reply.weight_percent);
  if (reply.admin) s.agent_admin.store(*reply.admin);
  if (reply.up) s.agent_down.store(!*reply.up);
  s.agent_reply = printable_line(line);
  const uint32_t weight_after = s.effective_weight();
  const std::string state_after = agent_state_name(s);
  if (weight_after == weight_before && state_after == state_before) return;
  spdlog::info(
      "server {} agent says \"{}\": agent state {} -> {}, weight {} -> {} ({}% of {}); admin state {}, "
      "{}",
      s.label, s.agent_reply, state_before, state_after, weight_before, weight_after, s.agent_percent.load(),
      s.weight.load(), to_string(s.effective_admin()), s.usable() ? "takes new sessions" : "no new sessions");
  // New capacity: sessions queued for a full pool may go now.
  if (weight_after > weight_before || (!usable_before && s.usable()))
    for (auto& w : workers_) w->kick();
}

void Process::reload(ReloadDone done) {
  if (phase_ != Phase::running) {
    ReloadResult r;
    r.abandoned = true;
    r.generation = generation_;
    if (done) done(r);
    return;
  }
  if (resolver_.busy()) {
    if (!reload_again_) spdlog::info("reload requested while the previous one waits for host names: it follows");
    reload_again_ = true;
    if (done) next_waiters_.push_back(std::move(done));
    return;
  }
  if (done) reload_waiters_.push_back(std::move(done));
  start_reload();
}

void Process::start_reload() {
  notifier_.reloading();
  spdlog::info("reloading configuration from {}", config_->path);
  ConfigLoad load = load_config_file(config_->path);
  if (!load.ok()) {
    std::vector<std::string> errors;
    for (const auto& e : load.errors) errors.push_back(e.to_string());
    return answer_reload(fail_reload(std::move(errors)));
  }
  std::vector<std::string> hosts = hosts_to_resolve(*load.config);
  if (hosts.empty()) return answer_reload(apply_reload(load.config));
  std::string list;
  for (const auto& h : hosts) list += (list.empty() ? "" : ", ") + h;
  spdlog::info("reload: resolving {} host name{}: {}", hosts.size(), hosts.size() == 1 ? "" : "s", list);
  resolver_.start(std::move(hosts), kResolveTimeout, [this, cfg = load.config](std::vector<HostLookup> lookups) {
    // Never fails: a name without an answer keeps the running address of its server, or
    // leaves a new server without one (DOWN, looked up again).
    ConfigLoad resolved = apply_lookups(*cfg, lookups, config_.get());
    for (const auto& w : resolved.warnings) spdlog::warn("reload: {}", w.to_string());
    const ReloadResult r = apply_reload(resolved.config);
    // Changed answers for kept servers: checked at the new address, then switched.
    if (r.ok) on_lookups(lookups, true);
    answer_reload(r);
  });
}

void Process::answer_reload(const ReloadResult& r) {
  std::vector<ReloadDone> waiters;
  waiters.swap(reload_waiters_);
  for (auto& w : waiters) w(r);
  if (reload_again_ && phase_ == Phase::running && !resolver_.busy()) {
    reload_again_ = false;
    reload_waiters_.swap(next_waiters_);
    start_reload();
  }
}

void Process::abandon_reload() {
  if (!resolver_.busy() && !reload_again_) return;
  resolver_.cancel();
  reload_again_ = false;
  spdlog::info("reload abandoned: stopping");
  ReloadResult r;
  r.abandoned = true;
  r.generation = generation_;
  std::vector<ReloadDone> waiters;
  waiters.swap(reload_waiters_);
  for (auto& w : next_waiters_) waiters.push_back(std::move(w));
  next_waiters_.clear();
  for (auto& w : waiters) w(r);
}

Process::ReloadResult Process::fail_reload(std::vector<std::string> errors) {
  ReloadResult result;
  result.generation = generation_;
  ++reloads_failed_;
  last_reload_ok_ = false;
  for (const auto& e : errors) spdlog::error("reload: {}", e);
  spdlog::error("reload failed ({} errors); still running generation {}", errors.size(), generation_);
  notifier_.ready("reload failed (" + std::to_string(errors.size()) + " errors); generation " +
                  std::to_string(generation_) + " running");
  result.errors = std::move(errors);
  return result;
}

Process::ReloadResult Process::apply_reload(std::shared_ptr<const Config> cfg) {
  ReloadResult result;
  result.generation = generation_;
  if (cfg->global.workers != config_->global.workers)
    spdlog::warn("reload: global.workers changed to {}; it takes effect at the next restart ({} workers run)",
                 cfg->global.workers, worker_count_);
  if (cfg->log.target != config_->log.target || cfg->log.file != config_->log.file ||
      cfg->log.format != config_->log.format)
    spdlog::warn("reload: log.target, log.file and log.format take effect at the next restart");

  const ReloadPlan plan = plan_reload(*config_, *cfg);
  auto next = build_snapshot(cfg, generation_ + 1, snapshot_.get(), &plan);
  // New listeners get their sockets now; a failure leaves everything as it was.
  std::vector<ListenerRuntime*> bound;
  for (size_t li = 0; li < next->listeners.size(); ++li) {
    if (plan.listeners[li]) continue;  // kept: the workers keep their sockets
    ListenerRuntime& lr = *next->listeners[li];
    std::string error;
    if (!bind_listener(lr, worker_count_, error)) {
      for (ListenerRuntime* b : bound) close_listener_fds(*b);
      return fail_reload({error});
    }
    bound.push_back(&lr);
  }

  // From here on the reload cannot fail.
  apply_settings(*next);
  set_log_level(level_override_.value_or(cfg->log.level));
  // Every server gets its slot on the check grid of the new fleet; the new ones (and those
  // back from maintenance) start at once, 2 ms apart, then join their slots.
  assign_check_slots(*next);
  size_t starting = 0, started = 0;
  for (const PoolRuntime& p : next->pools)
    for (const auto& s : p.servers) starting += !checkers_.count(s.get()) && s->admin.load() != AdminState::maint;
  for (size_t pi = 0; pi < next->pools.size(); ++pi) {
    const PoolRuntime& p = next->pools[pi];
    for (const auto& s : p.servers) {
      auto it = checkers_.find(s.get());
      const bool maint = s->admin.load() == AdminState::maint;
      if (it != checkers_.end() && maint) {
        retire_checker(s.get());
        s->health.store(Health::unknown);
        spdlog::info("server {} is in maintenance (state = \"maint\"): checks stopped", s->label);
      } else if (it != checkers_.end()) {
        it->second->reconfigure(p.cfg->health_check, p.cfg->proxy_protocol);
        if (p.cfg->health_check.agent_port == 0 && agents_.count(s.get())) {
          // Agent feedback turned off: its last answer no longer applies.
          retire_agent(s.get());
          s->agent_percent.store(100);
          s->agent_admin.store(AdminState::ready);
          s->agent_down.store(false);
          s->agent_reply.clear();
        } else if (auto a = agents_.find(s.get()); a != agents_.end()) {
          a->second->reconfigure(p.cfg->health_check);
        } else {
          start_agent(s, *p.cfg, rng_() % 100);
        }
      } else if (s->cfg.addr.len == 0 && s->health.load() == Health::down) {
        // Still waiting for its name to resolve (already logged).
      } else {
        // New, or back from maint.
        start_checker(
            s, *p.cfg,
            on_check_tick(first_check_delay(started++, starting, uint64_t(p.cfg->health_check.interval.count()))));
      }
    }
  }
  for (const auto& p : next->pools)  // candidates of kept servers take the new settings too
    for (const auto& s : p.servers)
      if (auto c = candidates_.find(s.get()); c != candidates_.end())
        c->second.checker->reconfigure(p.cfg->health_check, p.cfg->proxy_protocol);
  for (const auto& [pi, si] : plan.removed_servers) {
    const auto& s = snapshot_->pools[pi].servers[si];
    drop_candidate(s.get());
    retire_checker(s.get());
    spdlog::info("server {} removed: no new sessions; {} open ones run to their end", s->label, s->active.load());
  }
  for (size_t li : plan.removed_listeners) {
    const ListenerRuntime& ol = *snapshot_->listeners[li];
    spdlog::info("listener {} on {} removed: it stops accepting; its sessions run to their end", ol.cfg->name,
                 ol.bound.to_string());
  }
  for (ListenerRuntime* lr : bound) log_listening(*lr, worker_count_);
  for (size_t li = 0; li < next->listeners.size(); ++li) {
    if (!plan.listeners[li]) continue;
    const ListenerRuntime& nl = *next->listeners[li];
    const ListenerRuntime& ol = *snapshot_->listeners[*plan.listeners[li]];
    if (nl.backlog != ol.backlog) {
      spdlog::info("listener {}: backlog {} -> {}", nl.cfg->name, ol.backlog, nl.backlog);
      warn_backlog(nl);
    }
  }

  if (cfg->admin.socket != config_->admin.socket || cfg->admin.listen != config_->admin.listen)
    spdlog::warn("reload: [admin] changes take effect at the next restart");
  snapshot_ = next;
  config_ = cfg;
  ++generation_;
  ++reloads_ok_;
  last_reload_ok_ = true;
  generation_loaded_ms_ = wall_ms();
  for (auto& w : workers_) w->publish(next);
  spdlog::info("configuration reloaded: generation {} ({} servers added, {} removed; {} listeners added, {} removed)",
               generation_, plan.added_servers(), plan.removed_servers.size(), plan.added_listeners(),
               plan.removed_listeners.size());
  notifier_.ready("generation " + std::to_string(generation_) + " loaded");
  // resolve_interval may have changed, names may have come or gone.
  if (!refresher_.busy()) {
    uv_timer_stop(&resolve_timer_);
    schedule_refresh();
  }
  result.ok = true;
  result.generation = generation_;
  return result;
}

void Process::on_signal(int signum) {
  switch (signum) {
    case SIGINT:
    case SIGTERM:
      spdlog::info("received {}", signum == SIGINT ? "SIGINT" : "SIGTERM");
      begin_stop();
      break;
    case SIGHUP:
      if (phase_ == Phase::running) reload();
      break;
    case SIGUSR1: {
      std::string error;
      if (reopen_log(error))
        spdlog::info("received SIGUSR1: log file reopened");
      else
        spdlog::error("received SIGUSR1: {}", error);
      break;
    }
  }
}

void Process::begin_stop() {
  if (phase_ != Phase::running) {
    spdlog::warn("second stop signal: closing every session now");
    stop_now();
    return;
  }
  phase_ = Phase::stopping;
  abandon_reload();
  notifier_.stopping();
  const auto grace = config_->global.shutdown_grace;
  spdlog::info("stopping: listeners closed, {} open sessions may finish within shutdown_grace {}",
               link_.connections.load(), format_duration(grace));
  for (auto& w : workers_) w->request_drain();
  for (auto& [s, c] : checkers_) HealthChecker::dispose(std::move(c));
  checkers_.clear();
  for (auto& [s, a] : agents_) AgentChecker::dispose(std::move(a));
  agents_.clear();
  for (auto& [s, c] : candidates_) {
    HealthChecker::dispose(std::move(c.checker));
    s->pending_address.clear();
  }
  candidates_.clear();
  refresher_.cancel();
  uv_timer_stop(&resolve_timer_);
  uv_timer_start(
      &grace_timer_,
      [](uv_timer_t* t) {
        auto* self = static_cast<Process*>(t->data);
        spdlog::warn("shutdown_grace passed: closing the {} remaining sessions", self->link_.connections.load());
        self->stop_now();
      },
      uint64_t(grace.count()), 0);
  finish_if_done();
}

void Process::stop_now() {
  phase_ = Phase::stopped;
  for (auto& w : workers_) w->request_stop();
  finish_if_done();
}

void Process::on_control_wake() {
  std::vector<PassiveDown> events;
  {
    std::lock_guard<std::mutex> lock(link_.mu);
    events.swap(link_.passive);
  }
  // The workers' warnings about these failures go first.
  if (!events.empty()) log_writer_->sync();
  for (auto& e : events) {
    auto it = checkers_.find(e.server.get());
    if (it != checkers_.end()) it->second->force_down(e.reason);
  }
  finish_if_done();
}

void Process::finish_if_done() {
  if (phase_ == Phase::running || link_.running.load() != 0) return;
  if (uv_is_closing(as_handle(&control_wake_))) return;
  // Every worker has ended: close the control loop's own handles so run() returns.
  if (admin_) admin_->stop();
  uv_close(as_handle(&control_wake_), nullptr);
  uv_close(as_handle(&grace_timer_), nullptr);
  uv_close(as_handle(&resolve_timer_), nullptr);
  close_signals();
}

void Process::close_signals() {
  // A lookup abandoned at stop may still run on its thread (it cannot be stopped), and
  // the loop ends only after it comes back. Closing the signal handles restores the
  // default actions: until then a second SIGTERM must reach on_signal, not kill us.
  if (resolver_.in_flight() > 0) return resolver_.when_idle([this] { close_signals(); });
  if (refresher_.in_flight() > 0) return refresher_.when_idle([this] { close_signals(); });
  for (auto& s : signals_) uv_close(as_handle(&s), nullptr);
}

const PoolRuntime* Process::pool_of(const ServerRuntime& s) const {
  for (const auto& p : snapshot_->pools)
    if (p.state == s.pool_state) return &p;
  return nullptr;
}

void Process::on_transition(HealthChecker& c, Health from, Health to, const CheckResult& r) {
  for (auto& [s, cand] : candidates_)
    if (cand.runtime.get() == &c.server()) return on_candidate(s, to, r);
  ServerRuntime& server = c.server();
  bump(to == Health::up ? server.transitions_up : server.transitions_down);
  server.last_change_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count();
  server.last_change_cause = to == Health::up ? "check passed"
                             : r.passive      ? "failed sessions: " + r.reason
                                              : "check failed: " + r.reason;
  const PoolRuntime* pool = pool_of(server);
  if (!pool) return;  // removed by a reload while the check ran
  size_t up = 0, usable = 0, pending = 0;
  for (const auto& s : pool->servers) {
    const Health h = s->health.load(std::memory_order_relaxed);
    up += h == Health::up;
    usable += s->usable();
    // Not checked yet, but would take sessions once UP.
    pending += h == Health::unknown && s->admin.load() == AdminState::ready && s->weight.load() > 0;
  }
  const size_t total = pool->servers.size();
  if (to == Health::up) {
    server.passive_failures.store(0, std::memory_order_relaxed);
    const auto ramp = pool->cfg->slow_start;
    if (from == Health::down && ramp.count() > 0) {
      server.ramp_start_ms.store(int64_t(uv_now(&loop_)), std::memory_order_relaxed);
      spdlog::info("server {} slow start: weight ramps to {} over {}", server.label, server.weight.load(),
                   format_duration(ramp));
    }
    spdlog::info("server {} is UP: check passed{}, {} of {} servers up", server.label,
                 from == Health::unknown ? " (first check)" : "", up, total);
    // New capacity: sessions queued for a full pool may go now.
    for (auto& w : workers_) w->kick();
    return;
  }
  server.ramp_start_ms.store(-1, std::memory_order_relaxed);
  if (r.passive)
    spdlog::warn("server {} is DOWN: {} failed sessions in a row ({}), {} of {} servers up", server.label,
                 pool->cfg->health_check.fall, r.reason, up, total);
  else
    spdlog::warn("server {} is DOWN: check failed ({}), {} of {} servers up", server.label, r.reason, up, total);
  if (usable == 0 && pending == 0)
    spdlog::error("pool {} has no usable server: clients get 421 4.3.2", pool->cfg->name);
}

void Process::schedule_refresh() {
  if (phase_ != Phase::running || refresher_.busy() || uv_is_active(as_handle(&resolve_timer_))) return;
  if (host_names(*config_).empty()) return;
  // A name without an address yet is tried again soon whatever the interval: its server
  // is DOWN meanwhile (a DNS hiccup at boot).
  constexpr uint64_t kUnresolvedRetryMs = 10000;
  uint64_t ms = uint64_t(config_->global.resolve_interval.count());
  if (!hosts_to_resolve(*config_).empty()) ms = ms == 0 ? kUnresolvedRetryMs : std::min(ms, kUnresolvedRetryMs);
  if (ms == 0) return;  // "0s": only at load and reload
  uv_timer_start(
      &resolve_timer_, [](uv_timer_t* t) { static_cast<Process*>(t->data)->refresh_names(); }, ms, 0);
}

void Process::refresh_names() {
  if (phase_ != Phase::running) return;
  std::vector<std::string> hosts = host_names(*config_);
  if (hosts.empty()) return;
  spdlog::debug("looking up {} server host name{} again", hosts.size(), hosts.size() == 1 ? "" : "s");
  refresher_.start(std::move(hosts), kResolveTimeout, [this](std::vector<HostLookup> lookups) {
    on_lookups(lookups, false);
    schedule_refresh();
  });
}

void Process::on_lookups(const std::vector<HostLookup>& lookups, bool quiet) {
  for (const auto& l : lookups) {
    if (!l.ok) {
      if (failing_hosts_.insert(l.host).second && !quiet)
        spdlog::warn(
            "cannot resolve '{}' ({}): its servers keep their address; counted in "
            "smtplb_server_resolve_failures_total, logged again only after it resolves",
            l.host, l.error);
    } else if (failing_hosts_.erase(l.host)) {
      spdlog::info("'{}' resolves again ({})", l.host, l.addr.to_string());
    }
  }
  // Decided over the running snapshot first, acted on after: a switch replaces it.
  std::vector<std::pair<ServerRuntime*, SocketAddress>> changed;
  for (const auto& p : snapshot_->pools)
    for (size_t si = 0; si < p.servers.size(); ++si) {
      const ServerConfig& sc = p.cfg->servers[si];
      ServerRuntime* s = p.servers[si].get();
      if (!sc.host_name) continue;
      auto it = std::find_if(lookups.begin(), lookups.end(), [&](const HostLookup& l) { return l.host == sc.address; });
      if (it == lookups.end()) continue;
      if (!it->ok) {
        bump(s->resolve_failures);
        s->resolve_error = it->error;
        continue;
      }
      s->resolve_error.clear();
      // An address still in the answer stays (round-robin DNS rotates the order);
      // otherwise the answer's first is the new one.
      auto in_answer = [&](const SocketAddress& current) {
        if (current.len == 0) return false;
        for (SocketAddress x : it->all) {
          x.set_port(sc.port);
          if (x.same_as(current)) return true;
        }
        return false;
      };
      auto cand = candidates_.find(s);
      if (in_answer(s->cfg.addr)) {
        if (cand != candidates_.end()) {
          spdlog::info("server {}: {} resolves to {} again; the check of {} is dropped", s->label, sc.address,
                       s->cfg.addr.to_string(), s->pending_address);
          drop_candidate(s);
        }
        continue;
      }
      if (cand != candidates_.end() && in_answer(cand->second.runtime->cfg.addr)) continue;
      SocketAddress a = it->addr;
      a.set_port(sc.port);
      changed.emplace_back(s, a);
    }
  for (const auto& [s, a] : changed) start_candidate(s, a);
}

void Process::start_candidate(ServerRuntime* s, const SocketAddress& addr) {
  for (const auto& p : snapshot_->pools)
    for (size_t si = 0; si < p.servers.size(); ++si) {
      if (p.servers[si].get() != s) continue;
      drop_candidate(s);
      ServerConfig sc = p.cfg->servers[si];
      sc.addr = addr;
      sc.needs_resolution = false;
      Candidate c;
      c.runtime = std::make_shared<ServerRuntime>(*p.cfg, sc, p.state);
      s->pending_address = addr.to_string();
      spdlog::info("server {}: {} now resolves to {} (in use: {}); checked there before it takes new sessions",
                   s->label, sc.address, s->pending_address,
                   s->cfg.addr.len ? s->cfg.addr.to_string() : std::string("none"));
      if (s->admin.load() == AdminState::maint) {
        // Not checked in maintenance: nothing to wait for, it takes no sessions anyway.
        candidates_.emplace(s, std::move(c));
        return promote(s);
      }
      c.checker = std::make_unique<HealthChecker>(
          &loop_, p.cfg->proxy_protocol, c.runtime, p.cfg->health_check,
          [this](HealthChecker& hc, Health from, Health to, const CheckResult& r) { on_transition(hc, from, to, r); });
      // The first check at once; then the server's own slot on the check grid.
      if (auto slot = check_offsets_.find(s); slot != check_offsets_.end())
        c.checker->set_slot(check_epoch_ms_, slot->second);
      c.checker->start(0);
      candidates_.emplace(s, std::move(c));
      return;
    }
}

void Process::drop_candidate(ServerRuntime* s) {
  auto it = candidates_.find(s);
  if (it == candidates_.end()) return;
  if (it->second.checker) HealthChecker::dispose(std::move(it->second.checker));
  candidates_.erase(it);
  s->pending_address.clear();
}

void Process::on_candidate(ServerRuntime* s, Health to, const CheckResult& r) {
  // A server without an address so far switches whatever the first result: DOWN either
  // way, and from then on its own checks tell.
  if (to == Health::up || s->cfg.addr.len == 0) return promote(s);
  spdlog::warn("server {}: the new address {} fails its check ({}); new sessions stay on {}", s->label,
               s->pending_address, r.reason, s->cfg.addr.to_string());
}

void Process::promote(ServerRuntime* old) {
  auto it = candidates_.find(old);
  if (it == candidates_.end()) return;
  Candidate cand = std::move(it->second);
  candidates_.erase(it);
  old->pending_address.clear();
  std::optional<std::pair<size_t, size_t>> at;
  for (size_t pi = 0; pi < snapshot_->pools.size(); ++pi)
    for (size_t si = 0; si < snapshot_->pools[pi].servers.size(); ++si)
      if (snapshot_->pools[pi].servers[si].get() == old) at.emplace(pi, si);
  if (!at) {
    if (cand.checker) HealthChecker::dispose(std::move(cand.checker));
    return;
  }
  const auto [pi, si] = *at;
  const std::shared_ptr<ServerRuntime>& fresh = cand.runtime;
  auto cfg = std::make_shared<Config>(*config_);
  ServerConfig& sc = cfg->pools[pi].servers[si];
  sc.addr = fresh->cfg.addr;
  sc.needs_resolution = false;
  const ReloadPlan plan = plan_reload(*config_, *cfg);
  auto next = build_snapshot(cfg, generation_ + 1, snapshot_.get(), &plan);
  // What the operator set at run time, and the counts that describe the name, carry over.
  fresh->admin.store(old->admin.load());
  fresh->configured_admin.store(old->configured_admin.load());
  fresh->weight.store(old->weight.load());
  fresh->configured_weight.store(old->configured_weight.load());
  fresh->resolve_failures.store(old->resolve_failures.load());
  fresh->resolve_error = old->resolve_error;
  fresh->agent_percent.store(old->agent_percent.load());
  fresh->agent_admin.store(old->agent_admin.load());
  fresh->agent_down.store(old->agent_down.load());
  fresh->agent_failures.store(old->agent_failures.load());
  fresh->agent_reply = old->agent_reply;
  next->pools[pi].servers[si] = fresh;
  apply_settings(*next);
  retire_checker(old);
  if (fresh->admin.load() == AdminState::maint) {
    if (cand.checker) HealthChecker::dispose(std::move(cand.checker));
  } else if (cand.checker) {
    if (auto slot = check_offsets_.find(old); slot != check_offsets_.end()) check_offsets_[fresh.get()] = slot->second;
    checkers_[fresh.get()] = std::move(cand.checker);
    start_agent(fresh, *next->pools[pi].cfg, 0);  // the agent at the new address
  }
  const std::string before = old->cfg.addr.len ? old->cfg.addr.to_string() : std::string("none");
  const uint32_t open = old->active.load();
  snapshot_ = next;
  config_ = cfg;
  ++generation_;
  for (auto& w : workers_) w->publish(next);
  spdlog::info(
      "server {} now at {} ({} resolves there; was {}), health {}: new sessions go there, {} open session{} "
      "stay{} on the old address (generation {})",
      fresh->label, fresh->cfg.addr.to_string(), sc.address, before, to_string(fresh->health.load()), open,
      open == 1 ? "" : "s", open == 1 ? "s" : "", generation_);
  fresh->last_change_ms = wall_ms();
  fresh->last_change_cause = "address " + fresh->cfg.addr.to_string() + " (was " + before + ")";
  for (auto& w : workers_) w->kick();
}

}  // namespace smtplb
