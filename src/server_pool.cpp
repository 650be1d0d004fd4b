#include "server_pool.hpp"

namespace smtplb {

ServerRuntime::ServerRuntime(const PoolConfig& pool, const ServerConfig& server, std::shared_ptr<PoolState> ps)
    : cfg(server), label(pool.name + "/" + server.name), pool_state(std::move(ps)), admin(server.state) {}

bool ServerRuntime::try_acquire() {
  if (!cfg.max_connections) {
    active.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  uint32_t cur = active.load(std::memory_order_relaxed);
  do {
    if (cur >= cfg.max_connections) return false;
  } while (!active.compare_exchange_weak(cur, cur + 1, std::memory_order_relaxed));
  return true;
}

bool ServerRuntime::release() {
  active.fetch_sub(1, std::memory_order_relaxed);
  return cfg.max_connections && pool_state->queued.load(std::memory_order_relaxed) > 0;
}

std::shared_ptr<Snapshot> build_snapshot(std::shared_ptr<const Config> config, uint64_t generation) {
  auto snap = std::make_shared<Snapshot>();
  snap->config = config;
  snap->generation = generation;
  for (const auto& p : config->pools) {
    PoolRuntime pr;
    pr.cfg = &p;
    pr.state = std::make_shared<PoolState>();
    for (const auto& s : p.servers) pr.servers.push_back(std::make_shared<ServerRuntime>(p, s, pr.state));
    snap->pools.push_back(std::move(pr));
  }
  for (const auto& l : config->listeners) {
    auto lr = std::make_shared<ListenerRuntime>();
    lr->cfg = &l;
    for (size_t i = 0; i < config->pools.size(); ++i)
      if (config->pools[i].name == l.pool) lr->pool = i;
    lr->bound = l.bind;
    snap->listeners.push_back(std::move(lr));
  }
  return snap;
}

}  // namespace smtplb
