#pragma once
// The process: control loop on the main thread (signals, configuration reloads, health
// checks, snapshot publishing, systemd notifications) and the worker threads of the
// data path.
#include <uv.h>

#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "control/admin.hpp"
#include "control/agent_check.hpp"
#include "control/health_check.hpp"
#include "control/resolver.hpp"
#include "control/systemd.hpp"
#include "data/worker.hpp"
#include "log/log_writer.hpp"
#include "runtime/server_pool.hpp"

namespace smtplb {

class Process {
 public:
  Process(std::shared_ptr<const Config> config, std::optional<LogLevel> level_override);
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  // Binds, starts workers and checks, runs until stopped. Returns the exit code.
  int run();

  struct ReloadResult {
    bool ok = false;
    bool abandoned = false;           // stopping: the reload was dropped before it applied
    std::vector<std::string> errors;  // "FILE:LINE:COL: message" or a runtime error
    uint64_t generation = 0;          // the generation running afterwards
  };
  using ReloadDone = std::function<void(const ReloadResult&)>;
  // Reads and validates the configuration file at once; host names in it are then looked
  // up off the loop (checks, signals and the admin API go on meanwhile), and the new
  // snapshot is built and applied when every answer is in. On any error the running
  // configuration stays as it is. `done` gets the outcome: inside this call when nothing
  // needs resolving (IP literals only), later otherwise. A reload asked for while one
  // waits for names is coalesced: one more runs after it, reading the file again, and
  // answers everyone who asked meanwhile.
  void reload(ReloadDone done = nullptr);

  // Admin API (src/control/admin_api.cpp): one entry point for both endpoints.
  AdminResponse admin(const AdminServer::Request& req);

 private:
  std::string render_metrics() const;
  std::string render_status_json() const;
  std::string render_status_text() const;
  AdminResponse healthz() const;
  AdminResponse clients(std::string_view query);
  // GET /status?where=ADDRESS: where each source-affinity pool sends that client.
  AdminResponse where(std::string_view address, bool as_text);
  AdminResponse change_process_state(std::string_view body);
  AdminResponse change_server(std::string_view pool, std::string_view server, std::string_view what,
                              std::string_view body);
  ServerRuntime* find_server(std::string_view pool, std::string_view server, const PoolRuntime** pr = nullptr) const;

  // running -> stopping (SIGTERM: listeners closed, sessions finishing) -> stopped.
  enum class Phase { running, stopping, stopped };

  void start_reload();
  ReloadResult fail_reload(std::vector<std::string> errors);
  ReloadResult apply_reload(std::shared_ptr<const Config> cfg);
  void answer_reload(const ReloadResult& r);
  void abandon_reload();

  void on_signal(int signum);
  void begin_stop();
  void stop_now();
  void on_control_wake();
  void finish_if_done();
  void close_signals();
  void raise_fd_limit();
  void start_checker(const std::shared_ptr<ServerRuntime>& s, const PoolConfig& pool, uint64_t delay_ms);
  // Gives every server of `snap` its slot on the check grid (all servers of the process
  // evenly over their interval) and moves running checkers to theirs.
  void assign_check_slots(const Snapshot& snap);
  void retire_checker(ServerRuntime* s);
  // Agent feedback (health_check.agent_port): runs while the server is checked.
  void start_agent(const std::shared_ptr<ServerRuntime>& s, const PoolConfig& pool, uint64_t delay_ms);
  void retire_agent(ServerRuntime* s);
  void on_agent(AgentChecker& a, bool ok, const AgentReply& reply, const std::string& line, const std::string& error);
  const PoolRuntime* pool_of(const ServerRuntime& s) const;
  void on_transition(HealthChecker& c, Health from, Health to, const CheckResult& r);

  // Re-resolution of server host names (global.resolve_interval). A new answer is checked
  // at its address by a candidate (a ServerRuntime of its own, not in the snapshot);
  // once it passes, a snapshot with the new runtime in the old one's place is published:
  // new sessions go there, open ones stay where they are (like a reload).
  struct Candidate {
    std::shared_ptr<ServerRuntime> runtime;
    std::unique_ptr<HealthChecker> checker;
  };
  void schedule_refresh();
  void refresh_names();
  // Applies answers to the running servers; `quiet`: a reload has logged its failures.
  void on_lookups(const std::vector<HostLookup>& lookups, bool quiet);
  void start_candidate(ServerRuntime* s, const SocketAddress& addr);
  void drop_candidate(ServerRuntime* s);
  void on_candidate(ServerRuntime* s, Health to, const CheckResult& r);
  void promote(ServerRuntime* s);

  std::shared_ptr<const Config> config_;
  std::optional<LogLevel> level_override_;  // --log-level wins over the file
  std::shared_ptr<Snapshot> snapshot_;
  uint64_t generation_ = 1;
  unsigned worker_count_ = 1;  // fixed at start: changing it needs a restart
  Phase phase_ = Phase::running;
  // `smtplb ctl drain` (no server): /healthz answers 503 so that keepalived moves the
  // address, while listeners, sessions and checks go on as before. Nothing on the data
  // path reads it. `smtplb ctl ready` clears it; a reload keeps it.
  bool draining_ = false;
  int64_t draining_since_ms_ = 0;  // wall clock
  uv_loop_t loop_{};
  std::vector<uv_signal_t> signals_;
  uv_async_t control_wake_{};  // workers: passive ejections, a worker finished
  uv_timer_t grace_timer_{};   // shutdown_grace after SIGTERM
  ControlLink link_;
  SystemdNotifier notifier_;
  // Before the workers, so it outlives them: they log into its queues.
  std::unique_ptr<LogWriter> log_writer_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::unordered_map<ServerRuntime*, std::unique_ptr<HealthChecker>> checkers_;
  uint64_t check_epoch_ms_ = 0;  // loop time the check grid counts from
  std::unordered_map<const ServerRuntime*, uint64_t> check_offsets_;
  std::unordered_map<ServerRuntime*, std::unique_ptr<AgentChecker>> agents_;
  std::minstd_rand rng_{std::random_device{}()};
  std::unique_ptr<AdminServer> admin_;
  int64_t start_time_ms_ = 0;         // wall clock at start, for start_time_seconds
  int64_t generation_loaded_ms_ = 0;  // wall clock when the running generation loaded
  uint64_t reloads_ok_ = 0, reloads_failed_ = 0;
  bool last_reload_ok_ = true;
  Resolver resolver_{&loop_};               // busy while a reload waits for host names
  std::vector<ReloadDone> reload_waiters_;  // answered by the reload in progress
  std::vector<ReloadDone> next_waiters_;    // answered by the coalesced one after it
  bool reload_again_ = false;               // a reload was asked for while resolving
  Resolver refresher_{&loop_};              // busy while re-resolution waits for answers
  uv_timer_t resolve_timer_{};              // the next re-resolution
  // New addresses under check, by the server (in the snapshot) whose name gave them.
  std::unordered_map<ServerRuntime*, Candidate> candidates_;
  std::set<std::string> failing_hosts_;  // names whose last lookup failed (logged once)
};

}  // namespace smtplb
