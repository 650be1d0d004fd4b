#include <doctest/doctest.h>

#include <arpa/inet.h>

#include <string>
#include <vector>

#include "smtplb/config/config.hpp"
#include "smtplb/config/resolve_plan.hpp"

using smtplb::apply_lookups;
using smtplb::ConfigLoad;
using smtplb::host_names;
using smtplb::HostLookup;
using smtplb::hosts_to_resolve;
using smtplb::load_config_string;
using smtplb::SocketAddress;

namespace {

// Two pools: a literal, a name used twice (with different ports), a second name.
const std::string kText =
    "[listener.mx]\n"                      // 1
    "address = \"127.0.0.1\"\n"            // 2
    "pool = \"a\"\n"                       // 3
    "[pool.a]\n"                           // 4
    "[[pool.a.server]]\n"                  // 5
    "name = \"lit\"\n"                     // 6
    "address = \"192.0.2.1\"\n"            // 7
    "[[pool.a.server]]\n"                  // 8
    "name = \"n1\"\n"                      // 9
    "address = \"mx1.example.net\"\n"      // 10
    "port = 2525\n"                        // 11
    "[pool.b]\n"                           // 12
    "[[pool.b.server]]\n"                  // 13
    "name = \"n2\"\n"                      // 14
    "address = \"mx2.example.net\"\n"      // 15
    "[[pool.b.server]]\n"                  // 16
    "name = \"n1\"\n"                      // 17
    "address    = \"mx1.example.net\"\n";  // 18

SocketAddress v4(const char* ip) {
  SocketAddress a;
  auto* sin = reinterpret_cast<sockaddr_in*>(&a.storage);
  sin->sin_family = AF_INET;
  inet_pton(AF_INET, ip, &sin->sin_addr);
  a.len = sizeof(sockaddr_in);
  return a;
}

HostLookup answer(const char* host, const char* ip) {
  return {host, true, v4(ip), "", {v4(ip)}};
}
HostLookup failure(const char* host, const char* why) {
  return {host, false, {}, why, {}};
}

}  // namespace

TEST_CASE("resolve plan: the distinct names, in file order") {
  ConfigLoad r = load_config_string(kText, "t.toml");
  REQUIRE(r.ok());
  CHECK(hosts_to_resolve(*r.config) == std::vector<std::string>{"mx1.example.net", "mx2.example.net"});
  // Literals only: nothing to wait for.
  ConfigLoad lit = load_config_string(kText.substr(0, kText.find("[[pool.a.server]]\nname = \"n1\"")) +
                                          "[pool.b]\n[[pool.b.server]]\nname = \"x\"\naddress = \"::1\"\n",
                                      "t.toml");
  REQUIRE(lit.ok());
  CHECK(hosts_to_resolve(*lit.config).empty());
}

TEST_CASE("resolve plan: answers fill every server naming the host, each with its port") {
  ConfigLoad r = load_config_string(kText, "t.toml");
  REQUIRE(r.ok());
  ConfigLoad done =
      apply_lookups(*r.config, {answer("mx2.example.net", "198.51.100.2"), answer("mx1.example.net", "198.51.100.1")});
  REQUIRE(done.ok());
  const auto& a = done.config->pools[0].servers;
  const auto& b = done.config->pools[1].servers;
  CHECK(a[0].addr.to_string() == "192.0.2.1:25");
  CHECK(a[1].addr.to_string() == "198.51.100.1:2525");
  CHECK(b[0].addr.to_string() == "198.51.100.2:25");
  CHECK(b[1].addr.to_string() == "198.51.100.1:25");
  for (const auto* s : {&a[1], &b[0], &b[1]}) CHECK_FALSE(s->needs_resolution);
  CHECK(a[1].address == "mx1.example.net");  // as written, for logs and identity
  CHECK(hosts_to_resolve(*done.config).empty());
  // The loaded Config is untouched (it is shared and immutable).
  CHECK(r.config->pools[0].servers[1].needs_resolution);
  CHECK(r.config->pools[0].servers[1].addr.len == 0);
}

TEST_CASE("resolve plan: a failed or missing answer is a warning, the server has no address yet") {
  ConfigLoad r = load_config_string(kText, "t.toml");
  REQUIRE(r.ok());
  ConfigLoad done = apply_lookups(
      *r.config, {failure("mx1.example.net", "unknown node or service"), answer("mx2.example.net", "198.51.100.2")});
  REQUIRE(done.ok());
  CHECK(done.errors.empty());
  REQUIRE(done.warnings.size() == 2);
  CHECK(done.warnings[0].to_string() ==
        "t.toml:10:11: cannot resolve 'mx1.example.net': unknown node or service; server a/n1 starts DOWN and the "
        "name is looked up again");
  CHECK(done.warnings[1].to_string().find("t.toml:18:14: cannot resolve 'mx1.example.net'") == 0);
  const auto& n1 = done.config->pools[0].servers[1];
  CHECK(n1.needs_resolution);
  CHECK(n1.host_name);
  CHECK(n1.addr.len == 0);
  CHECK(done.config->pools[1].servers[0].addr.to_string() == "198.51.100.2:25");
  // Still to resolve (retried), and among the names looked up again.
  CHECK(hosts_to_resolve(*done.config) == std::vector<std::string>{"mx1.example.net"});
  CHECK(host_names(*done.config) == std::vector<std::string>{"mx1.example.net", "mx2.example.net"});

  ConfigLoad missing = apply_lookups(*r.config, {answer("mx1.example.net", "198.51.100.1")});
  REQUIRE(missing.ok());
  REQUIRE(missing.warnings.size() == 1);
  CHECK(missing.warnings[0].line == 15);
  CHECK(missing.warnings[0].message.find("cannot resolve 'mx2.example.net': not looked up") == 0);
}

TEST_CASE("resolve plan: a reload keeps the running address of the same server, whatever the answer") {
  ConfigLoad r = load_config_string(kText, "t.toml");
  REQUIRE(r.ok());
  ConfigLoad running =
      apply_lookups(*r.config, {answer("mx1.example.net", "198.51.100.1"), answer("mx2.example.net", "198.51.100.2")});
  REQUIRE(running.ok());
  // A changed answer: kept (the control loop checks the new address before switching);
  // a failed one: kept, with a warning.
  ConfigLoad next = apply_lookups(
      *r.config, {answer("mx1.example.net", "203.0.113.9"), failure("mx2.example.net", "temporary failure")},
      running.config.get());
  REQUIRE(next.ok());
  CHECK(next.config->pools[0].servers[1].addr.to_string() == "198.51.100.1:2525");
  CHECK(next.config->pools[1].servers[1].addr.to_string() == "198.51.100.1:25");
  CHECK(next.config->pools[1].servers[0].addr.to_string() == "198.51.100.2:25");
  REQUIRE(next.warnings.size() == 1);
  CHECK(next.warnings[0].message ==
        "cannot resolve 'mx2.example.net': temporary failure; server b/n2 keeps its address 198.51.100.2:25");
  CHECK(hosts_to_resolve(*next.config).empty());

  // Another port, name or pool is another server: it takes the answer.
  std::string moved = kText;
  moved.replace(moved.find("port = 2525"), 11, "port = 2526");
  ConfigLoad m = load_config_string(moved, "t.toml");
  REQUIRE(m.ok());
  ConfigLoad after =
      apply_lookups(*m.config, {answer("mx1.example.net", "203.0.113.9"), answer("mx2.example.net", "198.51.100.2")},
                    running.config.get());
  REQUIRE(after.ok());
  CHECK(after.config->pools[0].servers[1].addr.to_string() == "203.0.113.9:2526");
  CHECK(after.config->pools[1].servers[1].addr.to_string() == "198.51.100.1:25");

  // A running server without an address (its name never resolved) takes the answer.
  ConfigLoad unresolved = apply_lookups(*r.config, {answer("mx2.example.net", "198.51.100.2")});
  ConfigLoad now =
      apply_lookups(*r.config, {answer("mx1.example.net", "203.0.113.9"), answer("mx2.example.net", "198.51.100.2")},
                    unresolved.config.get());
  CHECK(now.config->pools[0].servers[1].addr.to_string() == "203.0.113.9:2525");
  CHECK(now.warnings.empty());
}
