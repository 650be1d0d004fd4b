#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "smtplb/config/config.hpp"

using smtplb::AdminState;
using smtplb::Algorithm;
using smtplb::ConfigError;
using smtplb::ConfigLoad;
using smtplb::DenyAction;
using smtplb::Handoff;
using smtplb::HealthCheckConfig;
using smtplb::ListenerConfig;
using smtplb::load_config_file;
using smtplb::load_config_string;
using smtplb::LogLevel;
using smtplb::Millis;
using smtplb::PoolConfig;

namespace {

// The smallest valid file; tests append to it or replace parts of it.
const std::string kListener =
    "[listener.mx]\n"
    "address = \"127.0.0.1\"\n"
    "pool = \"pf\"\n";
const std::string kPool =
    "[pool.pf]\n"
    "[[pool.pf.server]]\n"
    "name = \"a\"\n"
    "address = \"127.0.0.1\"\n";

ConfigLoad load(const std::string& text) {
  return load_config_string(text, "test.toml");
}

std::string dump(const ConfigLoad& r) {
  std::string s;
  for (const auto& e : r.errors) s += e.to_string() + "\n";
  return s;
}

// True when some error sits exactly at line:col and contains `text`.
bool has_error(const ConfigLoad& r, uint32_t line, uint32_t col, const std::string& text) {
  return std::any_of(r.errors.begin(), r.errors.end(), [&](const ConfigError& e) {
    return e.line == line && e.column == col && e.message.find(text) != std::string::npos;
  });
}

// Expects exactly one error, at line:col, containing `text`.
void expect_one_error(const std::string& toml, uint32_t line, uint32_t col, const std::string& text) {
  auto r = load(toml);
  INFO("config:\n" << toml << "errors:\n" << dump(r));
  CHECK_FALSE(r.ok());
  CHECK(r.config == nullptr);
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].file == "test.toml");
  CHECK(r.errors[0].line == line);
  CHECK(r.errors[0].column == col);
  CHECK(r.errors[0].message.find(text) != std::string::npos);
}

void expect_ok(const std::string& toml) {
  auto r = load(toml);
  INFO("config:\n" << toml << "errors:\n" << dump(r));
  CHECK(r.ok());
  CHECK(r.errors.empty());
}

}  // namespace

TEST_CASE("config: minimal file and its defaults") {
  auto r = load(kListener + kPool);
  INFO(dump(r));
  REQUIRE(r.ok());
  const auto& c = *r.config;
  CHECK(c.path == "test.toml");
  CHECK_FALSE(c.global.hostname.empty());  // the machine's host name
  CHECK(c.global.workers == 0);
  CHECK(c.global.max_connections == 20000);
  CHECK(c.global.resolve_interval == smtplb::Millis(30000));
  CHECK(c.log.level == LogLevel::info);
  CHECK(c.log.access_log);

  REQUIRE(c.listeners.size() == 1);
  const auto& l = c.listeners[0];
  CHECK(l.name == "mx");
  CHECK(l.address == "127.0.0.1");
  CHECK(l.port == 25);
  CHECK(l.bind.family() == AF_INET);
  CHECK(l.bind.port() == 25);
  CHECK(l.bind.to_string() == "127.0.0.1:25");
  CHECK(l.pool == "pf");
  CHECK(l.max_connections == 10000);
  CHECK(l.client_idle_timeout == Millis(300000));

  REQUIRE(c.pools.size() == 1);
  const auto& p = c.pools[0];
  CHECK(p.name == "pf");
  CHECK(c.find_pool("pf") == &p);
  CHECK(c.find_pool("nope") == nullptr);
  CHECK(p.algorithm == Algorithm::roundrobin);
  CHECK(p.handoff == Handoff::banner);
  CHECK(p.retries == 3);
  CHECK(p.connect_timeout == Millis(5000));
  CHECK(p.banner_timeout == Millis(15000));
  CHECK(p.server_idle_timeout == Millis(300000));
  CHECK(p.health_check.interval == Millis(2000));
  CHECK(p.health_check.timeout == Millis(10000));
  CHECK(p.health_check.rise == 2);
  CHECK(p.health_check.fall == 3);
  CHECK(p.health_check.ehlo_name == c.global.hostname);
  REQUIRE(p.servers.size() == 1);
  CHECK(p.servers[0].name == "a");
  CHECK(p.servers[0].port == 25);
  CHECK(p.servers[0].weight == 1);
  CHECK(p.servers[0].addr.to_string() == "127.0.0.1:25");
}

TEST_CASE("config: every supported key") {
  const std::string text = R"(# comment
[global]
hostname = "lb1.example.net"
workers = 4
max_connections = 500
resolve_interval = "5s"

[log]
level = "debug"
access_log = false
format = "text"
target = "stderr"
file = ""

[listener.submission]
address = "::"
port = 2587
pool = "relay"
max_connections = 100
client_idle_timeout = "1m30s"
proxy_protocol = "none"
trusted_proxies = []
max_connections_per_ip = 0
allow = []
deny = []

[listener.mx]
address = "127.0.0.1"
port = 0
pool = "postfix"

[pool.postfix]
algorithm = "leastconn"
handoff = "connect"
retries = 0
connect_timeout = "250ms"
banner_timeout = "1s"
server_idle_timeout = "10m"
proxy_protocol = "none"
slow_start = "0s"

[pool.postfix.health_check]
interval = "100ms"
timeout = "6500ms"
rise = 1
fall = 100
ehlo_name = "check.example.net"
starttls = false
tls_verify = false
tls_ca_file = ""
tls_server_name = ""

[[pool.postfix.server]]
name = "pf1"
address = "127.0.0.2"
port = 2525
weight = 256
max_connections = 0
backup = false
state = "ready"

[[pool.postfix.server]]
name = "pf2"
address = "localhost"
weight = 0

[pool.relay]
[[pool.relay.server]]
name = "r1"
address = "10.1.2.3"
port = 65535
)";
  auto r = load(text);
  INFO(dump(r));
  REQUIRE(r.ok());
  const auto& c = *r.config;
  CHECK(c.global.hostname == "lb1.example.net");
  CHECK(c.global.workers == 4);
  CHECK(c.global.max_connections == 500);
  CHECK(c.global.resolve_interval == smtplb::Millis(5000));
  CHECK(c.log.level == LogLevel::debug);
  CHECK_FALSE(c.log.access_log);

  // Sorted by name, whatever the order in the file.
  REQUIRE(c.listeners.size() == 2);
  CHECK(c.listeners[0].name == "mx");
  CHECK(c.listeners[0].port == 0);
  CHECK(c.listeners[0].pool == "postfix");
  const auto& sub = c.listeners[1];
  CHECK(sub.name == "submission");
  CHECK(sub.bind.family() == AF_INET6);
  CHECK(sub.bind.to_string() == "[::]:2587");
  CHECK(sub.port == 2587);
  CHECK(sub.max_connections == 100);
  CHECK(sub.client_idle_timeout == Millis(90000));

  REQUIRE(c.pools.size() == 2);
  CHECK(c.pools[0].name == "postfix");
  CHECK(c.pools[1].name == "relay");
  const auto& p = c.pools[0];
  CHECK(p.algorithm == Algorithm::leastconn);
  CHECK(p.handoff == Handoff::connect);
  CHECK(p.retries == 0);
  CHECK(p.connect_timeout == Millis(250));
  CHECK(p.banner_timeout == Millis(1000));
  CHECK(p.server_idle_timeout == Millis(600000));
  CHECK(p.health_check.interval == Millis(100));
  CHECK(p.health_check.timeout == Millis(6500));
  CHECK(p.health_check.rise == 1);
  CHECK(p.health_check.fall == 100);
  CHECK(p.health_check.ehlo_name == "check.example.net");
  REQUIRE(p.servers.size() == 2);
  CHECK(p.servers[0].name == "pf1");  // servers keep file order
  CHECK(p.servers[0].addr.to_string() == "127.0.0.2:2525");
  CHECK(p.servers[0].addr.port() == 2525);
  CHECK(p.servers[0].weight == 256);
  CHECK(p.servers[1].name == "pf2");
  CHECK(p.servers[1].address == "localhost");
  CHECK(p.servers[1].weight == 0);
  CHECK(p.servers[1].port == 25);
  // A host name is kept as a name: loading does no DNS. Its position is remembered for
  // a resolution error later.
  CHECK(p.servers[1].needs_resolution);
  CHECK(p.servers[1].addr.len == 0);
  CHECK(p.servers[1].address_line ==
        uint32_t(std::count(text.begin(), text.begin() + long(text.find("address = \"localhost\"")), '\n') + 1));
  CHECK(p.servers[1].address_column == 11);
  CHECK_FALSE(p.servers[0].needs_resolution);
  // The relay pool has no ehlo_name: it falls back to global.hostname.
  CHECK(c.pools[1].health_check.ehlo_name == "lb1.example.net");
  CHECK(c.pools[1].servers[0].addr.to_string() == "10.1.2.3:65535");
}

TEST_CASE("config: error to_string") {
  ConfigError e{"/etc/smtplb/smtplb.toml", 12, 7, "'port' must be an integer"};
  CHECK(e.to_string() == "/etc/smtplb/smtplb.toml:12:7: 'port' must be an integer");
  // Line 0: about the whole file, no position pretending to be a syntax error.
  ConfigError f{"/etc/smtplb/smtplb.toml", 0, 0, "the file does not exist"};
  CHECK(f.to_string() == "/etc/smtplb/smtplb.toml: the file does not exist");
}

TEST_CASE("config: TOML syntax errors point at the spot") {
  expect_one_error("[global]\nworkers = = 3\n" + kListener + kPool, 2, 11, "");
  expect_one_error("[global]\nresolve_interval = \"50ms\"\n" + kListener + kPool, 2, 20,
                   "'resolve_interval' must be 0s (only at load) or at least 100ms");
  CHECK(load("[global]\nresolve_interval = \"0s\"\n" + kListener + kPool).config->global.resolve_interval.count() == 0);
  expect_one_error(kListener + kPool + "[pool.pf\n", 8, 9, "");
  expect_one_error("[global]\nhostname = \"unterminated\n", 2, 25, "");
  // A key defined twice is a TOML error too.
  expect_one_error("[global]\nworkers = 1\nworkers = 2\n" + kListener + kPool, 3, 11, "");
}

TEST_CASE("config: an empty file accepts nothing") {
  expect_one_error("", 1, 1, "no [listener.NAME] section");
  expect_one_error("# only a comment\n", 1, 1, "no [listener.NAME] section");
}

TEST_CASE("config: unknown keys and sections") {
  expect_one_error("bogus = 1\n" + kListener + kPool, 1, 1, "unknown section or key 'bogus'");
  expect_one_error("[globals]\nworkers = 1\n" + kListener + kPool, 1, 2, "unknown section or key 'globals'");
  expect_one_error("[global]\nwokers = 1\n" + kListener + kPool, 2, 1, "unknown key 'wokers' in [global]");
  expect_one_error("[log]\nlevle = \"info\"\n" + kListener + kPool, 2, 1, "unknown key 'levle' in [log]");
  expect_one_error(kListener + "  adress = \"x\"\n" + kPool, 4, 3, "unknown key 'adress' in [listener.mx]");
  expect_one_error(kListener + kPool + "[pool.pf.health_check]\nintervall = \"1s\"\n", 9, 1,
                   "unknown key 'intervall' in [pool.pf.health_check]");
  expect_one_error(kListener + "[pool.pf]\nalgo = \"leastconn\"\n" + kPool.substr(10), 5, 1,
                   "unknown key 'algo' in [pool.pf]");
  expect_one_error(kListener + kPool + "wieght = 2\n", 8, 1, "unknown key 'wieght' in [[pool.pf.server]]");
}

TEST_CASE("config: unknown keys name the nearest valid key of their table") {
  // One edit: a letter missing, doubled, wrong, or two neighbours swapped.
  expect_one_error(kListener + "[pool.pf]\nbaner_timeout = \"5s\"\n" + kPool.substr(10), 5, 1,
                   "unknown key 'baner_timeout' in [pool.pf]; did you mean 'banner_timeout'?");
  expect_one_error("[global]\nwokers = 1\n" + kListener + kPool, 2, 1,
                   "unknown key 'wokers' in [global]; did you mean 'workers'?");
  expect_one_error("[log]\nlevle = \"info\"\n" + kListener + kPool, 2, 1,
                   "unknown key 'levle' in [log]; did you mean 'level'?");
  expect_one_error(kListener + "  adress = \"x\"\n" + kPool, 4, 3,
                   "unknown key 'adress' in [listener.mx]; did you mean 'address'?");
  expect_one_error(kListener + kPool + "wieght = 2\n", 8, 1,
                   "unknown key 'wieght' in [[pool.pf.server]]; did you mean 'weight'?");
  expect_one_error(kListener + kPool + "[pool.pf.health_check]\nintervall = \"1s\"\n", 9, 1,
                   "unknown key 'intervall' in [pool.pf.health_check]; did you mean 'interval'?");
  // Several edits in a long name.
  expect_one_error(kListener + "[pool.pf]\nconect_timout = \"5s\"\n" + kPool.substr(10), 5, 1,
                   "did you mean 'connect_timeout'?");
  // Only keys of that table: 'workers' is a [global] key, not a [log] one.
  auto r = load("[log]\nworkers = 1\n" + kListener + kPool);
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].message == "unknown key 'workers' in [log]");
  // Nothing near: no guess.
  r = load("[global]\ncolour = \"blue\"\n" + kListener + kPool);
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].message == "unknown key 'colour' in [global]");
  // A short name is not matched to an unrelated short key two edits away ('port', 'pool').
  r = load(kListener + "[pool.pf]\nport = 25\n" + kPool.substr(10));
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].message == "unknown key 'port' in [pool.pf]");
}

TEST_CASE("config: unknown sections name the nearest section") {
  expect_one_error("[globals]\nworkers = 1\n" + kListener + kPool, 1, 2,
                   "unknown section or key 'globals'; did you mean 'global'?");
  expect_one_error("[listeners.mx]\naddress = \"127.0.0.1\"\npool = \"pf\"\n" + kListener + kPool, 1, 2,
                   "unknown section or key 'listeners'; did you mean 'listener'?");
  auto r = load("bogus = 1\n" + kListener + kPool);
  REQUIRE(r.errors.size() == 1);
  CHECK(r.errors[0].message == "unknown section or key 'bogus'");
}

TEST_CASE("config: wrong types") {
  expect_one_error("[global]\nworkers = \"4\"\n" + kListener + kPool, 2, 11, "'workers' must be an integer");
  expect_one_error("[global]\nworkers = 1.5\n" + kListener + kPool, 2, 11, "'workers' must be an integer");
  expect_one_error("[global]\nhostname = 42\n" + kListener + kPool, 2, 12, "'hostname' must be a string");
  expect_one_error("[log]\naccess_log = \"yes\"\n" + kListener + kPool, 2, 14, "'access_log' must be true or false");
  expect_one_error("[log]\nlevel = \"verbose\"\n" + kListener + kPool, 2, 9,
                   "'level' must be one of: trace, debug, info, warn, error");
  expect_one_error("[log]\nlevel = 3\n" + kListener + kPool, 2, 9, "'level' must be one of");
  expect_one_error(kListener + "port = \"25\"\n" + kPool, 4, 8, "'port' must be an integer");
  expect_one_error(kListener + "client_idle_timeout = 300\n" + kPool, 4, 23,
                   "'client_idle_timeout' must be a duration string");
  expect_one_error(kListener + "[pool.pf]\nalgorithm = \"random\"\n" + kPool.substr(10), 5, 13,
                   "'algorithm' must be one of: roundrobin, leastconn");
  expect_one_error(kListener + "[pool.pf]\nhandoff = true\n" + kPool.substr(10), 5, 11,
                   "'handoff' must be one of: banner, connect");
  expect_one_error(kListener + kPool + "name2 = 1\n", 8, 1, "unknown key");
  expect_one_error(kListener + kPool + "port = \"2525\"\n", 8, 8, "'port' must be an integer");
  expect_one_error("global = 5\n" + kListener + kPool, 1, 10, "[global] must be a table");
  expect_one_error("log = []\n" + kListener + kPool, 1, 7, "[log] must be a table");
  expect_one_error(kListener + kPool + "[pool.pf.health_check]\nehlo_name = false\n", 9, 13,
                   "'ehlo_name' must be a string");
}

TEST_CASE("config: bad durations") {
  expect_one_error(kListener + "[pool.pf]\nconnect_timeout = \"5\"\n" + kPool.substr(10), 5, 19,
                   "'connect_timeout': bad duration \"5\"");
  expect_one_error(kListener + "[pool.pf]\nbanner_timeout = \"15 s\"\n" + kPool.substr(10), 5, 18,
                   "'banner_timeout': bad duration \"15 s\"");
  expect_one_error(kListener + "[pool.pf]\nserver_idle_timeout = \"30d\"\n" + kPool.substr(10), 5, 23,
                   "bad duration \"30d\"");
  expect_one_error(kListener + "[pool.pf]\nconnect_timeout = \"5ms\"\n" + kPool.substr(10), 5, 19,
                   "'connect_timeout' must be at least 10ms");
  expect_one_error(kListener + "client_idle_timeout = \"999ms\"\n" + kPool, 4, 23,
                   "'client_idle_timeout' must be at least 1s");
  expect_one_error(kListener + kPool + "[pool.pf.health_check]\ninterval = \"0s\"\n", 9, 12,
                   "'interval' must be at least 100ms");
  expect_one_error(kListener + kPool + "[pool.pf.health_check]\ntimeout = \"fast\"\n", 9, 11,
                   "'timeout': bad duration \"fast\"");
}

TEST_CASE("config: integers out of range") {
  expect_one_error("[global]\nworkers = 65\n" + kListener + kPool, 2, 11, "'workers' must be between 0 and 64, not 65");
  expect_one_error("[global]\nworkers = -1\n" + kListener + kPool, 2, 11, "between 0 and 64, not -1");
  expect_one_error("[global]\nmax_connections = 0\n" + kListener + kPool, 2, 19,
                   "'max_connections' must be between 1 and 1000000, not 0");
  expect_one_error(kListener + "port = 65536\n" + kPool, 4, 8, "'port' must be between 0 and 65535, not 65536");
  expect_one_error(kListener + "max_connections = 1000001\n" + kPool, 4, 19, "between 1 and 1000000");
  expect_one_error(kListener + "[pool.pf]\nretries = 17\n" + kPool.substr(10), 5, 11,
                   "'retries' must be between 0 and 16, not 17");
  expect_one_error(kListener + kPool + "weight = 257\n", 8, 10, "'weight' must be between 0 and 256, not 257");
  expect_one_error(kListener + kPool + "weight = -1\n", 8, 10, "'weight' must be between 0 and 256, not -1");
  expect_one_error(kListener + kPool + "port = 0\n", 8, 8, "'port' must be between 1 and 65535, not 0");
  expect_one_error(kListener + kPool + "[pool.pf.health_check]\nrise = 0\n", 9, 8,
                   "'rise' must be between 1 and 100, not 0");
  expect_one_error(kListener + kPool + "[pool.pf.health_check]\nfall = 101\n", 9, 8,
                   "'fall' must be between 1 and 100, not 101");
  expect_one_error("[global]\nworkers = 9223372036854775807\n" + kListener + kPool, 2, 11, "between 0 and 64");
}

TEST_CASE("config: names and strings") {
  expect_one_error("[global]\nhostname = \"\"\n" + kListener + kPool, 2, 12, "'hostname' must be a non-empty name");
  expect_one_error("[global]\nhostname = \"lb 1\"\n" + kListener + kPool, 2, 12, "without spaces");
  expect_one_error(kListener + kPool + "[pool.pf.health_check]\nehlo_name = \"a\\r\\nQUIT\"\n", 9, 13,
                   "'ehlo_name' must not contain spaces or line breaks");
  expect_one_error(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a/b\"\naddress = \"127.0.0.1\"\n", 6, 8,
                   "server name \"a/b\" must be 1 to 64 characters among letters, digits");
  expect_one_error(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"\"\naddress = \"127.0.0.1\"\n", 6, 8,
                   "server name \"\" must be 1 to 64 characters");
  auto r = load("[listener.\"m x\"]\naddress = \"127.0.0.1\"\npool = \"pf\"\n" + kPool);
  INFO(dump(r));
  CHECK(has_error(r, 1, 11, "listener name \"m x\" must be 1 to 64 characters"));
}

TEST_CASE("config: listener problems") {
  expect_one_error("[listener.mx]\naddress = \"127.0.0.1\"\n" + kPool, 1, 1, "[listener.mx] needs 'pool'");
  expect_one_error("[listener.mx]\npool = \"pf\"\n" + kPool, 1, 1, "[listener.mx] needs 'address'");
  expect_one_error("[listener.mx]\naddress = \"mail.example.net\"\npool = \"pf\"\n" + kPool, 2, 11,
                   "'mail.example.net' is not a valid IP address");
  expect_one_error("[listener.mx]\naddress = \"10.1\"\npool = \"pf\"\n" + kPool, 2, 11,
                   "'10.1' is not a valid IP address");
  expect_ok("[listener.mx]\naddress = \"::1\"\npool = \"pf\"\n" + kPool);
  expect_one_error("[listener.mx]\naddress = \"::1\"\npool = \"pf\"\nbacklog = -1\n" + kPool, 4, 11,
                   "'backlog' must be between 0 and 1048576");
  {
    auto r = load("[listener.mx]\naddress = \"::1\"\npool = \"pf\"\nbacklog = 65535\n" + kPool);
    REQUIRE(r.config);
    CHECK(r.config->listeners[0].backlog == 65535);
    r = load("[listener.mx]\naddress = \"::1\"\npool = \"pf\"\n" + kPool);
    REQUIRE(r.config);
    CHECK(r.config->listeners[0].backlog == 0);  // follow net.core.somaxconn
  }
  expect_one_error("[listener.mx]\naddress = \"127.0.0.1\"\npool = \"postfix\"\n" + kPool, 3, 8,
                   "listener 'mx' names pool 'postfix', which is not defined");
  // Found by fuzz_config: an empty name slipped past the check and the listener had no pool.
  expect_one_error("[listener.mx]\naddress = \"127.0.0.1\"\npool = \"\"\n" + kPool, 3, 8,
                   "listener 'mx' names pool '', which is not defined");
  expect_one_error("listener = 1\n" + kListener + kPool, 3, 1, "redefine");  // a TOML error
  expect_one_error("[[listener.mx]]\naddress = \"127.0.0.1\"\npool = \"pf\"\n" + kPool, 1, 1,
                   "[listener.mx] must be a table");
  expect_one_error(kListener + kPool + "[listener.mx2]\naddress = \"127.0.0.1\"\npool = \"pf\"\n", 8, 1,
                   "listener 'mx2' binds 127.0.0.1:25 like listener 'mx'");
  // Two listeners on port 0 each get their own free port: no conflict.
  expect_ok(kListener + "port = 0\n" + kPool + "[listener.mx2]\naddress = \"127.0.0.1\"\nport = 0\npool = \"pf\"\n");
  // Same port on different addresses is fine.
  expect_ok(kListener + kPool + "[listener.mx2]\naddress = \"127.0.0.2\"\npool = \"pf\"\n");
}

TEST_CASE("config: pool and server problems") {
  expect_one_error(kListener + "[pool.pf]\nretries = 1\n", 4, 1, "pool 'pf' has no [[pool.pf.server]]");
  expect_one_error(kListener + "[pool.pf]\nserver = \"a\"\n", 5, 10,
                   "servers are written as [[pool.pf.server]] tables");
  expect_one_error(kListener + "[pool.pf]\nserver = [1]\n", 5, 11, "each [[pool.pf.server]] must be a table");
  expect_one_error(kListener + "[pool.pf]\n[[pool.pf.server]]\naddress = \"127.0.0.1\"\n", 5, 1,
                   "a server in pool 'pf' needs 'name'");
  expect_one_error(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a\"\n", 5, 1,
                   "server 'a' in pool 'pf' needs 'address'");
  expect_one_error(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a\"\naddress = \"bad..host.invalid\"\n", 7, 11,
                   "'bad..host.invalid' is neither an IP address nor a valid host name");
  auto r = load(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a\"\naddress = 127\n");
  INFO(dump(r));
  CHECK(has_error(r, 7, 11, "'address' must be a string"));
  // Literal addresses are parsed strictly, never guessed by the resolver.
  expect_one_error(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a\"\naddress = \"10.1\"\n", 7, 11,
                   "'10.1' is not a valid IP address");
  expect_one_error(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a\"\naddress = \"256.1.2.3\"\n", 7, 11,
                   "'256.1.2.3' is not a valid IP address");
  auto v6 = load(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a\"\naddress = \"::1\"\nport = 2525\n");
  INFO(dump(v6));
  REQUIRE(v6.ok());
  CHECK(v6.config->pools[0].servers[0].addr.to_string() == "[::1]:2525");
  CHECK(v6.config->pools[0].servers[0].addr.family() == AF_INET6);
  expect_one_error(kListener + "[pool.pf]\nhealth_check = 5\n" + kPool.substr(10), 5, 16,
                   "[pool.pf.health_check] must be a table");
}

TEST_CASE("config: server host names are checked for form only, never looked up") {
  auto server = [](const std::string& address) {
    return kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a\"\naddress = \"" + address + "\"\nport = 2525\n";
  };
  // Names are kept (even ones no resolver knows): the control loop looks them up later.
  for (const char* name : {"mx1.example.net", "localhost", "mx1.example.net.", "no-such-host.invalid", "_smtp.x.y",
                           "a1-b2.c3", "0x7f000001"}) {
    auto r = load(server(name));
    INFO(name << "\n" << dump(r));
    REQUIRE(r.ok());
    const auto& s = r.config->pools[0].servers[0];
    CHECK(s.needs_resolution);
    CHECK(s.address == name);
    CHECK(s.addr.len == 0);
    CHECK(s.port == 2525);
    CHECK(s.address_line == 7);
    CHECK(s.address_column == 11);
  }
  // Literals are parsed at load and need nothing more.
  auto lit = load(server("192.0.2.7"));
  REQUIRE(lit.ok());
  CHECK_FALSE(lit.config->pools[0].servers[0].needs_resolution);
  CHECK(lit.config->pools[0].servers[0].addr.to_string() == "192.0.2.7:2525");
  // Malformed names never reach a resolver.
  const std::string long_label(64, 'a');
  std::string long_name;
  for (int i = 0; i < 64; ++i) long_name += "abc.";
  for (const std::string& bad :
       {std::string(""), std::string("mx 1.example.net"), std::string("a..b"), std::string(".a"), std::string("-a.b"),
        std::string("a-.b"), std::string("a/b"), std::string("a@b"), std::string("a\\tb"), long_label + ".net",
        long_name, std::string("a..")}) {
    auto r = load(server(bad));
    INFO("'" << bad << "'\n" << dump(r));
    CHECK_FALSE(r.ok());
    CHECK(has_error(r, 7, 11, "is neither an IP address nor a valid host name"));
  }
  // Numeric-looking text is a bad literal, not a name.
  expect_one_error(server("10.1"), 7, 11, "'10.1' is not a valid IP address");
  expect_one_error(server("1.2.3.4.5"), 7, 11, "'1.2.3.4.5' is not a valid IP address");
  // A NUL is refused before anything else.
  auto nul = load(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a\"\naddress = \"a\\u0000b\"\n");
  CHECK(has_error(nul, 7, 11, "must not contain a NUL"));
}

TEST_CASE("config: duplicate server names") {
  const std::string text = kListener + kPool +
                           "[[pool.pf.server]]\n"
                           "name = \"b\"\n"
                           "address = \"127.0.0.1\"\n"
                           "[[pool.pf.server]]\n"
                           "name = \"a\"\n"
                           "address = \"127.0.0.2\"\n";
  expect_one_error(text, 12, 8, "duplicate server name 'a' in pool 'pf'");
  // The same name in two pools is fine: servers are identified by (pool, name).
  expect_ok(kListener + kPool + "[pool.other]\n[[pool.other.server]]\nname = \"a\"\naddress = \"127.0.0.1\"\n");
}

TEST_CASE("config: edge defences: ACLs, per-client limits and the client table") {
  ConfigLoad load = load_config_string(kListener +
                                           "allow = [\"192.0.2.0/24\", \"2001:db8::/32\"]\n"
                                           "deny = [\"192.0.2.7\"]\n"
                                           "deny_action = \"close\"\n"
                                           "max_connections_per_ip = 10\n"
                                           "max_connection_rate_per_ip = \"30/1m\"\n"
                                           "client_prefix_v4 = 24\n"
                                           "client_prefix_v6 = 56\n"
                                           "limits_exempt = [\"198.51.100.0/24\"]\n"
                                           "limits_dry_run = true\n" +
                                           kPool + "[global]\nmax_tracked_clients = 5000\n",
                                       "t.toml");
  REQUIRE(load.ok());
  const ListenerConfig& l = load.config->listeners[0];
  CHECK(l.allow.size() == 2);
  CHECK(l.deny.size() == 1);
  CHECK(l.deny[0].prefix == 32);
  CHECK(l.deny_action == DenyAction::close);
  CHECK(l.max_connections_per_ip == 10);
  CHECK(l.max_connection_rate_per_ip.count == 30);
  CHECK(l.max_connection_rate_per_ip.period == Millis(60000));
  CHECK(l.client_prefix_v4 == 24);
  CHECK(l.client_prefix_v6 == 56);
  CHECK(l.limits_exempt.size() == 1);
  CHECK(l.limits_dry_run);
  CHECK(l.address_features());
  CHECK(load.config->global.max_tracked_clients == 5000);
  // Defaults: everything off.
  ConfigLoad plain = load_config_string(kListener + kPool, "t.toml");
  REQUIRE(plain.ok());
  CHECK_FALSE(plain.config->listeners[0].address_features());
  CHECK(plain.config->listeners[0].client_prefix_v6 == 64);
  CHECK(plain.config->global.max_tracked_clients == 200000);
  expect_ok(kListener + "max_connection_rate_per_ip = \"\"\n" + kPool);

  expect_one_error(kListener + "allow = [\"10.0.0.1/8\"]\n" + kPool, 4, 10, "(host bits must be zero)");
  expect_one_error(kListener + "deny = \"10.0.0.0/8\"\n" + kPool, 4, 8, "'deny' must be a list of address blocks");
  expect_one_error(kListener + "max_connection_rate_per_ip = \"30\"\n" + kPool, 4, 30, "COUNT/PERIOD");
  expect_one_error(kListener + "max_connection_rate_per_ip = \"30/100ms\"\n" + kPool, 4, 30, "from 1s to 1d");
  expect_one_error(kListener + "client_prefix_v4 = 33\n" + kPool, 4, 20, "client_prefix_v4");
  expect_one_error(kListener + "deny_action = \"drop\"\n" + kPool, 4, 15, "'deny_action' must be one of: reply, close");
  expect_one_error(kListener + kPool + "[global]\nmax_tracked_clients = 10\n", 9, 23, "max_tracked_clients");
}

TEST_CASE("config: all errors are reported in one run, sorted by position") {
  const std::string text = R"([global]
workers = 100
colour = "blue"

[listener.mx]
address = "127.0.0.1"
port = 2525
pool = "nope"
proxy_protocol = "v3"

[pool.pf]
connect_timeout = "5"
queue_timeout = "5"

[[pool.pf.server]]
name = "a"
address = "127.0.0.1"
weight = 300

[[pool.pf.server]]
name = "a"
address = "127.0.0.1"

[admin]
socket = "run/smtplb/admin.sock"
)";
  auto r = load(text);
  INFO(dump(r));
  CHECK_FALSE(r.ok());
  CHECK(r.config == nullptr);
  struct Want {
    uint32_t line, col;
    const char* text;
  };
  const std::vector<Want> want = {
      {2, 11, "'workers' must be between 0 and 64, not 100"},
      {3, 1, "unknown key 'colour' in [global]"},
      {8, 8, "listener 'mx' names pool 'nope', which is not defined"},
      {9, 18, "'proxy_protocol' must be one of: none, v1, v2, any"},
      {12, 19, "'connect_timeout': bad duration \"5\""},
      {13, 17, "'queue_timeout': bad duration \"5\""},
      {18, 10, "'weight' must be between 0 and 256, not 300"},
      {21, 8, "duplicate server name 'a' in pool 'pf'"},
      {25, 10, "admin.socket must be an absolute path"},
  };
  REQUIRE(r.errors.size() == want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    CAPTURE(i);
    CHECK(r.errors[i].file == "test.toml");
    CHECK(r.errors[i].line == want[i].line);
    CHECK(r.errors[i].column == want[i].col);
    CHECK(r.errors[i].message.find(want[i].text) != std::string::npos);
    CHECK(r.errors[i].to_string().starts_with("test.toml:" + std::to_string(want[i].line) + ":" +
                                              std::to_string(want[i].col) + ": "));
  }
}

TEST_CASE("config: errors in several listeners and pools at once") {
  const std::string text = R"([listener.a]
address = "127.0.0.1"
pool = "p"
port = -5

[listener.b]
address = "127.0.0.1"
pool = "q"
max_connections = 0

[pool.p]
retries = 99
[[pool.p.server]]
name = "s1"
address = "127.0.0.1"
weight = 1000

[pool.q]
algorithm = "fastest"
[pool.q.health_check]
rise = 0
fall = 0
[[pool.q.server]]
name = "s 1"
address = "127.0.0.1"
)";
  auto r = load(text);
  INFO(dump(r));
  CHECK(r.errors.size() == 9);
  CHECK(has_error(r, 4, 8, "'port' must be between 0 and 65535, not -5"));
  // Listener a keeps the default port 25 after its bad port, so b collides with it.
  CHECK(has_error(r, 6, 1, "listener 'b' binds 127.0.0.1:25 like listener 'a'"));
  CHECK(has_error(r, 24, 8, "server name \"s 1\" must be 1 to 64 characters"));
  CHECK(has_error(r, 9, 19, "'max_connections' must be between 1 and 1000000, not 0"));
  CHECK(has_error(r, 12, 11, "'retries' must be between 0 and 16, not 99"));
  CHECK(has_error(r, 16, 10, "'weight' must be between 0 and 256, not 1000"));
  CHECK(has_error(r, 19, 13, "'algorithm' must be one of"));
  CHECK(has_error(r, 21, 8, "'rise' must be between 1 and 100, not 0"));
  CHECK(has_error(r, 22, 8, "'fall' must be between 1 and 100, not 0"));
  // Sorted by line, then column.
  for (size_t i = 1; i < r.errors.size(); ++i) {
    const auto& a = r.errors[i - 1];
    const auto& b = r.errors[i];
    CHECK((a.line < b.line || (a.line == b.line && a.column <= b.column)));
  }
}

TEST_CASE("config: load_config_file") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("smtplb-unit-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const fs::path good = dir / "good.toml";
  const fs::path bad = dir / "bad.toml";
  {
    std::ofstream(good) << kListener << kPool;
    std::ofstream(bad) << kListener << kPool << "weight = \"heavy\"\n";
  }
  auto r = load_config_file(good.string());
  INFO(dump(r));
  CHECK(r.ok());
  CHECK(r.config->path == good.string());

  auto b = load_config_file(bad.string());
  REQUIRE(b.errors.size() == 1);
  CHECK(b.errors[0].to_string() == bad.string() + ":8:10: 'weight' must be an integer");

  // A file that cannot be read: one error about the file (line 0), saying why.
  auto missing = load_config_file((dir / "missing.toml").string());
  REQUIRE(missing.errors.size() == 1);
  CHECK(missing.config == nullptr);
  CHECK(missing.errors[0].line == 0);
  CHECK(missing.errors[0].to_string() == (dir / "missing.toml").string() + ": the file does not exist");

  auto directory = load_config_file(dir.string());
  REQUIRE(directory.errors.size() == 1);
  CHECK(directory.errors[0].to_string() == dir.string() + ": this is a directory, not a file");

  auto below_a_file = load_config_file((good / "x.toml").string());
  REQUIRE(below_a_file.errors.size() == 1);
  CHECK(below_a_file.errors[0].to_string() == (good / "x.toml").string() + ": cannot read the file: Not a directory");

  // Without read permission (root reads anyway: checked only where the mode refuses).
  const fs::path secret = dir / "secret.toml";
  std::ofstream(secret) << kListener << kPool;
  fs::permissions(secret, fs::perms::none);
  if (::access(secret.c_str(), R_OK) != 0) {
    auto denied = load_config_file(secret.string());
    REQUIRE(denied.errors.size() == 1);
    CHECK(denied.errors[0].line == 0);
    CHECK(denied.errors[0].message.rfind("cannot read the file: Permission denied (smtplb runs as user ", 0) == 0);
  } else {
    CHECK(load_config_file(secret.string()).ok());
  }
  fs::remove_all(dir);
}

TEST_CASE("config: a bad listener address hides no other error") {
  auto r = load("[listener.mx]\naddress = \"not-an-ip\"\npool = \"nope\"\n" + kPool);
  INFO(dump(r));
  CHECK(r.errors.size() == 2);
  CHECK(has_error(r, 2, 11, "'not-an-ip' is not a valid IP address"));
  CHECK(has_error(r, 3, 8, "listener 'mx' names pool 'nope', which is not defined"));
}

TEST_CASE("config: an empty server array is a pool without servers") {
  auto r = load(kListener + "[pool.pf]\nserver = []\n");
  INFO(dump(r));
  CHECK_FALSE(r.ok());
  CHECK(has_error(r, 5, 10, "pool 'pf' has no"));
}

TEST_CASE("config: listeners without a usable address get no bind conflict") {
  auto r = load("[listener.a]\npool = \"pf\"\n[listener.b]\npool = \"pf\"\n" + kPool);
  INFO(dump(r));
  CHECK(r.errors.size() == 2);
  CHECK(has_error(r, 1, 1, "[listener.a] needs 'address'"));
  CHECK(has_error(r, 3, 1, "[listener.b] needs 'address'"));

  auto bad =
      load("[listener.a]\naddress = \"x\"\npool = \"pf\"\n[listener.b]\naddress = \"y\"\npool = \"pf\"\n" + kPool);
  INFO(dump(bad));
  CHECK(bad.errors.size() == 2);
  CHECK(has_error(bad, 2, 11, "'x' is not a valid IP address"));
  CHECK(has_error(bad, 5, 11, "'y' is not a valid IP address"));
}

TEST_CASE("config: a required key of the wrong type is one error") {
  expect_one_error(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a\"\naddress = 127\n", 7, 11,
                   "'address' must be a string");
  expect_one_error("[listener.mx]\naddress = \"127.0.0.1\"\npool = 5\n" + kPool, 3, 8, "'pool' must be a string");
  expect_one_error(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = 7\naddress = \"127.0.0.1\"\n", 6, 8,
                   "'name' must be a string");
}

TEST_CASE("config: not-yet keys still check their type") {
  expect_one_error(kListener + kPool + "backup = 0\n", 8, 10, "backup");
  expect_one_error(kListener + kPool + "max_connections = false\n", 8, 19, "max_connections");
  expect_one_error(kListener + "max_connections_per_ip = 0.0\n" + kPool, 4, 26, "max_connections_per_ip");
}

TEST_CASE("config: listener and pool names refuse line breaks") {
  auto r = load("[listener.\"m\\nx\"]\naddress = \"127.0.0.1\"\npool = \"pf\"\n" + kPool);
  INFO(dump(r));
  CHECK_FALSE(r.ok());
  CHECK(has_error(r, 1, 11, "listener name"));
  auto p = load(
      "[listener.mx]\naddress = \"127.0.0.1\"\npool = \"p\\rq\"\n"
      "[pool.\"p\\rq\"]\n[[pool.\"p\\rq\".server]]\nname = \"a\"\naddress = \"127.0.0.1\"\n");
  INFO(dump(p));
  CHECK_FALSE(p.ok());
  CHECK(has_error(p, 4, 7, "pool name"));
}

TEST_CASE("config: an address with an embedded NUL is refused") {
  expect_one_error("[listener.mx]\naddress = \"127.0.0.1\\u0000x\"\npool = \"pf\"\n" + kPool, 2, 11, "");
  expect_one_error(kListener + "[pool.pf]\n[[pool.pf.server]]\nname = \"a\"\naddress = \"10.0.0.1\\u0000.evil\"\n", 7,
                   11, "");
}

TEST_CASE("config: failover keys (backup, limits, queue, slow start, admin state)") {
  auto r = load(kListener +
                "[pool.pf]\nqueue_timeout = \"250ms\"\nslow_start = \"30s\"\n"
                "[[pool.pf.server]]\nname = \"a\"\naddress = \"127.0.0.1\"\nmax_connections = 50\n"
                "backup = true\nstate = \"drain\"\n"
                "[[pool.pf.server]]\nname = \"b\"\naddress = \"127.0.0.1\"\nstate = \"maint\"\n");
  INFO(dump(r));
  REQUIRE(r.ok());
  const PoolConfig& p = r.config->pools.at(0);
  CHECK(p.queue_timeout == Millis(250));
  CHECK(p.slow_start == Millis(30000));
  CHECK(p.servers.at(0).max_connections == 50);
  CHECK(p.servers.at(0).backup);
  CHECK(p.servers.at(0).state == AdminState::drain);
  CHECK(p.servers.at(1).state == AdminState::maint);
  CHECK_FALSE(p.servers.at(1).backup);
  CHECK(p.servers.at(1).max_connections == 0);

  auto d = load(kListener + kPool);
  REQUIRE(d.ok());
  CHECK(d.config->pools.at(0).queue_timeout == Millis(5000));
  CHECK(d.config->pools.at(0).slow_start == Millis(0));
  CHECK(d.config->pools.at(0).servers.at(0).state == AdminState::ready);

  expect_one_error(kListener + kPool + "state = \"down\"\n", 8, 9, "'state' must be one of: ready, drain, maint");
  expect_one_error(kListener + kPool + "max_connections = -1\n", 8, 19, "'max_connections' must be between 0 and");
}

TEST_CASE("config: source affinity keys") {
  const std::string server = "[[pool.pf.server]]\nname = \"a\"\naddress = \"127.0.0.1\"\n";
  auto r = load(kListener +
                "[pool.pf]\nalgorithm = \"source\"\nhash_prefix_v4 = 16\nhash_prefix_v6 = 48\n"
                "hash_balance_factor = 150\n" +
                server);
  INFO(dump(r));
  REQUIRE(r.ok());
  const PoolConfig& p = r.config->pools.at(0);
  CHECK(p.algorithm == Algorithm::source);
  CHECK(p.hash_prefix_v4 == 16);
  CHECK(p.hash_prefix_v6 == 48);
  CHECK(p.hash_balance_factor == 150);
  CHECK(std::string(smtplb::to_string(p.algorithm)) == "source");

  auto d = load(kListener + kPool);
  REQUIRE(d.ok());
  CHECK(d.config->pools.at(0).hash_prefix_v4 == 24);
  CHECK(d.config->pools.at(0).hash_prefix_v6 == 64);
  CHECK(d.config->pools.at(0).hash_balance_factor == 0);
  expect_ok(kListener + "[pool.pf]\nhash_prefix_v4 = 0\nhash_prefix_v6 = 128\nhash_balance_factor = 0\n" + server);
  expect_ok(kListener + "[pool.pf]\nhash_prefix_v4 = 32\nhash_prefix_v6 = 0\nhash_balance_factor = 101\n" + server);

  expect_one_error(kListener + "[pool.pf]\nalgorithm = \"random\"\n" + server, 5, 13,
                   "'algorithm' must be one of: roundrobin, leastconn, source");
  expect_one_error(kListener + "[pool.pf]\nhash_prefix_v4 = 33\n" + server, 5, 18,
                   "'hash_prefix_v4' must be between 0 and 32, not 33");
  expect_one_error(kListener + "[pool.pf]\nhash_prefix_v6 = 129\n" + server, 5, 18,
                   "'hash_prefix_v6' must be between 0 and 128, not 129");
  expect_one_error(kListener + "[pool.pf]\nhash_prefix_v4 = \"24\"\n" + server, 5, 18,
                   "'hash_prefix_v4' must be an integer");
  expect_one_error(kListener + "[pool.pf]\nhash_balance_factor = 100\n" + server, 5, 23,
                   "'hash_balance_factor' must be 0 (off) or above 100");
  expect_one_error(kListener + "[pool.pf]\nhash_balance_factor = -5\n" + server, 5, 23,
                   "'hash_balance_factor' must be between 0 and 100000");
}

TEST_CASE("config: STARTTLS check keys") {
  auto r = load(kListener + kPool +
                "[pool.pf.health_check]\nstarttls = true\ntls_verify = true\n"
                "tls_server_name = \"mx.example.net\"\n");
  INFO(dump(r));
  REQUIRE(r.ok());
  const HealthCheckConfig& h = r.config->pools.at(0).health_check;
  CHECK(h.tls == smtplb::CheckTls::starttls);
  CHECK(h.tls_verify);
  CHECK(h.tls_server_name == "mx.example.net");
  CHECK(h.tls_ca_file.empty());
  expect_one_error(kListener + kPool + "[pool.pf.health_check]\ntls_verify = true\n", 9, 14,
                   "'tls_verify' has no effect without tls = \"starttls\" or \"implicit\"");
  expect_one_error(
      kListener + kPool + "[pool.pf.health_check]\nstarttls = true\ntls_ca_file = \"/nonexistent/ca.pem\"\n", 10, 15,
      "'tls_ca_file' \"/nonexistent/ca.pem\" cannot be read");
}

TEST_CASE("config: check TLS mode: tls = none, starttls or implicit, starttls = true as its alias") {
  const std::string hc = kListener + kPool + "[pool.pf.health_check]\n";
  auto mode = [&](const std::string& keys) {
    auto r = load(hc + keys);
    INFO(dump(r));
    REQUIRE(r.ok());
    return r.config->pools.at(0).health_check.tls;
  };
  CHECK(mode("") == smtplb::CheckTls::none);
  CHECK(mode("tls = \"implicit\"\ntls_verify = true\n") == smtplb::CheckTls::implicit);
  CHECK(mode("tls = \"starttls\"\n") == smtplb::CheckTls::starttls);
  CHECK(mode("tls = \"none\"\n") == smtplb::CheckTls::none);
  CHECK(mode("starttls = true\n") == smtplb::CheckTls::starttls);
  CHECK(mode("starttls = false\n") == smtplb::CheckTls::none);
  // Both, consistent: accepted.
  CHECK(mode("starttls = true\ntls = \"starttls\"\n") == smtplb::CheckTls::starttls);
  CHECK(mode("starttls = false\ntls = \"implicit\"\n") == smtplb::CheckTls::implicit);
  // Both, contradicting: an error at starttls.
  expect_one_error(hc + "tls = \"implicit\"\nstarttls = true\n", 10, 12,
                   "'starttls = true' contradicts tls = \"implicit\"; set tls alone");
  expect_one_error(hc + "starttls = false\ntls = \"starttls\"\n", 9, 12,
                   "'starttls = false' contradicts tls = \"starttls\"; set tls alone");
  expect_one_error(hc + "tls = \"465\"\n", 9, 7, "'tls' must be one of: none, starttls, implicit");
  expect_one_error(hc + "tls = \"none\"\ntls_server_name = \"x.example\"\n", 10, 19,
                   "'tls_server_name' has no effect without tls");
}

TEST_CASE("config: agent feedback keys") {
  const std::string hc = kListener + kPool + "[pool.pf.health_check]\ninterval = \"3s\"\n";
  auto r = load(hc);
  REQUIRE(r.ok());
  const HealthCheckConfig& off = r.config->pools.at(0).health_check;
  CHECK(off.agent_port == 0);
  CHECK(off.agent_every() == smtplb::Millis(3000));  // default: the check interval
  CHECK(off.agent_timeout == smtplb::Millis(2000));
  auto on = load(hc + "agent_port = 5555\nagent_interval = \"500ms\"\nagent_timeout = \"1s\"\n");
  INFO(dump(on));
  REQUIRE(on.ok());
  const HealthCheckConfig& h = on.config->pools.at(0).health_check;
  CHECK(h.agent_port == 5555);
  CHECK(h.agent_every() == smtplb::Millis(500));
  CHECK(h.agent_timeout == smtplb::Millis(1000));
  expect_one_error(hc + "agent_port = 70000\n", 10, 14, "'agent_port' must be between 0 and 65535");
  expect_one_error(hc + "agent_interval = \"10ms\"\n", 10, 18, "agent_interval");
}

TEST_CASE("config: PROXY protocol in and out") {
  auto r = load(
      "[listener.mx]\naddress = \"127.0.0.1\"\npool = \"pf\"\nproxy_protocol = \"any\"\n"
      "trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n"
      "[pool.pf]\nproxy_protocol = \"v2\"\n[[pool.pf.server]]\nname = \"a\"\naddress = \"127.0.0.1\"\n");
  INFO(dump(r));
  REQUIRE(r.ok());
  const auto& l = r.config->listeners.at(0);
  CHECK(l.proxy_protocol == smtplb::ProxyIn::any);
  REQUIRE(l.trusted_proxies.size() == 3);
  CHECK(l.trusted_proxies[0].to_string() == "10.0.0.0/8");
  CHECK(l.trusted_proxies[1].to_string() == "192.0.2.7/32");
  CHECK(l.trusted_proxies[2].to_string() == "2001:db8::/32");
  CHECK(r.config->pools.at(0).proxy_protocol == smtplb::ProxyOut::v2);

  expect_one_error(kListener + "proxy_protocol = \"v2\"\n" + kPool, 1, 1,
                   "[listener.mx] has proxy_protocol but no trusted_proxies");
  expect_one_error(kListener + "proxy_protocol = \"v2\"\ntrusted_proxies = []\n" + kPool, 5, 19,
                   "'trusted_proxies' is empty");
  expect_one_error(kListener + "trusted_proxies = [\"10.0.0.0/8\"]\n" + kPool, 4, 19,
                   "'trusted_proxies' has no effect without proxy_protocol");
  expect_one_error(kListener + "proxy_protocol = \"v1\"\ntrusted_proxies = [\"10.0.0.1/8\"]\n" + kPool, 5, 20,
                   "host bits must be zero");
  expect_one_error(kListener + "proxy_protocol = \"v1\"\ntrusted_proxies = [\"10.0.0.0/33\"]\n" + kPool, 5, 20,
                   "not an address block");
  expect_one_error(kListener + "proxy_protocol = \"v1\"\ntrusted_proxies = [7]\n" + kPool, 5, 20,
                   "not an address block");
  expect_one_error(kListener + "[pool.pf]\nproxy_protocol = \"any\"\n" + kPool.substr(10), 5, 18,
                   "'proxy_protocol' must be one of: none, v1, v2");
}

TEST_CASE("config: address blocks") {
  using smtplb::Cidr;
  using smtplb::parse_cidr;
  auto addr = [](const char* ip) {
    smtplb::SocketAddress a;
    if (inet_pton(AF_INET, ip, &reinterpret_cast<sockaddr_in*>(&a.storage)->sin_addr) == 1) {
      a.set_family(AF_INET);
    } else {
      REQUIRE(inet_pton(AF_INET6, ip, &reinterpret_cast<sockaddr_in6*>(&a.storage)->sin6_addr) == 1);
      a.set_family(AF_INET6);
    }
    return a;
  };
  Cidr c;
  REQUIRE(parse_cidr("10.0.0.0/8", c));
  CHECK(c.contains(addr("10.255.1.2")));
  CHECK_FALSE(c.contains(addr("11.0.0.1")));
  CHECK(c.contains(addr("::ffff:10.1.2.3")));  // IPv4-mapped
  CHECK_FALSE(c.contains(addr("2001:db8::1")));
  REQUIRE(parse_cidr("192.0.2.128/25", c));
  CHECK(c.contains(addr("192.0.2.200")));
  CHECK_FALSE(c.contains(addr("192.0.2.127")));
  REQUIRE(parse_cidr("0.0.0.0/0", c));
  CHECK(c.contains(addr("203.0.113.9")));
  REQUIRE(parse_cidr("2001:db8::/32", c));
  CHECK(c.contains(addr("2001:db8:ffff::1")));
  CHECK_FALSE(c.contains(addr("2001:db9::1")));
  CHECK_FALSE(c.contains(addr("10.0.0.1")));
  REQUIRE(parse_cidr("::1", c));
  CHECK(c.prefix == 128);
  CHECK(c.contains(addr("::1")));
  for (const char* bad : {"", "/8", "10.0.0.0/", "10.0.0.0/33", "10.0.0.0/08", "10.0.0.0/-1", "10.0.0.1/8", "10.0.0/8",
                          "2001:db8::/129", "2001:db8::1/32", "host.example/8", "10.0.0.0/8 "})
    CHECK_MESSAGE(!parse_cidr(bad, c), bad);
}

TEST_CASE("config: log targets and shutdown_grace") {
  auto r = load("[global]\nshutdown_grace = \"90s\"\n[log]\ntarget = \"file\"\nfile = \"/var/log/smtplb.log\"\n" +
                kListener + kPool);
  INFO(dump(r));
  REQUIRE(r.ok());
  CHECK(r.config->global.shutdown_grace == Millis(90000));
  CHECK(r.config->log.target == smtplb::LogTarget::file);
  CHECK(r.config->log.file == "/var/log/smtplb.log");
  auto d = load(kListener + kPool);
  REQUIRE(d.ok());
  CHECK(d.config->global.shutdown_grace == Millis(30000));
  CHECK(d.config->log.target == smtplb::LogTarget::stderr_stream);
  auto sys = load("[log]\ntarget = \"syslog\"\n" + kListener + kPool);
  REQUIRE(sys.ok());
  CHECK(sys.config->log.target == smtplb::LogTarget::syslog);
  expect_one_error("[log]\ntarget = \"file\"\n" + kListener + kPool, 1, 1, "log.target = \"file\" needs log.file");
  expect_one_error("[log]\nfile = \"/tmp/x.log\"\n" + kListener + kPool, 2, 8, "log.file has no effect");
  expect_one_error("[log]\ntarget = \"file\"\nfile = \"x.log\"\n" + kListener + kPool, 3, 8, "absolute path");
  expect_one_error("[log]\ntarget = \"journal\"\n" + kListener + kPool, 2, 10,
                   "'target' must be one of: stderr, syslog, file");
  expect_one_error("[global]\nshutdown_grace = \"soon\"\n" + kListener + kPool, 2, 18, "bad duration");
}

TEST_CASE("config: admin endpoints and JSON logs") {
  auto d = load(kListener + kPool);
  REQUIRE(d.ok());
  CHECK(d.config->admin.socket == "/run/smtplb/admin.sock");
  CHECK_FALSE(d.config->admin.socket_configured);
  CHECK(d.config->admin.listen.empty());
  CHECK(d.config->log.format == smtplb::LogFormat::text);

  auto r = load("[admin]\nsocket = \"/tmp/x.sock\"\nlisten = \"127.0.0.1:9925\"\n[log]\nformat = \"json\"\n" +
                kListener + kPool);
  INFO(dump(r));
  REQUIRE(r.ok());
  CHECK(r.config->admin.socket == "/tmp/x.sock");
  CHECK(r.config->admin.socket_configured);
  CHECK(r.config->admin.listen == "127.0.0.1:9925");
  CHECK(r.config->admin_listen.to_string() == "127.0.0.1:9925");
  CHECK(r.config->log.format == smtplb::LogFormat::json);

  auto v6 = load("[admin]\nlisten = \"[::1]:9925\"\n" + kListener + kPool);
  REQUIRE(v6.ok());
  CHECK(v6.config->admin_listen.to_string() == "[::1]:9925");
  auto off = load("[admin]\nsocket = \"\"\n" + kListener + kPool);
  REQUIRE(off.ok());
  CHECK(off.config->admin.socket.empty());

  expect_one_error("[admin]\nlisten = \"9925\"\n" + kListener + kPool, 2, 10, "admin.listen must be");
  expect_one_error("[admin]\nlisten = \"host.example:9925\"\n" + kListener + kPool, 2, 10, "not a valid IP address");
  expect_one_error("[admin]\nlisten = \"127.0.0.1:99999\"\n" + kListener + kPool, 2, 10, "admin.listen must be");
  expect_one_error("[admin]\nsocket = \"rel.sock\"\n" + kListener + kPool, 2, 10, "absolute path");
  expect_one_error("[admin]\nport = 1\n" + kListener + kPool, 2, 1, "unknown key 'port' in [admin]");
  expect_one_error("[log]\nformat = \"xml\"\n" + kListener + kPool, 2, 10, "'format' must be one of: text, json");
}
