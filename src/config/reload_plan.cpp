#include "smtplb/config/reload_plan.hpp"

#include <cstring>

namespace smtplb {

bool same_pool(const PoolConfig& a, const PoolConfig& b) {
  return a.name == b.name;
}

bool same_server(const ServerConfig& a, const ServerConfig& b) {
  return a.name == b.name && a.address == b.address && a.port == b.port && a.addr.same_as(b.addr);
}

bool same_listener(const ListenerConfig& a, const ListenerConfig& b) {
  return a.name == b.name && a.address == b.address && a.port == b.port;
}

size_t ReloadPlan::added_servers() const {
  size_t n = 0;
  for (const auto& pool : servers)
    for (const auto& s : pool) n += !s.has_value();
  return n;
}

size_t ReloadPlan::added_listeners() const {
  size_t n = 0;
  for (const auto& l : listeners) n += !l.has_value();
  return n;
}

ReloadPlan plan_reload(const Config& running, const Config& next) {
  ReloadPlan plan;
  std::vector<std::vector<bool>> server_kept(running.pools.size());
  for (size_t i = 0; i < running.pools.size(); ++i) server_kept[i].assign(running.pools[i].servers.size(), false);

  for (const PoolConfig& np : next.pools) {
    std::optional<size_t> old;
    for (size_t i = 0; i < running.pools.size(); ++i)
      if (same_pool(running.pools[i], np)) old = i;
    plan.pools.push_back(old);
    std::vector<std::optional<size_t>> servers;
    for (const ServerConfig& ns : np.servers) {
      std::optional<size_t> match;
      if (old) {
        const auto& olds = running.pools[*old].servers;
        for (size_t j = 0; j < olds.size(); ++j)
          if (!server_kept[*old][j] && same_server(olds[j], ns)) {
            match = j;
            break;
          }
        if (match) server_kept[*old][*match] = true;
      }
      servers.push_back(match);
    }
    plan.servers.push_back(std::move(servers));
  }
  for (size_t i = 0; i < running.pools.size(); ++i)
    for (size_t j = 0; j < server_kept[i].size(); ++j)
      if (!server_kept[i][j]) plan.removed_servers.emplace_back(i, j);

  std::vector<bool> listener_kept(running.listeners.size(), false);
  for (const ListenerConfig& nl : next.listeners) {
    std::optional<size_t> match;
    for (size_t i = 0; i < running.listeners.size(); ++i)
      if (!listener_kept[i] && same_listener(running.listeners[i], nl)) {
        match = i;
        break;
      }
    if (match) listener_kept[*match] = true;
    plan.listeners.push_back(match);
  }
  for (size_t i = 0; i < listener_kept.size(); ++i)
    if (!listener_kept[i]) plan.removed_listeners.push_back(i);
  return plan;
}

}  // namespace smtplb
