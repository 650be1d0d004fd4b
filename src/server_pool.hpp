#pragma once
// Runtime state shared between the control loop and the workers, and the immutable
// snapshot the control loop publishes to them.
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "smtplb/config.hpp"
#include "smtplb/health_state.hpp"

namespace smtplb {

// One backend. Health is written only by the control loop; connection counts by workers.
struct ServerRuntime {
  ServerRuntime(const PoolConfig& pool, const ServerConfig& server);

  const ServerConfig cfg;
  const std::string label;  // "pool/server", for logs
  std::atomic<Health> health{Health::unknown};
  std::atomic<uint32_t> active{0};  // sessions connected or connecting (leastconn input)
  // notAfter of the certificate seen by the last STARTTLS check (Unix seconds; 0 = none).
  std::atomic<int64_t> tls_not_after{0};

  bool usable() const { return cfg.weight > 0 && health.load(std::memory_order_relaxed) == Health::up; }
};

struct PoolRuntime {
  const PoolConfig* cfg = nullptr;  // owned by Snapshot::config
  std::vector<std::shared_ptr<ServerRuntime>> servers;
};

struct ListenerRuntime {
  const ListenerConfig* cfg = nullptr;  // owned by Snapshot::config
  size_t pool = 0;                      // index into Snapshot::pools
  SocketAddress bound;                  // the address actually bound (port 0 resolved)
  std::vector<int> fds;                 // one SO_REUSEPORT socket per worker
  std::atomic<uint32_t> current{0};     // open client sessions, all workers
};

// What a worker needs to serve sessions. Never modified once published.
struct Snapshot {
  std::shared_ptr<const Config> config;
  uint64_t generation = 1;
  std::vector<PoolRuntime> pools;
  std::vector<std::shared_ptr<ListenerRuntime>> listeners;
};

// Builds pools and servers for a config (listener sockets are added by the caller).
std::shared_ptr<Snapshot> build_snapshot(std::shared_ptr<const Config> config, uint64_t generation);

}  // namespace smtplb
