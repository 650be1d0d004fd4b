#include "server_pool.hpp"

#include <unistd.h>

#include <cstring>

namespace smtplb {

ServerRuntime::ServerRuntime(const PoolConfig& pool, const ServerConfig& server, std::shared_ptr<PoolState> ps)
    : cfg(server),
      label(pool.name + "/" + server.name),
      pool_state(std::move(ps)),
      admin(server.state),
      configured_admin(server.state),
      configured_weight(server.weight),
      weight(server.weight),
      max_connections(server.max_connections),
      backup(server.backup) {}

void ServerRuntime::apply(const ServerConfig& server) {
  // Runtime changes (admin API) last until the configured value itself changes.
  if (configured_weight.exchange(server.weight, std::memory_order_relaxed) != server.weight)
    weight.store(server.weight, std::memory_order_relaxed);
  max_connections.store(server.max_connections, std::memory_order_relaxed);
  backup.store(server.backup, std::memory_order_relaxed);
  if (configured_admin.exchange(server.state, std::memory_order_relaxed) != server.state)
    admin.store(server.state, std::memory_order_relaxed);
}

bool ServerRuntime::same_identity(const ServerConfig& server) const {
  return server.name == cfg.name && server.address == cfg.address && server.port == cfg.port &&
         server.addr.len == cfg.addr.len && std::memcmp(&server.addr.storage, &cfg.addr.storage, cfg.addr.len) == 0;
}

bool ServerRuntime::try_acquire() {
  const uint32_t max = max_connections.load(std::memory_order_relaxed);
  if (!max) {
    active.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  uint32_t cur = active.load(std::memory_order_relaxed);
  do {
    if (cur >= max) return false;
  } while (!active.compare_exchange_weak(cur, cur + 1, std::memory_order_relaxed));
  return true;
}

bool ServerRuntime::release() {
  active.fetch_sub(1, std::memory_order_relaxed);
  if (!max_connections.load(std::memory_order_relaxed)) return false;
  // Store (active) then load (queued), against the waiter's store (queued) then load
  // (active): without a full fence on both sides each could miss the other's store and
  // the waiter would sleep until queue_timeout next to a free slot.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return pool_state->queued.load(std::memory_order_relaxed) > 0;
}

ServerView ServerRuntime::view(int64_t now_ms) const {
  const int64_t ramp = ramp_start_ms.load(std::memory_order_relaxed);
  return {usable(),
          backup.load(std::memory_order_relaxed),
          full(),
          weight.load(std::memory_order_relaxed),
          ramp < 0 ? -1 : now_ms - ramp,
          active.load(std::memory_order_relaxed)};
}

ListenerRuntime::~ListenerRuntime() {
  for (int fd : fds)
    if (fd >= 0) ::close(fd);
}

void apply_settings(const Snapshot& snap) {
  for (const auto& p : snap.pools)
    for (size_t i = 0; i < p.servers.size(); ++i) p.servers[i]->apply(p.cfg->servers[i]);
}

bool same_listener(const ListenerConfig& a, const ListenerConfig& b) {
  return a.name == b.name && a.address == b.address && a.port == b.port;
}

std::shared_ptr<Snapshot> build_snapshot(std::shared_ptr<const Config> config, uint64_t generation,
                                         const Snapshot* previous) {
  auto snap = std::make_shared<Snapshot>();
  snap->config = config;
  snap->generation = generation;
  for (const auto& p : config->pools) {
    const PoolRuntime* old = nullptr;
    if (previous)
      for (const auto& op : previous->pools)
        if (op.cfg->name == p.name) old = &op;
    PoolRuntime pr;
    pr.cfg = &p;
    pr.state = old ? old->state : std::make_shared<PoolState>();
    for (const auto& s : p.servers) {
      std::shared_ptr<ServerRuntime> kept;
      if (old)
        for (const auto& os : old->servers)
          if (os->same_identity(s)) kept = os;
      // A kept server takes its new settings in apply_settings(), once the reload is sure.
      if (!kept) kept = std::make_shared<ServerRuntime>(p, s, pr.state);
      pr.servers.push_back(std::move(kept));
    }
    snap->pools.push_back(std::move(pr));
  }
  for (const auto& l : config->listeners) {
    auto lr = std::make_shared<ListenerRuntime>();
    lr->cfg = &l;
    for (size_t i = 0; i < config->pools.size(); ++i)
      if (config->pools[i].name == l.pool) lr->pool = i;
    lr->bound = l.bind;
    if (previous)
      for (const auto& ol : previous->listeners)
        if (same_listener(*ol->cfg, l)) {
          lr->state = ol->state;
          lr->bound = ol->bound;
        }
    snap->listeners.push_back(std::move(lr));
  }
  return snap;
}

}  // namespace smtplb
