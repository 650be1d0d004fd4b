// How an agent's words combine with the operator's admin state, the weight and the
// health checks (ServerRuntime: effective_weight, effective_admin, usable), as the
// workers see it. The rules are documented in docs/architecture.md ("Agent feedback").
#include <doctest/doctest.h>

#include <memory>

#include "runtime/server_pool.hpp"

using smtplb::AdminState;
using smtplb::Health;
using smtplb::PoolConfig;
using smtplb::PoolState;
using smtplb::ServerConfig;
using smtplb::ServerRuntime;

namespace {
struct Server {
  PoolConfig pool;
  std::shared_ptr<ServerRuntime> rt;
  explicit Server(unsigned weight) {
    pool.name = "p";
    ServerConfig sc;
    sc.name = "s1";
    sc.weight = weight;
    pool.servers.push_back(sc);
    rt = std::make_shared<ServerRuntime>(pool, sc, std::make_shared<PoolState>());
    rt->health.store(Health::up);
  }
  ServerRuntime* operator->() { return rt.get(); }
};
}  // namespace

TEST_CASE("agent and operator: the more restrictive admin state applies") {
  Server s(100);
  CHECK(s->usable());
  // The agent drains: no new sessions; the operator's "ready" does not end it.
  s->agent_admin.store(AdminState::drain);
  s->admin.store(AdminState::ready);
  CHECK(s->effective_admin() == AdminState::drain);
  CHECK_FALSE(s->usable());
  // The operator's maint wins over the agent's drain, and over the agent's ready.
  s->admin.store(AdminState::maint);
  CHECK(s->effective_admin() == AdminState::maint);
  s->agent_admin.store(AdminState::ready);
  CHECK(s->effective_admin() == AdminState::maint);
  CHECK_FALSE(s->usable());
  // The operator's drain is not ended by the agent's ready either.
  s->admin.store(AdminState::drain);
  CHECK(s->effective_admin() == AdminState::drain);
  CHECK_FALSE(s->usable());
  // The agent's maint wins over the operator's drain.
  s->agent_admin.store(AdminState::maint);
  CHECK(s->effective_admin() == AdminState::maint);
  // Both ready: usable again.
  s->admin.store(AdminState::ready);
  s->agent_admin.store(AdminState::ready);
  CHECK(s->effective_admin() == AdminState::ready);
  CHECK(s->usable());
}

TEST_CASE("agent and health checks: an agent's down takes the server out, its up does not bring it in") {
  Server s(100);
  s->agent_down.store(true);
  CHECK_FALSE(s->usable());  // the health check passes, the agent says down
  s->agent_down.store(false);
  CHECK(s->usable());
  // The agent's up does not override a failed (or missing) health check.
  s->health.store(Health::down);
  CHECK_FALSE(s->usable());
  s->health.store(Health::unknown);
  CHECK_FALSE(s->usable());
}

TEST_CASE("agent and weight: the percentage scales the operator's weight, configured or set at run time") {
  Server s(100);
  CHECK(s->effective_weight() == 100);
  s->agent_percent.store(50);
  CHECK(s->effective_weight() == 50);
  s->weight.store(40);  // POST /servers/p/s1/weight: the agent's 50% still applies
  CHECK(s->effective_weight() == 20);
  s->agent_percent.store(256);
  CHECK(s->effective_weight() == 102);
  s->weight.store(200);
  CHECK(s->effective_weight() == 256);  // at most 256
  // 0% takes no new sessions, like weight 0; the state words stay as they were.
  s->agent_percent.store(0);
  CHECK(s->effective_weight() == 0);
  CHECK_FALSE(s->usable());
  CHECK(s->effective_admin() == AdminState::ready);
  s->agent_percent.store(100);
  s->weight.store(0);
  CHECK_FALSE(s->usable());
}

TEST_CASE("agent and weight: whole weight units, so weight 1 (the default) ignores 1% to 149%") {
  // The effective weight is an integer: weight x percent / 100, rounded, at least 1
  // unless 0. A server left at weight 1 cannot be steered below its full share except
  // by 0% (or drain); give agent-steered servers a weight such as 100.
  Server one(1);
  for (unsigned pct : {1u, 10u, 50u, 100u, 149u}) {
    one->agent_percent.store(pct);
    INFO(pct);
    CHECK(one->effective_weight() == 1);
  }
  one->agent_percent.store(150);
  CHECK(one->effective_weight() == 2);
  Server hundred(100);
  for (unsigned pct : {1u, 10u, 55u}) {
    hundred->agent_percent.store(pct);
    CHECK(hundred->effective_weight() == pct);
  }
}
