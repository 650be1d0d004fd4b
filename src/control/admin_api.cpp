// The admin API of Process: /metrics, /status, /healthz and runtime changes. Names follow
// docs/operations.md lists the endpoints and metrics.
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <dirent.h>
#include <charconv>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <optional>
#include <sstream>

#include "control/process.hpp"
#include "smtplb/edge/address.hpp"
#include "smtplb/log/metrics.hpp"
#include "smtplb/proto/admin_routes.hpp"
#include "smtplb/version.hpp"

namespace smtplb {

namespace {

std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);
        }
    }
  }
  return out + "\"";
}

std::string iso_time(int64_t unix_ms) {
  if (unix_ms <= 0) return "null";
  const time_t t = time_t(unix_ms / 1000);
  tm tmv{};
  gmtime_r(&t, &tmv);
  char buf[96];
  std::snprintf(buf, sizeof buf, "\"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\"", tmv.tm_year + 1900, tmv.tm_mon + 1,
                tmv.tm_mday, tmv.tm_hour, tmv.tm_min, tmv.tm_sec, int(unix_ms % 1000));
  return buf;
}

// What the server's agent says: down, drain, maint, or up (also without an agent).
std::string_view agent_state(const ServerRuntime& s) {
  if (s.agent_down.load()) return "down";
  const AdminState a = s.agent_admin.load();
  return a == AdminState::ready ? "up" : to_string(a);
}

const char* health_name(Health h) {
  return h == Health::up ? "up" : h == Health::down ? "down" : "unchecked";
}

// Sums a per-worker field over all worker slots.
template <typename Slots, typename Field>
uint64_t sum(const Slots& slots, Field field) {
  uint64_t total = 0;
  for (size_t w = 0; w < kMaxWorkers; ++w) total += field(slots[w]).load(std::memory_order_relaxed);
  return total;
}

void merged_histogram(std::array<uint64_t, 13>& counts, double& sum_s, const Histogram& h) {
  for (size_t i = 0; i < counts.size(); ++i) counts[i] += h.buckets[i].load(std::memory_order_relaxed);
  sum_s += double(h.sum_us.load(std::memory_order_relaxed)) / 1e6;
}

struct ProcessStats {
  double cpu_seconds = 0;
  uint64_t rss_bytes = 0;
  uint64_t open_fds = 0;
  uint64_t max_fds = 0;
};

ProcessStats process_stats() {
  ProcessStats p;
  rusage ru{};
  if (getrusage(RUSAGE_SELF, &ru) == 0)
    p.cpu_seconds =
        double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmRSS:", 0) == 0) p.rss_bytes = std::stoull(line.substr(6)) * 1024;
  if (DIR* d = opendir("/proc/self/fd")) {
    while (dirent* e = readdir(d))
      if (e->d_name[0] != '.') ++p.open_fds;
    closedir(d);
    --p.open_fds;  // the directory stream itself
  }
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) p.max_fds = rl.rlim_cur;
  return p;
}

AdminResponse text(int status, std::string body) {
  return {status, "text/plain; charset=utf-8", std::move(body), ""};
}

}  // namespace

ServerRuntime* Process::find_server(std::string_view pool, std::string_view server, const PoolRuntime** out) const {
  for (const auto& p : snapshot_->pools)
    if (p.cfg->name == pool)
      for (const auto& s : p.servers)
        if (s->cfg.name == server) {
          if (out) *out = &p;
          return s.get();
        }
  return nullptr;
}

AdminResponse Process::admin(const AdminServer::Request& req) {
  using K = AdminRoute::Kind;
  const AdminRoute r = route_admin(req.method, req.path);
  switch (r.kind) {
    case K::metrics:
      return {200, "text/plain; version=0.0.4; charset=utf-8", render_metrics(), ""};
    case K::status: {
      std::vector<std::pair<std::string, std::string>> params;
      std::string error;
      if (!parse_query(req.query, params, error)) return text(400, error + "\n");
      bool as_text = false;
      std::optional<std::string> where_address;
      for (const auto& [name, value] : params) {
        if (name == "format" && value == "text")
          as_text = true;
        else if (name == "where")
          where_address = value;
        else
          return text(400, "unknown parameter: " + name + " (format=text, where=ADDRESS)\n");
      }
      if (where_address) return where(*where_address, as_text);
      if (as_text) return text(200, render_status_text());
      return {200, "application/json", render_status_json(), ""};
    }
    case K::clients:
      return clients(req.query);
    case K::healthz:
      return healthz();
    case K::reload: {
      if (phase_ != Phase::running) return text(503, "stopping\n");
      spdlog::info("reload requested through the admin API");
      // Answered when the reload is done: at once with IP literals only, otherwise once
      // host names are resolved (the response is deferred; the loop goes on meanwhile).
      struct Answer {
        bool deferred = false;
        std::optional<AdminResponse> now;
      };
      auto answer = std::make_shared<Answer>();
      reload([this, answer, ticket = req.ticket](const ReloadResult& rr) {
        AdminResponse resp;
        if (rr.abandoned) {
          resp = text(503, "stopping: reload abandoned\n");
        } else {
          std::string body = rr.ok ? "reloaded: generation " + std::to_string(rr.generation) + "\n"
                                   : "reload failed; still running generation " + std::to_string(rr.generation) + "\n";
          for (const auto& e : rr.errors) body += e + "\n";
          resp = text(rr.ok ? 200 : 422, body);
        }
        if (!answer->deferred)
          answer->now = std::move(resp);
        else if (admin_)
          admin_->complete(ticket, std::move(resp));
      });
      if (answer->now) return std::move(*answer->now);
      answer->deferred = true;
      return AdminResponse::deferred();
    }
    case K::process_state:
      return change_process_state(req.body);
    case K::server_state:
      return change_server(r.pool, r.server, "state", req.body);
    case K::server_weight:
      return change_server(r.pool, r.server, "weight", req.body);
    case K::wrong_method: {
      AdminResponse resp = text(405, "use " + std::string(r.allow) + "\n");
      resp.allow = std::string(r.allow);
      return resp;
    }
    case K::not_found:
      break;
  }
  return text(404, "not found: /metrics /status /healthz /reload /state /servers/POOL/SERVER/{state,weight}\n");
}

AdminResponse Process::change_process_state(std::string_view body) {
  while (!body.empty() && (body.back() == '\n' || body.back() == '\r' || body.back() == ' ')) body.remove_suffix(1);
  if (body != "drain" && body != "ready") return text(400, "state must be drain or ready\n");
  if (phase_ != Phase::running) return text(503, "stopping\n");
  const bool drain = body == "drain";
  if (drain != draining_) {
    draining_ = drain;
    spdlog::info("process state {} -> {} (cause: admin){}", drain ? "ready" : "draining", drain ? "draining" : "ready",
                 drain ? ": /healthz answers 503; listeners stay open and new sessions are served" : "");
    if (drain) {
      draining_since_ms_ =
          std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
              .count();
      notifier_.notify("STATUS=draining: /healthz answers 503, sessions are served");
    } else {
      notifier_.notify("STATUS=generation " + std::to_string(generation_) + " running");
    }
  }
  if (draining_)
    return text(200, "draining since " + iso_time(draining_since_ms_).substr(1, 24) +
                         ": /healthz answers 503; new sessions are still served\n");
  return text(200, "ready\n");
}

AdminResponse Process::change_server(std::string_view pool, std::string_view server, std::string_view what,
                                     std::string_view body) {
  const PoolRuntime* pr = nullptr;
  ServerRuntime* s = find_server(pool, server, &pr);
  if (!s) return text(404, "no server " + std::string(pool) + "/" + std::string(server) + "\n");
  while (!body.empty() && (body.back() == '\n' || body.back() == '\r' || body.back() == ' ')) body.remove_suffix(1);
  if (what == "weight") {
    unsigned w = 0;
    auto [end, ec] = std::from_chars(body.data(), body.data() + body.size(), w);
    if (ec != std::errc() || end != body.data() + body.size() || body.empty() || w > 256)
      return text(400, "weight must be a number from 0 to 256\n");
    const unsigned before = s->weight.exchange(w);
    spdlog::info("server {} weight {} -> {} (cause: admin)", s->label, before, w);
    if (w > before)
      for (auto& wk : workers_) wk->kick();  // capacity for queued sessions
    return text(200, s->label + " weight " + std::to_string(w) + "\n");
  }
  AdminState st;
  if (body == "ready")
    st = AdminState::ready;
  else if (body == "drain")
    st = AdminState::drain;
  else if (body == "maint")
    st = AdminState::maint;
  else
    return text(400, "state must be ready, drain or maint\n");
  const AdminState before = s->admin.exchange(st);
  spdlog::info("server {} state {} -> {} (cause: admin)", s->label, to_string(before), to_string(st));
  if (st == AdminState::maint && checkers_.count(s)) {
    retire_checker(s);
    s->health.store(Health::unknown);
    spdlog::info("server {} is in maintenance: checks stopped", s->label);
  } else if (st != AdminState::maint && !checkers_.count(s) && phase_ == Phase::running) {
    for (const auto& sp : pr->servers)
      if (sp.get() == s) start_checker(sp, *pr->cfg, 0);
  }
  if (st == AdminState::ready)
    for (auto& w : workers_) w->kick();  // capacity for queued sessions
  return text(200, s->label + " state " + to_string(st) + "\n");
}

AdminResponse Process::healthz() const {
  std::string bad;
  for (const auto& p : snapshot_->pools) {
    const bool any = std::any_of(p.servers.begin(), p.servers.end(), [](const auto& s) { return s->usable(); });
    if (!any) bad += "pool " + p.cfg->name + " has no usable server\n";
  }
  if (phase_ != Phase::running)
    bad += "stopping\n";
  else if (draining_)
    bad += "draining (smtplb ctl ready undoes it)\n";
  return bad.empty() ? text(200, "ok\n") : text(503, bad);
}

std::string Process::render_metrics() const {
  metrics::Writer m;
  const ProcessStats ps = process_stats();
  m.family("smtplb_build_info", "gauge", "Version of smtplb.");
  m.sample("smtplb_build_info", {{"version", kVersion}}, uint64_t{1});
  m.family("smtplb_start_time_seconds", "gauge", "Start time of the process since the Unix epoch.");
  m.sample("smtplb_start_time_seconds", {}, double(start_time_ms_) / 1000.0);
  m.family("smtplb_config_generation", "gauge", "Configuration generation running (1 at start, +1 per reload).");
  m.sample("smtplb_config_generation", {}, generation_);
  m.family("smtplb_config_reloads_total", "counter", "Configuration reloads by result.");
  m.sample("smtplb_config_reloads_total", {{"result", "success"}}, reloads_ok_);
  m.sample("smtplb_config_reloads_total", {{"result", "failure"}}, reloads_failed_);
  m.family("smtplb_config_last_reload_successful", "gauge", "1 if the last reload succeeded (or none happened).");
  m.sample("smtplb_config_last_reload_successful", {}, uint64_t{last_reload_ok_ ? 1u : 0u});
  m.family("smtplb_draining", "gauge",
           "1 while the process drains (smtplb ctl drain): /healthz answers 503, sessions are still served.");
  m.sample("smtplb_draining", {}, uint64_t{phase_ == Phase::running && draining_ ? 1u : 0u});
  m.family("smtplb_access_log_dropped_total", "counter",
           "Log lines of the workers (access lines above all) dropped because the log destination did not keep up.");
  m.sample("smtplb_access_log_dropped_total", {}, log_writer_ ? log_writer_->dropped() : uint64_t{0});

  m.family("smtplb_listener_connections_total", "counter", "Client connections accepted.");
  for (const auto& l : snapshot_->listeners)
    m.sample("smtplb_listener_connections_total", {{"listener", l->cfg->name}},
             sum(
                 l->state->per_worker, [](const ListenerWorkerCounters& c) -> const auto& { return c.connections; }));
  m.family("smtplb_listener_current_connections", "gauge", "Client sessions open now.");
  for (const auto& l : snapshot_->listeners)
    m.sample("smtplb_listener_current_connections", {{"listener", l->cfg->name}}, uint64_t{l->state->current.load()});
  m.family("smtplb_listener_rejected_connections_total", "counter",
           "Clients refused or closed by smtplb itself, by reason.");
  for (const auto& l : snapshot_->listeners) {
    const auto& st = *l->state;
    m.sample("smtplb_listener_rejected_connections_total", {{"listener", l->cfg->name}, {"reason", "limit"}},
             st.rejected_limit.load());
    m.sample("smtplb_listener_rejected_connections_total", {{"listener", l->cfg->name}, {"reason", "no_server"}},
             st.rejected_no_server.load());
    m.sample("smtplb_listener_rejected_connections_total", {{"listener", l->cfg->name}, {"reason", "proxy_protocol"}},
             st.rejected_proxy.load());
    if (!l->cfg->address_features()) continue;
    m.sample("smtplb_listener_rejected_connections_total", {{"listener", l->cfg->name}, {"reason", "acl"}},
             st.rejected_acl.load());
    m.sample("smtplb_listener_rejected_connections_total", {{"listener", l->cfg->name}, {"reason", "per_ip_limit"}},
             st.rejected_per_ip_limit.load());
    m.sample("smtplb_listener_rejected_connections_total", {{"listener", l->cfg->name}, {"reason", "per_ip_rate"}},
             st.rejected_per_ip_rate.load());
  }
  m.family("smtplb_listener_limit_dry_run_total", "counter",
           "Clients limits_dry_run let through that a per-client limit would have refused, by reason.");
  for (const auto& l : snapshot_->listeners) {
    if (!l->cfg->limits()) continue;
    m.sample("smtplb_listener_limit_dry_run_total", {{"listener", l->cfg->name}, {"reason", "per_ip_limit"}},
             l->state->dry_run_limit.load());
    m.sample("smtplb_listener_limit_dry_run_total", {{"listener", l->cfg->name}, {"reason", "per_ip_rate"}},
             l->state->dry_run_rate.load());
  }
  m.family("smtplb_client_table_entries", "gauge", "Client keys the per-client limits remember now.");
  m.sample("smtplb_client_table_entries", {}, uint64_t(snapshot_->clients->size()));
  m.family("smtplb_client_table_evictions_total", "counter",
           "Client keys forgotten to stay within global.max_tracked_clients (least recently seen first).");
  m.sample("smtplb_client_table_evictions_total", {}, snapshot_->clients->evictions());

  m.family("smtplb_pool_servers", "gauge",
           "Servers of the pool by state: up, down, unchecked, drain, maint (agent feedback included).");
  m.family("smtplb_pool_no_server_total", "counter", "Clients answered 421 because no server could take them.");
  m.family("smtplb_pool_queue_current", "gauge", "Sessions waiting for a free server slot.");
  m.family("smtplb_pool_queue_timeouts_total", "counter", "Clients answered 421 after queue_timeout.");
  m.family("smtplb_pool_source_detours_total", "counter",
           "algorithm = \"source\": sessions hash_balance_factor sent past their key's first usable server.");
  std::string body;
  for (const auto& p : snapshot_->pools) {
    uint64_t up = 0, down = 0, unchecked = 0, drain = 0, maint = 0;
    for (const auto& s : p.servers) {
      // As the balancer sees it: the agent's admin state and its "down" count too.
      const AdminState a = s->effective_admin();
      const Health h = s->health.load();
      if (a == AdminState::maint)
        ++maint;
      else if (a == AdminState::drain)
        ++drain;
      else if (h == Health::up && s->agent_down.load(std::memory_order_relaxed))
        ++down;
      else if (h == Health::up)
        ++up;
      else if (h == Health::down)
        ++down;
      else
        ++unchecked;
    }
    const std::string_view pn = p.cfg->name;
    m.sample("smtplb_pool_servers", {{"pool", pn}, {"state", "up"}}, up);
    m.sample("smtplb_pool_servers", {{"pool", pn}, {"state", "down"}}, down);
    m.sample("smtplb_pool_servers", {{"pool", pn}, {"state", "unchecked"}}, unchecked);
    m.sample("smtplb_pool_servers", {{"pool", pn}, {"state", "drain"}}, drain);
    m.sample("smtplb_pool_servers", {{"pool", pn}, {"state", "maint"}}, maint);
    m.sample("smtplb_pool_no_server_total", {{"pool", pn}}, p.state->no_server.load());
    m.sample("smtplb_pool_queue_current", {{"pool", pn}}, uint64_t{p.state->queued.load()});
    m.sample("smtplb_pool_queue_timeouts_total", {{"pool", pn}}, p.state->queue_timeouts.load());
    m.sample("smtplb_pool_source_detours_total", {{"pool", pn}}, p.state->source_detours.load());
  }

  struct ServerFamily {
    const char* name;
    const char* type;
    const char* help;
  };
  const ServerFamily families[] = {
      {"smtplb_server_up", "gauge", "1 when the server's health is up."},
      {"smtplb_server_admin_state", "gauge", "Admin state of the server (one series per state, 1 for the current)."},
      {"smtplb_server_weight", "gauge", "Configured (or runtime) weight of the server."},
      {"smtplb_server_current_connections", "gauge", "Sessions connected or connecting to the server now."},
      {"smtplb_server_connections_total", "counter", "Client sessions handed off to the server."},
      {"smtplb_server_connection_errors_total", "counter", "Failed backend attempts of client sessions, by reason."},
      {"smtplb_server_bytes_received_total", "counter", "Bytes received from the server and relayed to clients."},
      {"smtplb_server_bytes_sent_total", "counter", "Bytes of clients relayed to the server."},
      {"smtplb_server_check_failures_total", "counter", "Failed health checks, by reason."},
      {"smtplb_server_check_transitions_total", "counter", "Health transitions, by new state."},
      {"smtplb_server_tls_cert_not_after_seconds", "gauge",
       "notAfter of the certificate seen by the last STARTTLS check (0 when none)."},
      {"smtplb_server_resolve_failures_total", "counter",
       "Failed lookups of the server's host name (it keeps its last address)."},
      {"smtplb_server_effective_weight", "gauge",
       "Weight the balancer uses: the configured (or runtime) weight scaled by the agent's percentage."},
      {"smtplb_server_agent_weight_percent", "gauge", "Weight percentage from the server's agent (100 without one)."},
      {"smtplb_server_agent_state", "gauge",
       "State the server's agent reports (one series per state, 1 for the current)."},
      {"smtplb_server_agent_failures_total", "counter", "Agent queries without a reply understood."},
  };
  for (const auto& f : families) {
    m.family(f.name, f.type, f.help);
    for (const auto& p : snapshot_->pools)
      for (const auto& sp : p.servers) {
        const ServerRuntime& s = *sp;
        const std::string_view pn = p.cfg->name, sn = s.cfg.name;
        const std::string_view n = f.name;
        if (n == "smtplb_server_up") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}}, uint64_t{s.health.load() == Health::up ? 1u : 0u});
        } else if (n == "smtplb_server_admin_state") {
          for (AdminState a : {AdminState::ready, AdminState::drain, AdminState::maint})
            m.sample(f.name, {{"pool", pn}, {"server", sn}, {"state", to_string(a)}},
                     uint64_t{s.admin.load() == a ? 1u : 0u});
        } else if (n == "smtplb_server_weight") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}}, uint64_t{s.weight.load()});
        } else if (n == "smtplb_server_current_connections") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}}, uint64_t{s.active.load()});
        } else if (n == "smtplb_server_connections_total") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}},
                   sum(
                       s.per_worker, [](const ServerWorkerCounters& c) -> const auto& { return c.sessions; }));
        } else if (n == "smtplb_server_connection_errors_total") {
          for (size_t i = 0; i < kConnErrorNames.size(); ++i)
            m.sample(f.name, {{"pool", pn}, {"server", sn}, {"reason", kConnErrorNames[i]}},
                     sum(
                         s.per_worker, [i](const ServerWorkerCounters& c) -> const auto& { return c.errors[i]; }));
        } else if (n == "smtplb_server_bytes_received_total") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}},
                   sum(
                       s.per_worker, [](const ServerWorkerCounters& c) -> const auto& { return c.bytes_in; }));
        } else if (n == "smtplb_server_bytes_sent_total") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}},
                   sum(
                       s.per_worker, [](const ServerWorkerCounters& c) -> const auto& { return c.bytes_out; }));
        } else if (n == "smtplb_server_check_failures_total") {
          for (size_t i = 0; i < kCheckFailureNames.size(); ++i)
            m.sample(f.name, {{"pool", pn}, {"server", sn}, {"reason", kCheckFailureNames[i]}},
                     s.check_failures[i].load());
        } else if (n == "smtplb_server_check_transitions_total") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}, {"to", "up"}}, s.transitions_up.load());
          m.sample(f.name, {{"pool", pn}, {"server", sn}, {"to", "down"}}, s.transitions_down.load());
        } else if (n == "smtplb_server_resolve_failures_total") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}}, s.resolve_failures.load());
        } else if (n == "smtplb_server_effective_weight") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}}, uint64_t{s.effective_weight()});
        } else if (n == "smtplb_server_agent_weight_percent") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}}, uint64_t{s.agent_percent.load()});
        } else if (n == "smtplb_server_agent_state") {
          const std::string_view now = agent_state(s);
          for (std::string_view st : {"up", "down", "drain", "maint"})
            m.sample(f.name, {{"pool", pn}, {"server", sn}, {"state", st}}, uint64_t{now == st ? 1u : 0u});
        } else if (n == "smtplb_server_agent_failures_total") {
          m.sample(f.name, {{"pool", pn}, {"server", sn}}, s.agent_failures.load());
        } else {
          m.sample(f.name, {{"pool", pn}, {"server", sn}}, double(s.tls_not_after.load()));
        }
      }
  }

  m.family("smtplb_server_connect_duration_seconds", "histogram",
           "Backend connect to accepted greeting, for sessions handed off.");
  for (const auto& p : snapshot_->pools)
    for (const auto& s : p.servers) {
      std::array<uint64_t, 13> counts{};
      double total = 0;
      for (size_t w = 0; w < kMaxWorkers; ++w) merged_histogram(counts, total, s->per_worker[w].connect);
      m.histogram("smtplb_server_connect_duration_seconds", {{"pool", p.cfg->name}, {"server", s->cfg.name}},
                  kLatencyBounds, counts, total);
    }
  m.family("smtplb_server_check_duration_seconds", "histogram", "Duration of health check dialogues.");
  for (const auto& p : snapshot_->pools) {
    std::array<uint64_t, 13> counts{};
    double total = 0;
    for (const auto& s : p.servers) merged_histogram(counts, total, s->check_duration);
    m.histogram("smtplb_server_check_duration_seconds", {{"pool", p.cfg->name}}, kLatencyBounds, counts, total);
  }
  m.family("smtplb_session_duration_seconds", "histogram", "Client session duration, accept to close.");
  for (const auto& l : snapshot_->listeners) {
    std::array<uint64_t, 13> counts{};
    double total = 0;
    for (size_t w = 0; w < kMaxWorkers; ++w) merged_histogram(counts, total, l->state->per_worker[w].duration);
    m.histogram("smtplb_session_duration_seconds", {{"listener", l->cfg->name}}, kDurationBounds, counts, total);
  }
  m.family("smtplb_sessions_terminated_total", "counter", "Finished sessions by termination code (docs/logging.md).");
  for (const auto& l : snapshot_->listeners)
    for (size_t idx = 0; idx < kTermSlots; ++idx) {
      const uint64_t v = sum(
          l->state->per_worker, [idx](const ListenerWorkerCounters& lc) -> const auto& { return lc.terms[idx]; });
      if (v == 0) continue;  // 80 codes per listener: only the ones seen
      m.sample("smtplb_sessions_terminated_total",
               {{"listener", l->cfg->name}, {"term", TermCode::from_index(idx).text()}}, v);
    }

  m.family("process_cpu_seconds_total", "counter", "User and system CPU time spent, seconds.");
  m.sample("process_cpu_seconds_total", {}, ps.cpu_seconds);
  m.family("process_resident_memory_bytes", "gauge", "Resident memory size, bytes.");
  m.sample("process_resident_memory_bytes", {}, ps.rss_bytes);
  m.family("process_open_fds", "gauge", "Open file descriptors.");
  m.sample("process_open_fds", {}, ps.open_fds);
  m.family("process_max_fds", "gauge", "Limit of open file descriptors.");
  m.sample("process_max_fds", {}, ps.max_fds);
  m.family("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch.");
  m.sample("process_start_time_seconds", {}, double(start_time_ms_) / 1000.0);
  return m.take();
}

// The client keys with the most open sessions (then the most sessions their rate limiter
// still counts): "?n=N" (default 20, at most 1000), "&format=text" for ctl.
AdminResponse Process::clients(std::string_view query) {
  size_t n = 20;
  bool as_text = false;
  std::vector<std::pair<std::string, std::string>> params;
  std::string error;
  if (!parse_query(query, params, error)) return text(400, error + "\n");
  for (const auto& [name, value] : params) {
    if (name == "format" && value == "text") {
      as_text = true;
    } else if (name == "n") {
      unsigned v = 0;
      const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
      if (ec != std::errc() || end != value.data() + value.size() || v == 0 || v > 1000)
        return text(400, "n must be a number from 1 to 1000\n");
      n = v;
    } else {
      return text(400, "unknown parameter: " + name + (value.empty() ? "" : "=" + value) + " (n=N, format=text)\n");
    }
  }
  const auto top = snapshot_->clients->top(n, int64_t(uv_now(&loop_)));
  auto listener_of = [&](uint32_t id) -> std::string {
    for (const auto& l : snapshot_->listeners)
      if (l->state->id == id) return l->cfg->name;
    return "-";
  };
  std::ostringstream o;
  if (as_text) {
    o << "client table: " << snapshot_->clients->size() << " keys (max_tracked_clients "
      << snapshot_->config->global.max_tracked_clients << "), " << snapshot_->clients->evictions() << " evicted\n";
    if (top.empty()) o << "no client with open sessions or a recent rate\n";
    for (const auto& c : top) {
      char recent[32];
      std::snprintf(recent, sizeof recent, "%.1f", c.recent);
      o << "  " << c.key.to_string() << "  listener " << listener_of(c.key.listener) << "  sessions " << c.sessions
        << "  recent " << recent << "\n";
    }
    return text(200, o.str());
  }
  o << "{\"entries\":" << snapshot_->clients->size() << ",\"evictions\":" << snapshot_->clients->evictions()
    << ",\"clients\":[";
  for (size_t i = 0; i < top.size(); ++i) {
    char recent[32];
    std::snprintf(recent, sizeof recent, "%.3f", top[i].recent);
    o << (i ? "," : "") << "{\"key\":" << json_string(top[i].key.to_string())
      << ",\"listener\":" << json_string(listener_of(top[i].key.listener)) << ",\"sessions\":" << top[i].sessions
      << ",\"recent\":" << recent << "}";
  }
  o << "]}";
  return {200, "application/json", o.str(), ""};
}

// Which server each source-affinity pool sends the client at `address` to right now (the
// data path's own choice: health, admin state, backup tier, balance factor), its key and
// its preference list; other pools say they have no affinity.
AdminResponse Process::where(std::string_view address, bool as_text) {
  Cidr c;
  if (!parse_cidr(address, c) || c.prefix != (c.family == AF_INET ? 32u : 128u))
    return text(400, "where: not an IP address: " + std::string(address.substr(0, 64)) + "\n");
  Addr128 a;
  unsigned full = 0;
  to_block128(c, a, full);
  const int64_t now = int64_t(uv_now(&loop_));
  constexpr size_t kShown = 8;  // preferences listed per tier
  std::ostringstream o;
  if (!as_text) o << "{\"address\":" << json_string(address) << ",\"pools\":[";
  bool first = true;
  for (const auto& p : snapshot_->pools) {
    const std::string& pn = p.cfg->name;
    if (!p.source) {
      if (as_text)
        o << "pool " << pn << " (" << to_string(p.cfg->algorithm) << "): no source affinity\n";
      else
        o << (first ? "" : ",") << "{\"pool\":" << json_string(pn)
          << ",\"algorithm\":" << json_string(to_string(p.cfg->algorithm)) << ",\"server\":null}";
      first = false;
      continue;
    }
    const SourceKey key = source_key(a, p.cfg->hash_prefix_v4, p.cfg->hash_prefix_v6);
    const SourceChoice choice{p.source.get(), SourceTable::bucket_of(key.hash), p.cfg->hash_balance_factor};
    std::vector<ServerView> views;
    for (const auto& s : p.servers) views.push_back(s->view(now));
    PoolBalancer balancer;
    const Selection sel = balancer.pick(
        Algorithm::source, views, {}, 0, [](size_t) { return true; }, &choice);
    std::vector<SourceTable::Ranked> scratch;
    std::vector<uint32_t> regular, backup;
    p.source->rank(choice.bucket, false, scratch, regular);
    p.source->rank(choice.bucket, true, scratch, backup);
    auto names = [&](const std::vector<uint32_t>& list, const char* sep, bool quoted) {
      std::string out;
      for (size_t i = 0; i < list.size() && i < kShown; ++i) {
        const std::string& n = p.servers[list[i]]->cfg.name;
        out += (i ? sep : "") + (quoted ? json_string(n) : n);
      }
      if (!quoted && list.size() > kShown) out += " ...";
      return out;
    };
    const std::string server = sel.index ? p.servers[*sel.index]->cfg.name : "";
    if (as_text) {
      o << "pool " << pn << " (source, key " << key.to_string() << "): " << (sel.index ? server : "no usable server")
        << (sel.detoured ? " (hash_balance_factor passed the key on)" : "") << "\n"
        << "  preferences: " << names(regular, " ", false) << "\n";
      if (!backup.empty()) o << "  backup preferences: " << names(backup, " ", false) << "\n";
    } else {
      o << (first ? "" : ",") << "{\"pool\":" << json_string(pn)
        << ",\"algorithm\":\"source\",\"key\":" << json_string(key.to_string()) << ",\"bucket\":" << choice.bucket
        << ",\"server\":" << (sel.index ? json_string(server) : "null")
        << ",\"detoured\":" << (sel.detoured ? "true" : "false") << ",\"preferences\":[" << names(regular, ",", true)
        << "],\"backup_preferences\":[" << names(backup, ",", true) << "]}";
    }
    first = false;
  }
  if (!as_text) o << "]}";
  return as_text ? text(200, o.str()) : AdminResponse{200, "application/json", o.str(), ""};
}

std::string Process::render_status_json() const {
  std::ostringstream o;
  o << "{\"version\":" << json_string(kVersion) << ",\"generation\":" << generation_
    << ",\"loaded_at\":" << iso_time(generation_loaded_ms_) << ",\"started_at\":" << iso_time(start_time_ms_)
    << ",\"state\":"
    << json_string(phase_ != Phase::running ? "stopping"
                   : draining_              ? "draining"
                                            : "running")
    << ",\"draining_since\":" << iso_time(phase_ == Phase::running && draining_ ? draining_since_ms_ : 0)
    << ",\"last_reload_successful\":" << (last_reload_ok_ ? "true" : "false")
    << ",\"client_table\":{\"entries\":" << snapshot_->clients->size()
    << ",\"capacity\":" << snapshot_->config->global.max_tracked_clients
    << ",\"evictions\":" << snapshot_->clients->evictions() << "},\"listeners\":[";
  bool first = true;
  for (const auto& l : snapshot_->listeners) {
    o << (first ? "" : ",") << "{\"name\":" << json_string(l->cfg->name)
      << ",\"address\":" << json_string(l->bound.to_string()) << ",\"pool\":" << json_string(l->cfg->pool)
      << ",\"backlog\":" << l->backlog << ",\"current_connections\":" << l->state->current.load()
      << ",\"connections_total\":"
      << sum(
             l->state->per_worker, [](const ListenerWorkerCounters& c) -> const auto& { return c.connections; })
      << "}";
    first = false;
  }
  o << "],\"pools\":[";
  first = true;
  for (const auto& p : snapshot_->pools) {
    o << (first ? "" : ",") << "{\"name\":" << json_string(p.cfg->name)
      << ",\"algorithm\":" << json_string(to_string(p.cfg->algorithm)) << ",\"queued\":" << p.state->queued.load()
      << ",\"servers\":[";
    first = false;
    bool sfirst = true;
    for (const auto& sp : p.servers) {
      const ServerRuntime& s = *sp;
      const int64_t ramp = s.ramp_start_ms.load();
      const uint32_t eff =
          effective_weight(s.effective_weight(), ramp < 0 ? -1 : int64_t(uv_now(const_cast<uv_loop_t*>(&loop_))) - ramp,
                           p.cfg->slow_start.count()) /
          kWeightScale;
      o << (sfirst ? "" : ",") << "{\"name\":" << json_string(s.cfg.name)
        << ",\"address\":" << json_string(s.cfg.addr.len ? s.cfg.addr.to_string() : std::string())
        << ",\"host\":" << json_string(s.cfg.host_name ? s.cfg.address : std::string())
        << ",\"pending_address\":" << json_string(s.pending_address)
        << ",\"resolve_error\":" << json_string(s.resolve_error)
        << ",\"health\":" << json_string(health_name(s.health.load()))
        << ",\"admin_state\":" << json_string(to_string(s.admin.load()))
        << ",\"effective_admin_state\":" << json_string(to_string(s.effective_admin()))
        << ",\"backup\":" << (s.backup.load() ? "true" : "false") << ",\"weight\":" << s.weight.load()
        << ",\"effective_weight\":" << eff << ",\"max_connections\":" << s.max_connections.load()
        << ",\"current_connections\":" << s.active.load() << ",\"connections_total\":"
        << sum(
               s.per_worker, [](const ServerWorkerCounters& c) -> const auto& { return c.sessions; })
        << ",\"last_check\":{\"time\":" << iso_time(s.last_check_ms.load())
        << ",\"duration_ms\":" << s.last_check_duration_ms.load() << ",\"result\":"
        << json_string(s.last_check_ms.load() == 0 ? "none"
                       : s.last_check_ok.load()    ? "passed"
                                                   : "failed")
        << ",\"reason\":" << json_string(s.last_check_reason)
        << "},\"last_change\":{\"time\":" << iso_time(s.last_change_ms)
        << ",\"cause\":" << json_string(s.last_change_cause) << "}";
      if (p.cfg->health_check.agent_port)
        o << ",\"agent\":{\"state\":" << json_string(agent_state(s)) << ",\"weight_percent\":" << s.agent_percent.load()
          << ",\"reply\":" << json_string(s.agent_reply) << ",\"failures\":" << s.agent_failures.load() << "}";
      o << "}";
      sfirst = false;
    }
    o << "]}";
  }
  o << "]}\n";
  return o.str();
}

std::string Process::render_status_text() const {
  std::ostringstream o;
  o << "smtplb " << kVersion << ", generation " << generation_ << (last_reload_ok_ ? "" : " (last reload FAILED)")
    << (phase_ != Phase::running ? ", stopping"
        : draining_              ? ", draining (/healthz answers 503)"
                                 : "")
    << "\n\n";
  char line[512];
  std::snprintf(line, sizeof line, "%-16s %-28s %-12s %8s %8s\n", "LISTENER", "ADDRESS", "POOL", "CURRENT", "TOTAL");
  o << line;
  for (const auto& l : snapshot_->listeners) {
    std::snprintf(
        line, sizeof line, "%-16s %-28s %-12s %8u %8llu\n", l->cfg->name.c_str(), l->bound.to_string().c_str(),
        l->cfg->pool.c_str(), l->state->current.load(),
        (unsigned long long)sum(
            l->state->per_worker, [](const ListenerWorkerCounters& c) -> const auto& { return c.connections; }));
    o << line;
  }
  o << "\n";
  std::snprintf(line, sizeof line, "%-24s %-24s %-9s %-6s %6s %7s %8s  %s\n", "SERVER", "ADDRESS", "HEALTH", "ADMIN",
                "WEIGHT", "CURRENT", "TOTAL", "LAST CHECK");
  o << line;
  for (const auto& p : snapshot_->pools)
    for (const auto& sp : p.servers) {
      const ServerRuntime& s = *sp;
      const std::string check = s.last_check_ms.load() == 0 ? "-"
                                : s.last_check_ok.load()    ? "passed"
                                                            : "failed: " + s.last_check_reason;
      std::snprintf(line, sizeof line, "%-24s %-24s %-9s %-6s %6u %7u %8llu  %s\n", s.label.c_str(),
                    s.cfg.addr.len ? s.cfg.addr.to_string().c_str() : "-", health_name(s.health.load()),
                    to_string(s.admin.load()), s.weight.load(), s.active.load(),
                    (unsigned long long)sum(
                        s.per_worker, [](const ServerWorkerCounters& c) -> const auto& { return c.sessions; }),
                    check.c_str());
      o << line;
    }
  return o.str();
}

}  // namespace smtplb
