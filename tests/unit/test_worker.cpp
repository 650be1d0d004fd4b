// A worker driven by hand on the test thread (its thread is never started): snapshots
// published back to back, and per-pool balancer state across pools that come and go.
#include <doctest/doctest.h>

#include <uv.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <new>
#include <string>

#include "data/listener.hpp"
#include "data/worker.hpp"
#include "log/log_writer.hpp"
#include "runtime/server_pool.hpp"
#include "smtplb/session/session_core.hpp"

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
  for (const auto& e : load.errors) MESSAGE(e.to_string());
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

// A session core on a worker: it picks and queues through the real Worker and server
// slots, and stands for the sockets (connect, close) as the data path does.
struct QueueProbe : SessionCore {
  QueueProbe(Worker& worker, const ListenerConfig& l, const PoolRuntime& p)
      : SessionCore(l, *p.cfg), w(worker), pool(p) {}
  Worker& w;
  const PoolRuntime& pool;
  std::function<void()> before_enqueue;  // runs once, between the pick and the enqueue
  std::optional<uint32_t> connected_to;
  std::optional<uint32_t> open;  // the server whose slot this session holds
  bool refused_ = false;

 protected:
  Selection pick(std::span<const uint32_t> tried) override { return w.pick(pool, tried); }
  void enqueue() override {
    if (before_enqueue) std::exchange(before_enqueue, nullptr)();
    w.enqueue(this, pool.state);
  }
  void dequeue() override { w.dequeue(this, *pool.state); }
  int connect(uint32_t server) override {
    connected_to = open = server;
    return 0;
  }
  void close_server() override {
    if (!open) return;
    ServerRuntime& s = *pool.servers[*open];
    open.reset();
    if (s.release()) w.slot_freed(*pool.state);  // as Session::close_server does
  }
  int send(Side, std::string_view, bool) override { return kSent; }
  void shutdown(Side) override {}
  void read(Side, bool, bool) override {}
  void delay_acks(Side) override {}
  void arm_timer(uint64_t) override {}
  SocketAddress local_address() override { return {}; }
  std::string_view hostname() const override { return "lb.test"; }
  void attempt_failed(uint32_t, ConnError, const std::string&, bool) override {}
  void handed_off(uint32_t) override {}
  void refused(TermCode) override { refused_ = true; }
  void proxy_refused(const std::string&) override {}
  void finished() override {}
};

const std::string kOneSlot = R"(
[pool.q]
queue_timeout = "2s"
[[pool.q.server]]
name = "only"
address = "127.0.0.1"
port = 1
max_connections = 1
)";

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

TEST_CASE("worker: a slot freed on another worker between a session's pick and its enqueue is not lost") {
  // The exact interleaving of the lost wake-up: A (worker 0) finds the only slot taken;
  // B (worker 1) releases it while `queued` is still 0, so it wakes nobody; then A
  // enqueues. A must take the slot at once, not wait out queue_timeout next to it.
  auto snap = build_snapshot(config(kMx + kOneSlot), 1);
  const PoolRuntime& pool = snap->pools[1];
  REQUIRE(pool.cfg->name == "q");
  pool.servers[0]->health.store(Health::up);
  ControlLink link;
  LogWriter log_writer(2);
  Worker w0(0, snap, link, log_writer), w1(1, snap, link, log_writer);
  w0.set_peers({&w0, &w1});
  w1.set_peers({&w0, &w1});
  ListenerConfig lc;
  lc.name = "mx";

  QueueProbe b(w1, lc, pool);
  b.start(0, SocketAddress{});
  REQUIRE(b.connected_to == 0u);

  QueueProbe a(w0, lc, pool);
  a.before_enqueue = [&] {
    b.kill(1);  // B's session ends: its slot is released
    CHECK(pool.state->queued.load() == 0);
  };
  a.start(1, SocketAddress{});
  CHECK_FALSE(a.queued());
  CHECK(a.connected_to == 0u);
  CHECK(pool.servers[0]->active.load() == 1);

  // The other order: A waits first; B's release then wakes A's worker.
  QueueProbe c(w1, lc, pool);
  c.start(2, SocketAddress{});
  REQUIRE(c.queued());
  CHECK(pool.state->queued.load() == 1);
  a.kill(3);  // released on worker 0; the waiter is on worker 1
  CHECK(c.queued());
  uv_run(w1.loop(), UV_RUN_NOWAIT);  // worker 1 wakes and serves its queue
  CHECK_FALSE(c.queued());
  CHECK(c.connected_to == 0u);
  CHECK_FALSE(c.refused_);
  c.kill(4);
  CHECK(pool.servers[0]->active.load() == 0);
  w0.request_stop();
  w1.request_stop();
  uv_run(w0.loop(), UV_RUN_NOWAIT);
  uv_run(w1.loop(), UV_RUN_NOWAIT);
}

TEST_CASE("snapshot: a source pool keeps its table while names, weights and backup flags stay") {
  auto source_config = [](const std::string& servers, const std::string& extra) {
    const std::string text = "[global]\nhostname = \"lb.test\"\n[admin]\nsocket = \"\"\nlisten = \"\"\n" + kMx +
                             "[pool.p]\nalgorithm = \"source\"\n" + extra + servers;
    ConfigLoad load = load_config_string(text, "test.toml");
    for (const auto& e : load.errors) MESSAGE(e.to_string());
    REQUIRE(load.ok());
    return load.config;
  };
  auto server = [](const std::string& name, int port, const std::string& extra = "") {
    return "[[pool.p.server]]\nname = \"" + name + "\"\naddress = \"127.0.0.1\"\nport = " + std::to_string(port) +
           "\n" + extra;
  };
  const std::string two = server("a", 1) + server("b", 2);
  auto reload = [](const Snapshot& prev, std::shared_ptr<const Config> cfg) {
    const ReloadPlan plan = plan_reload(*prev.config, *cfg);
    return build_snapshot(cfg, prev.generation + 1, &prev, &plan);
  };
  auto first = build_snapshot(source_config(two, ""), 1);
  REQUIRE(first->pools[0].source);
  // Other settings, another port: the same table object.
  auto same = reload(*first, source_config(server("a", 1) + server("b", 3), "retries = 1\n"));
  CHECK(same->pools[0].source == first->pools[0].source);
  // A weight, a backup flag, a new server or a new order: a new table.
  CHECK(reload(*first, source_config(server("a", 1, "weight = 2\n") + server("b", 2), ""))->pools[0].source !=
        first->pools[0].source);
  CHECK(reload(*first, source_config(server("a", 1) + server("b", 2, "backup = true\n"), ""))->pools[0].source !=
        first->pools[0].source);
  CHECK(reload(*first, source_config(two + server("c", 4), ""))->pools[0].source != first->pools[0].source);
  CHECK(reload(*first, source_config(server("b", 2) + server("a", 1), ""))->pools[0].source != first->pools[0].source);
}
