#include "runtime/server_pool.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>

#include "smtplb/lb/agent_reply.hpp"

namespace smtplb {

unsigned read_somaxconn() {
  // The kernel caps every listen() backlog at this; 4096 is its default since Linux 5.4.
  std::ifstream f("/proc/sys/net/core/somaxconn");
  long v = 0;
  if (f >> v && v > 0) return unsigned(std::min<long>(v, 1L << 30));
  return 4096;
}

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
  // We write `active` then read `queued`; a waiter writes `queued` then reads `active`.
  // Plain loads could each miss the other's write, and the waiter would sleep until
  // queue_timeout next to a free slot. Reading `queued` with a read-modify-write orders
  // the two: either it sees the waiter, or the waiter's own read-modify-write of
  // `queued` (Worker::enqueue) comes after it and so sees the slot we freed.
  return pool_state->queued.fetch_add(0, std::memory_order_acq_rel) > 0;
}

uint32_t ServerRuntime::effective_weight() const {
  return agent_scaled_weight(weight.load(std::memory_order_relaxed), agent_percent.load(std::memory_order_relaxed));
}

ServerView ServerRuntime::view(int64_t now_ms) const {
  const int64_t ramp = ramp_start_ms.load(std::memory_order_relaxed);
  return {usable(),           backup.load(std::memory_order_relaxed), full(),
          effective_weight(), ramp < 0 ? -1 : now_ms - ramp,          active.load(std::memory_order_relaxed)};
}

ListenerRuntime::~ListenerRuntime() {
  for (int fd : fds)
    if (fd >= 0) ::close(fd);
}

ListenerState::ListenerState()
    : id([] {
        static std::atomic<uint32_t> next{1};
        return next.fetch_add(1, std::memory_order_relaxed);
      }()) {}

void apply_settings(const Snapshot& snap) {
  snap.clients->set_capacity(snap.config->global.max_tracked_clients);
  for (const auto& p : snap.pools)
    for (size_t i = 0; i < p.servers.size(); ++i) p.servers[i]->apply(p.cfg->servers[i]);
}

std::shared_ptr<Snapshot> build_snapshot(std::shared_ptr<const Config> config, uint64_t generation,
                                         const Snapshot* previous, const ReloadPlan* plan) {
  auto snap = std::make_shared<Snapshot>();
  snap->config = config;
  snap->generation = generation;
  for (size_t pi = 0; pi < config->pools.size(); ++pi) {
    const PoolConfig& p = config->pools[pi];
    const PoolRuntime* old = previous && plan && plan->pools[pi] ? &previous->pools[*plan->pools[pi]] : nullptr;
    PoolRuntime pr;
    pr.cfg = &p;
    pr.state = old ? old->state : std::make_shared<PoolState>();
    for (size_t si = 0; si < p.servers.size(); ++si) {
      const auto& same = old ? plan->servers[pi][si] : std::nullopt;
      // A kept server takes its new settings in apply_settings(), once the reload is sure.
      pr.servers.push_back(same ? old->servers[*same] : std::make_shared<ServerRuntime>(p, p.servers[si], pr.state));
    }
    if (p.algorithm == Algorithm::source) {
      // The table depends on each position's name, weight and backup flag only: when none
      // changed (a re-resolution, a reload that touched other settings) the old one serves,
      // and the control loop skips a build (tens of ms for 1 000 servers).
      auto same_member = [](const ServerConfig& a, const ServerConfig& b) {
        return a.name == b.name && a.weight == b.weight && a.backup == b.backup;
      };
      if (old && old->source && old->cfg->algorithm == Algorithm::source &&
          std::equal(p.servers.begin(), p.servers.end(), old->cfg->servers.begin(), old->cfg->servers.end(),
                     same_member)) {
        pr.source = old->source;
      } else {
        std::vector<SourceMember> members;
        for (const ServerConfig& s : p.servers) members.push_back({s.name, s.weight, s.backup});
        pr.source = std::make_shared<const SourceTable>(members);
      }
    }
    snap->pools.push_back(std::move(pr));
  }
  const unsigned somaxconn = read_somaxconn();
  for (size_t li = 0; li < config->listeners.size(); ++li) {
    const ListenerConfig& l = config->listeners[li];
    auto lr = std::make_shared<ListenerRuntime>();
    lr->cfg = &l;
    for (size_t i = 0; i < config->pools.size(); ++i)
      if (config->pools[i].name == l.pool) lr->pool = i;
    lr->bound = l.bind;
    lr->somaxconn = somaxconn;
    lr->backlog = l.backlog ? l.backlog : somaxconn;
    lr->acl = AddressAcl(l.allow, l.deny);
    lr->exempt = AddressAcl(l.limits_exempt, {});
    lr->limits = {l.max_connections_per_ip, l.max_connection_rate_per_ip};
    if (previous && plan && plan->listeners[li]) {
      const ListenerRuntime& old = *previous->listeners[*plan->listeners[li]];
      lr->state = old.state;  // the workers recognise a kept listener by this object
      lr->bound = old.bound;
    }
    snap->listeners.push_back(std::move(lr));
  }
  snap->clients = previous && previous->clients ? previous->clients
                                                : std::make_shared<ClientTable>(config->global.max_tracked_clients);
  return snap;
}

}  // namespace smtplb
