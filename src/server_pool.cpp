#include "server_pool.hpp"

namespace smtplb {

ServerRuntime::ServerRuntime(const PoolConfig& pool, const ServerConfig& server)
    : cfg(server), label(pool.name + "/" + server.name) {}

std::shared_ptr<Snapshot> build_snapshot(std::shared_ptr<const Config> config, uint64_t generation) {
  auto snap = std::make_shared<Snapshot>();
  snap->config = config;
  snap->generation = generation;
  for (const auto& p : config->pools) {
    PoolRuntime pr;
    pr.cfg = &p;
    for (const auto& s : p.servers) pr.servers.push_back(std::make_shared<ServerRuntime>(p, s));
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
