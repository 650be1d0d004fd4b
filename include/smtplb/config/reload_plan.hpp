#pragma once
// What a reload keeps, adds and removes, decided in one place by one identity rule:
//   a pool is the same pool when its name is the same;
//   a server is the same server when it is in the same pool and its name, address (as
//     written and as resolved) and port are the same;
//   a listener is the same listener when its name, address and port are the same.
// A kept object keeps its runtime state (health, counters, open sessions, bound
// sockets); everything else is new. Pure: the control loop builds the snapshot and
// starts or stops checks and listeners from this plan.
#include <cstddef>
#include <optional>
#include <utility>
#include <vector>

#include "smtplb/config/config.hpp"

namespace smtplb {

bool same_pool(const PoolConfig& a, const PoolConfig& b);
bool same_server(const ServerConfig& a, const ServerConfig& b);  // within pools that are the same
bool same_listener(const ListenerConfig& a, const ListenerConfig& b);

struct ReloadPlan {
  // For each pool of the new config, the index of the same pool in the running one.
  std::vector<std::optional<size_t>> pools;
  // For each pool and server of the new config, the index of the same server in the
  // running config's same pool (none for a new server, or any server of a new pool).
  std::vector<std::vector<std::optional<size_t>>> servers;
  // For each listener of the new config, the index of the same listener in the running one.
  std::vector<std::optional<size_t>> listeners;
  // Running servers (pool index, server index) and listeners that the new config drops.
  std::vector<std::pair<size_t, size_t>> removed_servers;
  std::vector<size_t> removed_listeners;

  size_t added_servers() const;
  size_t added_listeners() const;
};

ReloadPlan plan_reload(const Config& running, const Config& next);

}  // namespace smtplb
