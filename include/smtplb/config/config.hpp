#pragma once
// The validated, immutable configuration. Loading reports every problem at once, each
// with file, line and column, and never yields a half-valid Config. Loading never looks
// a host name up: server addresses written as names are resolved afterwards.
#include <netinet/in.h>
#include <sys/socket.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "smtplb/config/duration.hpp"
#include "smtplb/edge/rate_limit.hpp"
#include "smtplb/lb/queue_weight.hpp"

namespace smtplb {

enum class LogLevel : uint8_t { trace, debug, info, warn, error };
enum class LogTarget : uint8_t { stderr_stream, syslog, file };
enum class LogFormat : uint8_t { text, json };
enum class Algorithm : uint8_t { roundrobin, leastconn, source };

const char* to_string(Algorithm a);
enum class Handoff : uint8_t { banner, connect };
// TLS in health checks: none, STARTTLS after EHLO, or implicit (port 465: a handshake
// before the greeting).
enum class CheckTls : uint8_t { none, starttls, implicit };
// Operator's intent for a server, separate from its health: drain takes no new sessions
// but keeps being checked; maint takes none and is not checked.
enum class AdminState : uint8_t { ready, drain, maint };

const char* to_string(AdminState s);

// PROXY protocol expected from clients (an upstream balancer) and sent to backends.
enum class ProxyIn : uint8_t { none, v1, v2, any };
enum class ProxyOut : uint8_t { none, v1, v2 };
// A denied client: "554 5.7.1 <hostname> Access denied" then close, or just close.
enum class DenyAction : uint8_t { reply, close };

struct GlobalConfig {
  std::string hostname;                   // default: the machine's host name
  unsigned workers = 0;                   // 0 = one per core
  unsigned max_connections = 20000;       // process-wide client sessions
  Millis shutdown_grace{30000};           // SIGTERM: how long relaying sessions may finish
  unsigned max_tracked_clients = 200000;  // client keys the per-client limits remember
  // How often server host names are looked up again; 0 = only at load and reload.
  Millis resolve_interval{30000};
};

struct LogConfig {
  LogLevel level = LogLevel::info;
  bool access_log = true;
  LogTarget target = LogTarget::stderr_stream;
  LogFormat format = LogFormat::text;
  std::string file;  // target = file
};

struct AdminConfig {
  // Unix socket with the full API (read and write), mode 0660. Empty: none.
  std::string socket = "/run/smtplb/admin.sock";
  bool socket_configured = false;  // written in the file: failing to bind it is fatal
  std::string listen;              // "host:port" read-only HTTP; empty: off
};

struct SocketAddress {
  // IPv4 or IPv6, all a TCP listener, client or server can be; not sockaddr_storage (128
  // bytes): a session holds two addresses, and those 200 bytes were a fifth of its memory.
  // The largest member first, so `{}` zeroes all of it.
  union Storage {
    sockaddr_in6 in6;
    sockaddr_in in;
    sockaddr sa;
  } storage{};
  socklen_t len = 0;
  const sockaddr* sa() const { return &storage.sa; }
  int family() const { return storage.sa.sa_family; }
  void set_family(int f) { storage.sa.sa_family = sa_family_t(f); }
  uint16_t port() const;
  void set_port(uint16_t port);
  std::string to_string() const;  // "1.2.3.4:25" or "[::1]:25"
  // The same address and port (and family): compares the bytes in use.
  bool same_as(const SocketAddress& o) const { return len == o.len && std::memcmp(&storage, &o.storage, len) == 0; }
};

// An address block such as 10.0.0.0/8 or 2001:db8::/32.
struct Cidr {
  int family = 0;            // AF_INET or AF_INET6
  unsigned char addr[16]{};  // network bytes (4 used for IPv4)
  unsigned prefix = 0;
  // IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) match IPv4 blocks.
  bool contains(const SocketAddress& a) const;
  std::string to_string() const;
};
// Parses "a.b.c.d/n", "x::y/n" or a bare address (a /32 or /128); false if malformed or
// if host bits are set (10.0.0.1/8 is almost always a typo).
bool parse_cidr(std::string_view text, Cidr& out);

struct ListenerConfig {
  std::string name;
  std::string address;  // as written
  uint16_t port = 25;   // 0 = any free port (tests); the bound port is logged
  SocketAddress bind;   // parsed: listeners take IP literals only
  std::string pool;
  unsigned max_connections = 10000;
  // listen() backlog: connections the kernel completes and queues until a worker accepts
  // them. 0 = net.core.somaxconn at bind time (the kernel caps any value at it anyway).
  unsigned backlog = 0;
  Millis client_idle_timeout{300000};
  ProxyIn proxy_protocol = ProxyIn::none;
  std::vector<Cidr> trusted_proxies;  // who may send a PROXY header
  // Edge defences, on the client's real address (a trusted PROXY header's source).
  std::vector<Cidr> allow;  // empty: every address
  std::vector<Cidr> deny;   // the longest matching block decides; deny wins a tie
  DenyAction deny_action = DenyAction::reply;
  unsigned max_connections_per_ip = 0;  // open sessions per client key; 0 = off
  RateSpec max_connection_rate_per_ip;  // new sessions per client key; count 0 = off
  unsigned client_prefix_v4 = 32;       // a client key is the address masked to these
  unsigned client_prefix_v6 = 64;
  std::vector<Cidr> limits_exempt;  // never limited
  bool limits_dry_run = false;      // count and log what would be refused, refuse nothing
  // An ACL or a per-client limit is on: the client's address matters.
  bool address_features() const {
    return !allow.empty() || !deny.empty() || max_connections_per_ip > 0 || max_connection_rate_per_ip.on();
  }
  bool limits() const { return max_connections_per_ip > 0 || max_connection_rate_per_ip.on(); }
};

struct HealthCheckConfig {
  Millis interval{2000};
  Millis timeout{10000};  // covers the whole dialogue
  unsigned rise = 2;
  unsigned fall = 3;
  std::string ehlo_name;          // resolved: global.hostname when empty
  CheckTls tls = CheckTls::none;  // starttls: STARTTLS + handshake + EHLO again; implicit: handshake first
  bool tls_verify = false;        // verify the certificate chain and name
  std::string tls_ca_file;        // empty: the system store
  std::string tls_server_name;    // SNI and name to verify; empty: the server's address
  // Agent feedback (HAProxy's agent-check): a TCP port on each server whose one-line
  // reply scales the weight and sets the agent's state. 0: off.
  uint16_t agent_port = 0;
  Millis agent_interval{0};  // 0: the same as interval
  Millis agent_timeout{2000};
  Millis agent_every() const { return agent_interval.count() ? agent_interval : interval; }
};

struct ServerConfig {
  std::string name;
  std::string address;  // as written
  uint16_t port = 25;
  // An IP literal is parsed at load; a host name is not looked up there (loading does no
  // DNS): needs_resolution says so, and the control loop fills `addr` off the loop
  // (include/smtplb/config/resolve_plan.hpp) before the configuration is used.
  SocketAddress addr;
  bool needs_resolution = false;
  // `address` is a host name (not an IP literal): looked up again every
  // global.resolve_interval. Stays true once `addr` is filled.
  bool host_name = false;
  uint32_t address_line = 0;  // where 'address' is written, for resolution errors
  uint32_t address_column = 0;
  unsigned weight = 1;           // 0..256; 0 = no new sessions
  unsigned max_connections = 0;  // 0 = unlimited
  bool backup = false;           // used only while no non-backup server is usable
  AdminState state = AdminState::ready;
};

struct PoolConfig {
  std::string name;
  Algorithm algorithm = Algorithm::roundrobin;
  Handoff handoff = Handoff::banner;
  unsigned retries = 3;  // further servers tried after a failed attempt
  Millis connect_timeout{5000};
  Millis banner_timeout{15000};
  Millis server_idle_timeout{300000};
  Millis queue_timeout{5000};  // wait for a slot when every usable server is full
  Millis slow_start{0};        // ramp a recovered server's weight over this time
  // algorithm = "source": the client key is its address masked to these, and a server
  // above hash_balance_factor percent of the average load passes keys on (0 = off).
  unsigned hash_prefix_v4 = 24;
  unsigned hash_prefix_v6 = 64;
  unsigned hash_balance_factor = 0;
  ProxyOut proxy_protocol = ProxyOut::none;  // header sent first on backend connections
  HealthCheckConfig health_check;
  std::vector<ServerConfig> servers;
};

struct Config {
  std::string path;
  GlobalConfig global;
  LogConfig log;
  AdminConfig admin;
  SocketAddress admin_listen;             // admin.listen parsed (an IP literal)
  std::vector<ListenerConfig> listeners;  // sorted by name
  std::vector<PoolConfig> pools;          // sorted by name

  const PoolConfig* find_pool(std::string_view name) const;
};

struct ConfigError {
  std::string file;
  uint32_t line = 0;  // 0: about the file as a whole (it cannot be read), no position
  uint32_t column = 0;
  std::string message;
  std::string to_string() const;  // "FILE:LINE:COL: message", or "FILE: message" at line 0
};

struct ConfigLoad {
  std::shared_ptr<const Config> config;  // null when errors is not empty
  std::vector<ConfigError> errors;
  // Not errors: the configuration is usable (a host name that does not resolve yet).
  std::vector<ConfigError> warnings;
  bool ok() const { return config != nullptr; }
};

// `smtplb agent`: its own small file (one [agent] and one [queue] table).
struct AgentConfig {
  std::string path;
  std::string address = "0.0.0.0";  // where the agent listens: an IP literal
  uint16_t port = 5555;             // the pool's health_check.agent_port; 0: any (tests)
  SocketAddress bind;
  std::string queue_directory = "/var/spool/postfix";
  Millis refresh{2000};  // how often the queue is counted
  QueueThresholds queue;
};

struct AgentConfigLoad {
  std::shared_ptr<const AgentConfig> config;  // null when errors is not empty
  std::vector<ConfigError> errors;
  bool ok() const { return config != nullptr; }
};
AgentConfigLoad load_agent_config_string(std::string_view text, const std::string& path);
AgentConfigLoad load_agent_config_file(const std::string& path);

// A file that cannot be read is one error at line 0 saying why (it does not exist, is a
// directory, permission denied for the user smtplb runs as, ...).
ConfigLoad load_config_file(const std::string& path);
// `path` only labels the errors.
ConfigLoad load_config_string(std::string_view text, const std::string& path);

}  // namespace smtplb
