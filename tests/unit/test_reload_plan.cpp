// The one identity rule of a reload: which pools, servers and listeners stay the same.
#include <doctest/doctest.h>

#include <string>

#include "smtplb/config/reload_plan.hpp"

using namespace smtplb;

namespace {

std::shared_ptr<const Config> cfg(const std::string& body) {
  ConfigLoad load =
      load_config_string("[global]\nhostname = \"lb.test\"\n[admin]\nsocket = \"\"\nlisten = \"\"\n" + body, "t.toml");
  REQUIRE(load.ok());
  return load.config;
}

std::string listener(const std::string& name, int port) {
  return "[listener." + name + "]\naddress = \"127.0.0.1\"\nport = " + std::to_string(port) + "\npool = \"p\"\n";
}

std::string server(const std::string& pool, const std::string& name, const std::string& addr, int port,
                   const std::string& extra = "") {
  return "[[pool." + pool + ".server]]\nname = \"" + name + "\"\naddress = \"" + addr +
         "\"\nport = " + std::to_string(port) + "\n" + extra;
}

}  // namespace

TEST_CASE("reload plan: identical configs keep everything") {
  auto a = cfg(listener("mx", 2525) + "[pool.p]\n" + server("p", "s1", "192.0.2.1", 25) +
               server("p", "s2", "192.0.2.2", 25));
  auto plan = plan_reload(*a, *a);
  CHECK(plan.pools == std::vector<std::optional<size_t>>{0});
  CHECK(plan.servers[0] == std::vector<std::optional<size_t>>{0, 1});
  CHECK(plan.listeners == std::vector<std::optional<size_t>>{0});
  CHECK(plan.removed_servers.empty());
  CHECK(plan.removed_listeners.empty());
  CHECK(plan.added_servers() == 0);
  CHECK(plan.added_listeners() == 0);
}

TEST_CASE("reload plan: settings do not change identity, address and port do") {
  auto a = cfg(listener("mx", 2525) + "[pool.p]\n" + server("p", "s1", "192.0.2.1", 25) +
               server("p", "s2", "192.0.2.2", 25) + server("p", "s3", "192.0.2.3", 25));
  auto b = cfg(listener("mx", 2525) + "[pool.p]\nalgorithm = \"leastconn\"\n" +
               server("p", "s3", "192.0.2.3", 25, "weight = 7\nstate = \"drain\"\n") +  // reordered, new settings
               server("p", "s1", "192.0.2.9", 25) +                                     // moved: a new server
               server("p", "s2", "192.0.2.2", 2525));                                   // new port: new server
  auto plan = plan_reload(*a, *b);
  CHECK(plan.servers[0] == std::vector<std::optional<size_t>>{2, std::nullopt, std::nullopt});
  CHECK(plan.added_servers() == 2);
  CHECK(plan.removed_servers == std::vector<std::pair<size_t, size_t>>{{0, 0}, {0, 1}});
}

TEST_CASE("reload plan: pools by name, servers only within the same pool") {
  auto a = cfg(listener("mx", 2525) + "[pool.p]\n" + server("p", "s1", "192.0.2.1", 25) + "[pool.q]\n" +
               server("q", "s1", "192.0.2.1", 25));
  // Pool q leaves; pool r arrives with the same server name and address: still a new server.
  auto b = cfg(listener("mx", 2525) + "[pool.p]\n" + server("p", "s1", "192.0.2.1", 25) + "[pool.r]\n" +
               server("r", "s1", "192.0.2.1", 25));
  auto plan = plan_reload(*a, *b);
  REQUIRE(plan.pools.size() == 2);
  CHECK(plan.pools[0] == std::optional<size_t>(0));
  CHECK_FALSE(plan.pools[1].has_value());
  CHECK(plan.servers[1] == std::vector<std::optional<size_t>>{std::nullopt});
  CHECK(plan.removed_servers == std::vector<std::pair<size_t, size_t>>{{1, 0}});
}

TEST_CASE("reload plan: listeners by name, address and port") {
  auto a = cfg(listener("mx", 2525) + listener("sub", 2587) + listener("old", 2600) + "[pool.p]\n" +
               server("p", "s1", "192.0.2.1", 25));
  auto b = cfg(listener("mx", 2525) + listener("sub", 2588) + listener("new", 2601) + "[pool.p]\n" +
               server("p", "s1", "192.0.2.1", 25));
  auto plan = plan_reload(*a, *b);
  // Listeners are kept in name order: a = mx, old, sub; b = mx, new, sub.
  CHECK(plan.listeners == std::vector<std::optional<size_t>>{0, std::nullopt, std::nullopt});
  CHECK(plan.removed_listeners == std::vector<size_t>{1, 2});
  CHECK(plan.added_listeners() == 2);
}
