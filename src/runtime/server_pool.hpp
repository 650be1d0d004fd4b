#pragma once
// Runtime state shared between the control loop and the workers, and the immutable
// snapshot the control loop publishes to them.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/counters.hpp"
#include "smtplb/config/config.hpp"
#include "smtplb/config/reload_plan.hpp"
#include "smtplb/edge/address_acl.hpp"
#include "smtplb/edge/client_table.hpp"
#include "smtplb/lb/check_failure.hpp"
#include "smtplb/lb/health_state.hpp"
#include "smtplb/lb/select.hpp"

namespace smtplb {

class SessionCore;

// What one worker keeps per pool: its balancer state and its queue of sessions waiting
// for a free slot (first come first served). Only that worker touches its slot.
struct alignas(64) PoolWorkerState {
  PoolBalancer balancer;
  SessionCore* head = nullptr;  // intrusive list through SessionCore::q_next_ / q_prev_
  SessionCore* tail = nullptr;
};

// One pool, kept across reloads while a pool of that name exists: counters, the queue
// length shared by all workers and each worker's own slot. Identity is this object: a
// new pool gets a new one, so no state is inherited from a pool that went away.
struct PoolState {
  std::atomic<uint32_t> queued{0};          // sessions waiting for a free server slot
  std::atomic<uint64_t> no_server{0};       // clients answered 421: no usable server
  std::atomic<uint64_t> queue_timeouts{0};  // clients answered 421: queue_timeout passed
  std::atomic<uint64_t> source_detours{0};  // source: keys hash_balance_factor passed on
  std::unique_ptr<PoolWorkerState[]> per_worker{new PoolWorkerState[kMaxWorkers]};
};

// One backend, identified by (pool, name, address, port); a reload that keeps those keeps
// this object, with its health, counters and sessions. Health, admin state, the settings
// a reload may change and the slow-start ramp are written only by the control loop;
// connection counts and passive failures by the workers.
struct ServerRuntime {
  ServerRuntime(const PoolConfig& pool, const ServerConfig& server, std::shared_ptr<PoolState> pool_state);

  // Takes the reloadable settings of `server` (same identity). The admin state and the
  // weight change only when the configured value changed, so a runtime drain or weight
  // (admin API) survives an unrelated reload.
  void apply(const ServerConfig& server);

  const ServerConfig cfg;   // as configured when created; identity fields only are used
  const std::string label;  // "pool/server", for logs
  const std::shared_ptr<PoolState> pool_state;
  std::atomic<Health> health{Health::unknown};
  std::atomic<AdminState> admin;
  std::atomic<AdminState> configured_admin;  // the config's value, to detect changes
  std::atomic<uint32_t> configured_weight;   // likewise for a weight set at runtime
  std::atomic<uint32_t> weight;
  std::atomic<uint32_t> max_connections;
  std::atomic<bool> backup;
  std::atomic<uint32_t> active{0};            // sessions connected or connecting
  std::atomic<uint32_t> passive_failures{0};  // failed session attempts in a row
  // Loop time (ms) when the server came back UP and its slow-start ramp began; -1: none.
  std::atomic<int64_t> ramp_start_ms{-1};
  // notAfter of the certificate seen by the last STARTTLS check (Unix seconds; 0 = none).
  std::atomic<int64_t> tls_not_after{0};
  // A server named by a host name: failed lookups (re-resolution), why the last one
  // failed (empty when it answered) and a new answer under check before it takes
  // sessions ("" when none). The strings are for the control loop only.
  std::atomic<uint64_t> resolve_failures{0};
  // Agent feedback (written by the control loop): the agent's weight in percent of
  // `weight`, its admin state and whether it says the server is down. Combined with the
  // operator's: the more restrictive admin state wins, and down is down.
  std::atomic<uint32_t> agent_percent{100};
  std::atomic<AdminState> agent_admin{AdminState::ready};
  std::atomic<bool> agent_down{false};
  std::atomic<uint64_t> agent_failures{0};  // unreachable agent or a reply not understood
  std::string agent_reply;                  // the last reply understood (control loop only)
  std::string resolve_error;
  std::string pending_address;

  // Metrics. Per worker (data path):
  std::unique_ptr<ServerWorkerCounters[]> per_worker{new ServerWorkerCounters[kMaxWorkers]};
  // Control loop (checks):
  std::array<std::atomic<uint64_t>, kCheckFailureCount> check_failures{};
  std::atomic<uint64_t> transitions_up{0}, transitions_down{0};
  Histogram check_duration;
  std::atomic<int64_t> last_check_ms{0};  // wall clock (Unix ms) of the last check
  std::atomic<uint32_t> last_check_duration_ms{0};
  std::atomic<bool> last_check_ok{false};
  std::string last_check_reason;  // control loop only
  int64_t last_change_ms = 0;     // wall clock of the last transition; control only
  std::string last_change_cause;  // control loop only

  // The weight the balancer uses: the configured (or admin-set) one scaled by the agent.
  uint32_t effective_weight() const;
  // Operator and agent combined: the more restrictive admin state.
  AdminState effective_admin() const {
    return std::max(admin.load(std::memory_order_relaxed), agent_admin.load(std::memory_order_relaxed));
  }
  // May take new sessions (health, admin states, agent and weight; not the connection limit).
  bool usable() const {
    return effective_weight() > 0 && health.load(std::memory_order_relaxed) == Health::up &&
           effective_admin() == AdminState::ready && !agent_down.load(std::memory_order_relaxed);
  }
  bool full() const {
    const uint32_t max = max_connections.load(std::memory_order_relaxed);
    return max && active.load(std::memory_order_relaxed) >= max;
  }
  // Takes a connection slot unless max_connections is reached (exact across workers).
  bool try_acquire();
  // Gives the slot back; true when a queued session may now take it. Pairs with
  // Worker::enqueue: either this sees the waiter, or the waiter's second look sees the
  // freed slot.
  bool release();
  // This server as the chooser sees it now (`now_ms`: loop time, for slow start).
  ServerView view(int64_t now_ms) const;
};

struct PoolRuntime {
  const PoolConfig* cfg = nullptr;  // owned by Snapshot::config
  std::shared_ptr<PoolState> state;
  std::vector<std::shared_ptr<ServerRuntime>> servers;
  // algorithm = "source": the preference table of the configured servers (names, weights,
  // backup flags), built with the snapshot on the control loop; null otherwise.
  std::shared_ptr<const SourceTable> source;
};

// Counters of one listener, kept across reloads while the listener stays.
struct ListenerState {
  ListenerState();
  const uint32_t id;                               // unique in the process: a part of this listener's client keys
  std::atomic<uint32_t> current{0};                // open client sessions, all workers
  std::atomic<uint64_t> rejected_limit{0};         // refused: listener or process max_connections
  std::atomic<uint64_t> rejected_no_server{0};     // refused: no usable server / queue timeout
  std::atomic<uint64_t> rejected_proxy{0};         // closed: bad/missing PROXY header, untrusted sender
  std::atomic<uint64_t> rejected_acl{0};           // refused by allow / deny
  std::atomic<uint64_t> rejected_per_ip_limit{0};  // refused: max_connections_per_ip
  std::atomic<uint64_t> rejected_per_ip_rate{0};   // refused: max_connection_rate_per_ip
  std::atomic<uint64_t> dry_run_limit{0};          // limits_dry_run: would have refused
  std::atomic<uint64_t> dry_run_rate{0};
  std::atomic<int64_t> last_edge_log_ms{-1'000'000};     // rate limit for ACL and per-client lines
  std::atomic<int64_t> last_refusal_log_ms{-1'000'000};  // rate limit for the refusal warning
  std::atomic<int64_t> last_proxy_log_ms{-1'000'000};    // rate limit for PROXY warnings
  std::unique_ptr<ListenerWorkerCounters[]> per_worker{new ListenerWorkerCounters[kMaxWorkers]};
};

// net.core.somaxconn, the kernel's cap on listen() backlogs (4096 when unreadable).
unsigned read_somaxconn();

struct ListenerRuntime {
  ListenerRuntime() = default;
  ListenerRuntime(const ListenerRuntime&) = delete;
  ListenerRuntime& operator=(const ListenerRuntime&) = delete;
  // Closes the sockets no worker adopted (a failed reload, a worker that was stopping).
  ~ListenerRuntime();

  const ListenerConfig* cfg = nullptr;  // owned by Snapshot::config
  size_t pool = 0;                      // index into Snapshot::pools
  SocketAddress bound;                  // the address actually bound (port 0 resolved)
  unsigned backlog = 4096;              // listen() backlog in force: cfg->backlog or somaxconn
  unsigned somaxconn = 4096;            // net.core.somaxconn when the snapshot was built
  // One SO_REUSEPORT socket per worker, freshly bound. Owned here until worker i adopts
  // fds[i] (it sets the entry to -1 and closes the socket when it stops listening);
  // whatever is left is closed with this object, so every socket has one owner. A
  // listener kept by a reload has none: the workers keep theirs.
  std::vector<int> fds;
  std::shared_ptr<ListenerState> state = std::make_shared<ListenerState>();
  // Edge defences of this configuration generation (a reload applies new ones to new
  // connections); the client table they count in is the snapshot's.
  AddressAcl acl;
  AddressAcl exempt;  // allows exactly limits_exempt
  ClientLimits limits;
};

// What a worker needs to serve sessions. Its structure (pools, servers, listeners,
// config) is fixed once published; what changes at run time lives in the atomics of the
// runtime objects it points to (health, admin state, weights, counts), and a worker
// takes the listening sockets meant for it out of `ListenerRuntime::fds`.
struct Snapshot {
  std::shared_ptr<const Config> config;
  uint64_t generation = 1;
  std::vector<PoolRuntime> pools;
  std::vector<std::shared_ptr<ListenerRuntime>> listeners;
  // Open sessions and rates per client key, for all listeners and workers; the same table
  // for the life of the process (a reload passes it on).
  std::shared_ptr<ClientTable> clients;
};

// Builds pools, servers and listeners for a config. For a reload, `previous` is the
// running snapshot and `plan` says which of its pools, servers and listeners the new
// config keeps (plan_reload): those carry over their state, counters and bound address;
// the caller binds the sockets of new listeners (fds empty).
std::shared_ptr<Snapshot> build_snapshot(std::shared_ptr<const Config> config, uint64_t generation,
                                         const Snapshot* previous = nullptr, const ReloadPlan* plan = nullptr);

// Gives every server of the snapshot its configured weight, limits, backup flag and
// admin state (for servers carried over from an earlier snapshot).
void apply_settings(const Snapshot& snap);

}  // namespace smtplb
