// A worker driven by hand on the test thread (its thread is never started): snapshots
// published back to back, and per-pool balancer state across pools that come and go.
#include <doctest/doctest.h>

#include <uv.h>

#include <algorithm>
#include <memory>
#include <new>
#include <string>

#include "data/listener.hpp"
#include "data/worker.hpp"
#include "log/log_writer.hpp"
#include "runtime/server_pool.hpp"

using namespace smtplb;

namespace {

std::shared_ptr<const Config> config(const std::string& listeners) {
  const std::string text = R"(
[global]
hostname = "lb.test"
workers = 1
[admin]
socket = ""
listen = ""
[pool.p]
[[pool.p.server]]
name = "a"
address = "127.0.0.1"
port = 1
)" + listeners;
  ConfigLoad load = load_config_string(text, "test.toml");
  REQUIRE(load.ok());
  return load.config;
}

const std::string kMx = "[listener.mx]\naddress = \"127.0.0.1\"\nport = 0\npool = \"p\"\n";
const std::string kSubmission = "[listener.sub]\naddress = \"127.0.0.1\"\nport = 0\npool = \"p\"\n";

// What a reload does for its new listeners: bind them (one socket, one worker).
std::shared_ptr<Snapshot> next_snapshot(std::shared_ptr<const Config> cfg, const Snapshot& previous) {
  const ReloadPlan plan = plan_reload(*previous.config, *cfg);
  auto snap = build_snapshot(cfg, previous.generation + 1, &previous, &plan);
  for (auto& lr : snap->listeners) {
    const bool kept = std::any_of(previous.listeners.begin(), previous.listeners.end(),
                                  [&](const auto& ol) { return ol->state == lr->state; });
    std::string error;
    if (!kept) REQUIRE(bind_listener(*lr, 1, error));
  }
  return snap;
}

}  // namespace

TEST_CASE("worker: two snapshots published before it wakes are both applied, in order") {
  auto first = build_snapshot(config(kMx), 1);
  std::string error;
  REQUIRE(bind_listener(*first->listeners[0], 1, error));
  ControlLink link;
  LogWriter log_writer(1);
  Worker w(0, first, link, log_writer);
  REQUIRE(w.open_listeners(error));
  CHECK(w.listening() == std::vector<std::string>{"mx"});

  // Reload N adds a listener, reload N+1 keeps both; the worker wakes after both.
  auto n = next_snapshot(config(kMx + kSubmission), *first);
  auto n1 = next_snapshot(config(kMx + kSubmission), *n);
  w.publish(n);
  w.publish(n1);
  uv_run(w.loop(), UV_RUN_NOWAIT);
  // Only N carried the new listener's socket: it must have been adopted, and mx kept.
  CHECK(w.listening() == std::vector<std::string>{"mx", "sub"});
  const auto& sub_n = *n->listeners[1];
  REQUIRE(sub_n.cfg->name == "sub");
  CHECK(sub_n.fds == std::vector<int>{-1});
  w.request_stop();
  uv_run(w.loop(), UV_RUN_NOWAIT);
}

TEST_CASE("worker: a pool allocated where a removed pool was starts with fresh balancer state") {
  auto snap = build_snapshot(config(kMx), 1);
  ControlLink link;
  LogWriter log_writer(1);
  Worker w(0, snap, link, log_writer);

  // Two pools' states at the same address, one after the other (what the allocator may do).
  alignas(PoolState) static unsigned char storage[sizeof(PoolState)];
  auto at_storage = [] {
    return std::shared_ptr<PoolState>(new (storage) PoolState, [](PoolState* p) { p->~PoolState(); });
  };

  auto pool_with = [&](std::shared_ptr<PoolState> state, std::vector<uint32_t> weights) {
    auto pc = std::make_shared<PoolConfig>();
    pc->name = "p";
    for (size_t i = 0; i < weights.size(); ++i) {
      ServerConfig sc;
      sc.name = "s" + std::to_string(i);
      sc.weight = weights[i];
      pc->servers.push_back(sc);
    }
    PoolRuntime pr;
    pr.cfg = pc.get();
    pr.state = state;
    for (const auto& sc : pc->servers) {
      auto s = std::make_shared<ServerRuntime>(*pc, sc, state);
      s->health.store(Health::up);
      pr.servers.push_back(s);
    }
    return std::make_pair(pc, pr);
  };

  {
    auto [pc, pr] = pool_with(at_storage(), {3, 1});
    auto sel = w.pick(pr, {});
    REQUIRE(sel.index.has_value());
    CHECK(*sel.index == 0);
    pr.servers[*sel.index]->release();
  }
  // The first pool is gone; a new one with equal weights must begin at its first server,
  // as a fresh smooth round-robin does, not continue the old pool's sequence.
  auto [pc, pr] = pool_with(at_storage(), {1, 1});
  CHECK(pr.state.get() == reinterpret_cast<PoolState*>(storage));
  auto sel = w.pick(pr, {});
  REQUIRE(sel.index.has_value());
  CHECK(*sel.index == 0);
  pr.servers[*sel.index]->release();
  w.request_stop();
  uv_run(w.loop(), UV_RUN_NOWAIT);
}
