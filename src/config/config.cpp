#include "smtplb/config/config.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <toml++/toml.h>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <map>
#include <set>

#include "smtplb/proto/smtp_reply.hpp"

namespace smtplb {

uint16_t SocketAddress::port() const {
  if (family() == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&storage)->sin_port);
  if (family() == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_port);
  return 0;
}

void SocketAddress::set_port(uint16_t p) {
  if (family() == AF_INET) reinterpret_cast<sockaddr_in*>(&storage)->sin_port = htons(p);
  if (family() == AF_INET6) reinterpret_cast<sockaddr_in6*>(&storage)->sin6_port = htons(p);
}

std::string SocketAddress::to_string() const {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (family() == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr, buf, sizeof buf);
    return std::string(buf) + ":" + std::to_string(port());
  }
  if (family() == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_addr, buf, sizeof buf);
    return "[" + std::string(buf) + "]:" + std::to_string(port());
  }
  return "?";
}

bool Cidr::contains(const SocketAddress& a) const {
  const unsigned char* bytes;
  unsigned char mapped[4];
  if (a.family() == AF_INET) {
    bytes = reinterpret_cast<const unsigned char*>(&reinterpret_cast<const sockaddr_in*>(&a.storage)->sin_addr);
    if (family != AF_INET) return false;
  } else if (a.family() == AF_INET6) {
    bytes = reinterpret_cast<const unsigned char*>(&reinterpret_cast<const sockaddr_in6*>(&a.storage)->sin6_addr);
    static const unsigned char kMappedPrefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (family == AF_INET) {
      if (std::memcmp(bytes, kMappedPrefix, 12) != 0) return false;
      std::memcpy(mapped, bytes + 12, 4);
      bytes = mapped;
    }
  } else {
    return false;
  }
  unsigned bits = prefix;
  for (size_t i = 0; bits > 0; ++i) {
    const unsigned take = bits >= 8 ? 8 : bits;
    const unsigned char mask = static_cast<unsigned char>(0xff << (8 - take));
    if ((bytes[i] & mask) != (addr[i] & mask)) return false;
    bits -= take;
  }
  return true;
}

std::string Cidr::to_string() const {
  char buf[INET6_ADDRSTRLEN] = "?";
  inet_ntop(family, addr, buf, sizeof buf);
  return std::string(buf) + "/" + std::to_string(prefix);
}

bool parse_cidr(std::string_view text, Cidr& out) {
  const size_t slash = text.find('/');
  const std::string ip(text.substr(0, slash));
  if (ip.empty() || ip.find('\0') != std::string::npos) return false;
  out = Cidr{};
  if (inet_pton(AF_INET, ip.c_str(), out.addr) == 1)
    out.family = AF_INET;
  else if (inet_pton(AF_INET6, ip.c_str(), out.addr) == 1)
    out.family = AF_INET6;
  else
    return false;
  const unsigned max = out.family == AF_INET ? 32 : 128;
  out.prefix = max;
  if (slash != std::string_view::npos) {
    std::string_view p = text.substr(slash + 1);
    if (p.empty() || p.size() > 3 || (p.size() > 1 && p[0] == '0')) return false;
    unsigned v = 0;
    for (char c : p) {
      if (c < '0' || c > '9') return false;
      v = v * 10 + unsigned(c - '0');
    }
    if (v > max) return false;
    out.prefix = v;
  }
  // Host bits must be zero.
  for (unsigned bit = out.prefix; bit < max; ++bit)
    if (out.addr[bit / 8] & (0x80 >> (bit % 8))) return false;
  return true;
}

const char* to_string(Algorithm a) {
  switch (a) {
    case Algorithm::roundrobin:
      return "roundrobin";
    case Algorithm::leastconn:
      return "leastconn";
    case Algorithm::source:
      return "source";
  }
  return "?";
}

const char* to_string(AdminState s) {
  switch (s) {
    case AdminState::ready:
      return "ready";
    case AdminState::drain:
      return "drain";
    case AdminState::maint:
      return "maint";
  }
  return "?";
}

const PoolConfig* Config::find_pool(std::string_view name) const {
  for (const auto& p : pools)
    if (p.name == name) return &p;
  return nullptr;
}

std::string ConfigError::to_string() const {
  if (line == 0) return file + ": " + message;
  return file + ":" + std::to_string(line) + ":" + std::to_string(column) + ": " + message;
}

namespace {

// Names of listeners, pools and servers end up in logs and metric labels: keep them to
// a conservative character set.
bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
          c == '.' || c == ':'))
      return false;
  return true;
}
constexpr const char* kNameRule = "1 to 64 characters among letters, digits, '_', '-', '.' and ':'";

// A DNS name as resolvers take it: dot-separated labels of 1 to 63 letters, digits, '-'
// (not first or last) or '_' (service-style names), 253 characters at most, and an
// optional final dot. Spaces, control characters, empty labels ("a..b") never reach a
// resolver.
bool valid_host_name(std::string_view name) {
  if (!name.empty() && name.back() == '.') name.remove_suffix(1);
  if (name.empty() || name.size() > 253) return false;
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('.', start);
    if (end == std::string_view::npos) end = name.size();
    const std::string_view label = name.substr(start, end - start);
    if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-') return false;
    for (char c : label)
      if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
        return false;
    start = end + 1;
  }
  return true;
}
constexpr const char* kHostRule = "labels of letters, digits, '-' and '_' separated by dots";

// Edit distance between two names (optimal string alignment: insertions, deletions,
// substitutions and swaps of two neighbours cost 1 each), for "did you mean" hints.
size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

// "; did you mean 'KEY'?" naming the known key nearest to `name` (the first in `known`'s
// order on a tie), or "" when none is near: one edit for names up to 5 characters, two up
// to 9, three beyond, so that a short name is not matched to an unrelated short key.
template <typename Names>
std::string did_you_mean(std::string_view name, const Names& known) {
  const size_t limit = name.size() <= 5 ? 1 : name.size() <= 9 ? 2 : 3;
  std::string_view best;
  size_t best_distance = limit + 1;
  for (std::string_view k : known) {
    const size_t dist = edit_distance(name, k);
    if (dist < best_distance) {
      best = k;
      best_distance = dist;
    }
  }
  if (best.empty()) return "";
  return "; did you mean '" + std::string(best) + "'?";
}

// Parses and validates one document, collecting every error instead of stopping at the
// first, so an operator fixes a file in one pass.
class Loader {
 public:
  explicit Loader(std::string file) : file_(std::move(file)) {}

  ConfigLoad run(std::string_view text);
  AgentConfigLoad run_agent(std::string_view text);

 private:
  // Handles one key of a table; the node is the key's value.
  using KeyHandler = std::function<void(const toml::node&)>;
  struct Key {
    const char* name;
    KeyHandler handle;
  };

  void error(const toml::source_region& where, std::string msg) {
    errors_.push_back({file_, where.begin.line, where.begin.column, std::move(msg)});
  }
  void error(const toml::node& n, std::string msg) { error(n.source(), std::move(msg)); }

  void table_keys(const toml::table& t, const std::string& section, const std::vector<Key>& keys);

  std::optional<std::string> str(const toml::node& n, std::string_view key);
  std::optional<int64_t> integer(const toml::node& n, std::string_view key, int64_t lo, int64_t hi);
  std::optional<bool> boolean(const toml::node& n, std::string_view key);
  // A list of address blocks ("10.0.0.0/8", "2001:db8::/32", or a bare address).
  void cidr_list(const toml::node& v, std::string_view key, std::vector<Cidr>& out);
  std::optional<Millis> duration(const toml::node& n, std::string_view key, Millis lo);
  template <typename E>
  std::optional<E> choice(const toml::node& n, std::string_view key,
                          std::initializer_list<std::pair<const char*, E>> values);

  void parse_global(const toml::node& n, Config& c);
  void parse_log(const toml::node& n, Config& c);
  void parse_admin(const toml::node& n, Config& c);
  void check_log(const toml::node& n, const Config& c);
  void parse_listener(const std::string& name, const toml::node& n, Config& c);
  void parse_pool(const std::string& name, const toml::node& n, Config& c);
  void parse_health_check(const toml::node& n, PoolConfig& p);
  void parse_server(const toml::node& n, PoolConfig& p, std::set<std::string>& names);

  // Parses an IP literal into `out`. With `is_name` (server addresses) a host name is
  // accepted too, checked for its form only, and *is_name set: loading does no DNS.
  bool address(const toml::node& where, const std::string& host, uint16_t port, bool numeric_only, SocketAddress& out,
               bool* is_name = nullptr);

  std::string file_;
  std::vector<ConfigError> errors_;
  std::map<std::string, toml::source_region> listener_pool_refs_;
  std::map<std::string, toml::source_region> listener_sources_;
};

void Loader::table_keys(const toml::table& t, const std::string& section, const std::vector<Key>& keys) {
  for (auto&& [k, v] : t) {
    const std::string_view name = k.str();
    auto it = std::find_if(keys.begin(), keys.end(), [name](const Key& key) { return name == key.name; });
    if (it == keys.end()) {
      std::vector<std::string_view> known;
      for (const Key& key : keys) known.emplace_back(key.name);
      error(k.source().begin.line ? k.source() : v.source(),
            "unknown key '" + std::string(k.str()) + "' in [" + section + "]" + did_you_mean(name, known));
      continue;
    }
    it->handle(v);
  }
}

std::optional<std::string> Loader::str(const toml::node& n, std::string_view key) {
  if (auto s = n.as_string()) return s->get();
  error(n, "'" + std::string(key) + "' must be a string");
  return std::nullopt;
}

std::optional<int64_t> Loader::integer(const toml::node& n, std::string_view key, int64_t lo, int64_t hi) {
  auto i = n.as_integer();
  if (!i) {
    error(n, "'" + std::string(key) + "' must be an integer");
    return std::nullopt;
  }
  if (i->get() < lo || i->get() > hi) {
    error(n, "'" + std::string(key) + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi) +
                 ", not " + std::to_string(i->get()));
    return std::nullopt;
  }
  return i->get();
}

void Loader::cidr_list(const toml::node& v, std::string_view key, std::vector<Cidr>& out) {
  auto arr = v.as_array();
  if (!arr) return error(v, "'" + std::string(key) + "' must be a list of address blocks, e.g. [\"10.0.0.0/8\"]");
  for (const toml::node& item : *arr) {
    Cidr block;
    auto text = item.as_string();
    if (!text || !parse_cidr(text->get(), block))
      error(item,
            "'" + std::string(key) + "': not an address block such as \"10.0.0.0/8\" or \"2001:db8::/32\"" +
                std::string(text && text->get().find('/') != std::string::npos ? " (host bits must be zero)" : ""));
    else
      out.push_back(block);
  }
}

std::optional<bool> Loader::boolean(const toml::node& n, std::string_view key) {
  if (auto b = n.as_boolean()) return b->get();
  error(n, "'" + std::string(key) + "' must be true or false");
  return std::nullopt;
}

std::optional<Millis> Loader::duration(const toml::node& n, std::string_view key, Millis lo) {
  auto s = n.as_string();
  if (!s) {
    error(n, "'" + std::string(key) + "' must be a duration string such as \"5s\" or \"500ms\"");
    return std::nullopt;
  }
  auto d = parse_duration(s->get());
  if (!d) {
    error(n, "'" + std::string(key) + "': bad duration \"" + s->get() +
                 "\" (a number with a unit ms, s, m, h or d, e.g. \"5s\")");
    return std::nullopt;
  }
  if (*d < lo) {
    error(n, "'" + std::string(key) + "' must be at least " + format_duration(lo));
    return std::nullopt;
  }
  return d;
}

template <typename E>
std::optional<E> Loader::choice(const toml::node& n, std::string_view key,
                                std::initializer_list<std::pair<const char*, E>> values) {
  auto s = n.as_string();
  std::string allowed;
  for (auto& [name, _] : values) allowed += (allowed.empty() ? "" : ", ") + std::string(name);
  if (s) {
    for (auto& [name, v] : values)
      if (s->get() == name) return v;
  }
  error(n, "'" + std::string(key) + "' must be one of: " + allowed);
  return std::nullopt;
}

bool Loader::address(const toml::node& where, const std::string& host, uint16_t port, bool numeric_only,
                     SocketAddress& out, bool* is_name) {
  if (host.find('\0') != std::string::npos) {
    error(where, "address must not contain a NUL character");
    return false;
  }
  // Literal addresses are parsed strictly (getaddrinfo would take "10.1" as 10.0.0.1).
  if (inet_pton(AF_INET, host.c_str(), &reinterpret_cast<sockaddr_in*>(&out.storage)->sin_addr) == 1) {
    out.set_family(AF_INET);
    out.len = sizeof(sockaddr_in);
    out.set_port(port);
    return true;
  }
  if (inet_pton(AF_INET6, host.c_str(), &reinterpret_cast<sockaddr_in6*>(&out.storage)->sin6_addr) == 1) {
    out.set_family(AF_INET6);
    out.len = sizeof(sockaddr_in6);
    out.set_port(port);
    return true;
  }
  const bool looks_numeric = !host.empty() && host.find_first_not_of("0123456789.") == std::string::npos;
  if (numeric_only || looks_numeric || !is_name) {
    error(where, "'" + printable(host, 64) + "' is not a valid IP address" +
                     std::string(numeric_only ? " (listeners bind to addresses, e.g. \"0.0.0.0\" or \"::\")" : ""));
    return false;
  }
  // A host name: only its form is checked here; the control loop looks it up (off the
  // loop) before the configuration is used, and reports a failure at this position.
  if (!valid_host_name(host)) {
    error(where, "'" + printable(host, 64) + "' is neither an IP address nor a valid host name (" + kHostRule + ")");
    return false;
  }
  out = SocketAddress{};
  *is_name = true;
  return true;
}

void Loader::parse_global(const toml::node& n, Config& c) {
  auto t = n.as_table();
  if (!t) return error(n, "[global] must be a table");
  table_keys(*t, "global",
             {
                 {"hostname",
                  [&](const toml::node& v) {
                    if (auto s = str(v, "hostname")) {
                      if (s->empty() || s->find_first_of(" \t\r\n") != std::string::npos)
                        error(v, "'hostname' must be a non-empty name without spaces");
                      else
                        c.global.hostname = *s;
                    }
                  }},
                 {"workers",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "workers", 0, 64)) c.global.workers = unsigned(*i);
                  }},
                 {"max_connections",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "max_connections", 1, 1'000'000)) c.global.max_connections = unsigned(*i);
                  }},
                 {"shutdown_grace",
                  [&](const toml::node& v) {
                    if (auto d = duration(v, "shutdown_grace", Millis(0))) c.global.shutdown_grace = *d;
                  }},
                 {"max_tracked_clients",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "max_tracked_clients", 1000, 100'000'000))
                      c.global.max_tracked_clients = unsigned(*i);
                  }},
                 {"resolve_interval",
                  [&](const toml::node& v) {
                    if (auto d = duration(v, "resolve_interval", Millis(0))) {
                      if (d->count() > 0 && d->count() < 100)
                        error(v, "'resolve_interval' must be 0s (only at load) or at least 100ms");
                      else
                        c.global.resolve_interval = *d;
                    }
                  }},
             });
}

void Loader::parse_log(const toml::node& n, Config& c) {
  auto t = n.as_table();
  if (!t) return error(n, "[log] must be a table");
  table_keys(
      *t, "log",
      {
          {"level",
           [&](const toml::node& v) {
             if (auto l = choice<LogLevel>(v, "level",
                                           {{"trace", LogLevel::trace},
                                            {"debug", LogLevel::debug},
                                            {"info", LogLevel::info},
                                            {"warn", LogLevel::warn},
                                            {"error", LogLevel::error}}))
               c.log.level = *l;
           }},
          {"access_log",
           [&](const toml::node& v) {
             if (auto b = boolean(v, "access_log")) c.log.access_log = *b;
           }},
          {"format",
           [&](const toml::node& v) {
             if (auto x = choice<LogFormat>(v, "format", {{"text", LogFormat::text}, {"json", LogFormat::json}}))
               c.log.format = *x;
           }},
          {"target",
           [&](const toml::node& v) {
             if (auto x = choice<LogTarget>(
                     v, "target",
                     {{"stderr", LogTarget::stderr_stream}, {"syslog", LogTarget::syslog}, {"file", LogTarget::file}}))
               c.log.target = *x;
           }},
          {"file",
           [&](const toml::node& v) {
             if (auto x = str(v, "file")) c.log.file = *x;
           }},
      });
}

void Loader::parse_admin(const toml::node& n, Config& c) {
  auto t = n.as_table();
  if (!t) return error(n, "[admin] must be a table");
  table_keys(*t, "admin",
             {
                 {"socket",
                  [&](const toml::node& v) {
                    if (auto x = str(v, "socket")) {
                      if (!x->empty() && (*x)[0] != '/') return error(v, "admin.socket must be an absolute path");
                      if (x->size() >= 100) return error(v, "admin.socket path is too long for a unix socket");
                      c.admin.socket = *x;
                      c.admin.socket_configured = true;
                    }
                  }},
                 {"listen",
                  [&](const toml::node& v) {
                    auto x = str(v, "listen");
                    if (!x || x->empty()) return;
                    // "127.0.0.1:9925" or "[::1]:9925"
                    const size_t colon = x->rfind(':');
                    std::string host = colon == std::string::npos ? "" : x->substr(0, colon);
                    if (host.size() > 2 && host.front() == '[' && host.back() == ']')
                      host = host.substr(1, host.size() - 2);
                    const std::string port = colon == std::string::npos ? "" : x->substr(colon + 1);
                    const bool port_ok = !port.empty() && port.size() <= 5 &&
                                         port.find_first_not_of("0123456789") == std::string::npos &&
                                         std::stoul(port) <= 65535;
                    if (host.empty() || !port_ok)
                      return error(v, "admin.listen must be \"ADDRESS:PORT\", e.g. \"127.0.0.1:9925\"");
                    if (address(v, host, uint16_t(std::stoul(port)), true, c.admin_listen)) c.admin.listen = *x;
                  }},
             });
}

void Loader::check_log(const toml::node& n, const Config& c) {
  const toml::table* t = n.as_table();
  if (!t) return;
  if (c.log.target == LogTarget::file && c.log.file.empty())
    error(t->contains("file") ? *t->get("file") : n, "log.target = \"file\" needs log.file");
  if (c.log.target != LogTarget::file && !c.log.file.empty())
    error(*t->get("file"), "log.file has no effect unless log.target = \"file\"");
  if (!c.log.file.empty() && c.log.file[0] != '/') error(*t->get("file"), "log.file must be an absolute path");
}

void Loader::parse_listener(const std::string& name, const toml::node& n, Config& c) {
  auto t = n.as_table();
  if (!t) return error(n, "[listener." + name + "] must be a table");
  ListenerConfig l;
  l.name = name;
  listener_sources_[name] = n.source();
  const std::string section = "listener." + name;
  const toml::node* address_node = nullptr;
  table_keys(*t, section,
             {
                 {"address",
                  [&](const toml::node& v) {
                    if (auto s = str(v, "address")) {
                      l.address = *s;
                      address_node = &v;
                    }
                  }},
                 {"port",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "port", 0, 65535)) l.port = uint16_t(*i);
                  }},
                 {"pool",
                  [&](const toml::node& v) {
                    if (auto s = str(v, "pool")) {
                      l.pool = *s;
                      listener_pool_refs_[name] = v.source();
                    }
                  }},
                 {"max_connections",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "max_connections", 1, 1'000'000)) l.max_connections = unsigned(*i);
                  }},
                 {"backlog",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "backlog", 0, 1'048'576)) l.backlog = unsigned(*i);
                  }},
                 {"client_idle_timeout",
                  [&](const toml::node& v) {
                    if (auto d = duration(v, "client_idle_timeout", Millis(1000))) l.client_idle_timeout = *d;
                  }},
                 {"proxy_protocol",
                  [&](const toml::node& v) {
                    if (auto x = choice<ProxyIn>(
                            v, "proxy_protocol",
                            {{"none", ProxyIn::none}, {"v1", ProxyIn::v1}, {"v2", ProxyIn::v2}, {"any", ProxyIn::any}}))
                      l.proxy_protocol = *x;
                  }},
                 {"trusted_proxies", [&](const toml::node& v) { cidr_list(v, "trusted_proxies", l.trusted_proxies); }},
                 {"allow", [&](const toml::node& v) { cidr_list(v, "allow", l.allow); }},
                 {"deny", [&](const toml::node& v) { cidr_list(v, "deny", l.deny); }},
                 {"limits_exempt", [&](const toml::node& v) { cidr_list(v, "limits_exempt", l.limits_exempt); }},
                 {"deny_action",
                  [&](const toml::node& v) {
                    if (auto x = choice<DenyAction>(v, "deny_action",
                                                    {{"reply", DenyAction::reply}, {"close", DenyAction::close}}))
                      l.deny_action = *x;
                  }},
                 {"max_connections_per_ip",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "max_connections_per_ip", 0, 1'000'000))
                      l.max_connections_per_ip = unsigned(*i);
                  }},
                 {"max_connection_rate_per_ip",
                  [&](const toml::node& v) {
                    auto s = str(v, "max_connection_rate_per_ip");
                    if (!s || s->empty()) return;
                    std::string why;
                    if (auto r = parse_rate(*s, why))
                      l.max_connection_rate_per_ip = *r;
                    else
                      error(v, "'max_connection_rate_per_ip': " + why);
                  }},
                 {"client_prefix_v4",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "client_prefix_v4", 1, 32)) l.client_prefix_v4 = unsigned(*i);
                  }},
                 {"client_prefix_v6",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "client_prefix_v6", 1, 128)) l.client_prefix_v6 = unsigned(*i);
                  }},
                 {"limits_dry_run",
                  [&](const toml::node& v) {
                    if (auto b = boolean(v, "limits_dry_run")) l.limits_dry_run = *b;
                  }},
             });
  if (l.proxy_protocol != ProxyIn::none && l.trusted_proxies.empty() && !t->contains("trusted_proxies"))
    error(n, "[" + section + "] has proxy_protocol but no trusted_proxies: say which balancers may send the header");
  if (l.proxy_protocol != ProxyIn::none && t->contains("trusted_proxies") && l.trusted_proxies.empty())
    if (auto* tp = t->get("trusted_proxies"); tp && tp->is_array() && tp->as_array()->empty())
      error(*tp, "'trusted_proxies' is empty: no client could send the PROXY header");
  if (l.proxy_protocol == ProxyIn::none && !l.trusted_proxies.empty())
    error(*t->get("trusted_proxies"), "'trusted_proxies' has no effect without proxy_protocol");
  if (!t->contains("address")) error(n, "[" + section + "] needs 'address'");
  if (!t->contains("pool")) error(n, "[" + section + "] needs 'pool'");
  // Kept even when the address is bad, so the pool reference is still checked.
  if (address_node) address(*address_node, l.address, l.port, true, l.bind);
  c.listeners.push_back(std::move(l));
}

void Loader::parse_health_check(const toml::node& n, PoolConfig& p) {
  auto t = n.as_table();
  if (!t) return error(n, "[pool." + p.name + ".health_check] must be a table");
  HealthCheckConfig& h = p.health_check;
  table_keys(
      *t, "pool." + p.name + ".health_check",
      {
          {"interval",
           [&](const toml::node& v) {
             if (auto d = duration(v, "interval", Millis(100))) h.interval = *d;
           }},
          {"timeout",
           [&](const toml::node& v) {
             if (auto d = duration(v, "timeout", Millis(100))) h.timeout = *d;
           }},
          {"rise",
           [&](const toml::node& v) {
             if (auto i = integer(v, "rise", 1, 100)) h.rise = unsigned(*i);
           }},
          {"fall",
           [&](const toml::node& v) {
             if (auto i = integer(v, "fall", 1, 100)) h.fall = unsigned(*i);
           }},
          {"ehlo_name",
           [&](const toml::node& v) {
             if (auto s = str(v, "ehlo_name")) {
               if (s->find_first_of(" \t\r\n") != std::string::npos)
                 error(v, "'ehlo_name' must not contain spaces or line breaks");
               else
                 h.ehlo_name = *s;
             }
           }},
          {"agent_port",
           [&](const toml::node& v) {
             if (auto i = integer(v, "agent_port", 0, 65535)) h.agent_port = uint16_t(*i);
           }},
          {"agent_interval",
           [&](const toml::node& v) {
             if (auto d = duration(v, "agent_interval", Millis(100))) h.agent_interval = *d;
           }},
          {"agent_timeout",
           [&](const toml::node& v) {
             if (auto d = duration(v, "agent_timeout", Millis(100))) h.agent_timeout = *d;
           }},
          {"tls",
           [&](const toml::node& v) {
             if (auto m = choice<CheckTls>(
                     v, "tls",
                     {{"none", CheckTls::none}, {"starttls", CheckTls::starttls}, {"implicit", CheckTls::implicit}}))
               h.tls = *m;
           }},
          {"starttls",
           [&](const toml::node& v) {
             // The older spelling of tls = "starttls"; reconciled with tls below.
             (void)boolean(v, "starttls");
           }},
          {"tls_verify",
           [&](const toml::node& v) {
             if (auto b = boolean(v, "tls_verify")) h.tls_verify = *b;
           }},
          {"tls_ca_file",
           [&](const toml::node& v) {
             if (auto x = str(v, "tls_ca_file")) {
               if (!x->empty() && ::access(x->c_str(), R_OK) != 0)
                 error(v, "'tls_ca_file' \"" + *x + "\" cannot be read: " + std::strerror(errno));
               else
                 h.tls_ca_file = *x;
             }
           }},
          {"tls_server_name",
           [&](const toml::node& v) {
             if (auto x = str(v, "tls_server_name")) {
               if (x->find_first_of(" \t\r\n") != std::string::npos || x->find('\0') != std::string::npos)
                 error(v, "'tls_server_name' must be a host name or address");
               else
                 h.tls_server_name = *x;
             }
           }},
      });
  if (const toml::node* st = t->get("starttls"); st && st->is_boolean()) {
    const bool on = st->as_boolean()->get();
    if (!t->get("tls"))
      h.tls = on ? CheckTls::starttls : CheckTls::none;
    else if (on != (h.tls == CheckTls::starttls))
      error(*st, std::string("'starttls = ") + (on ? "true" : "false") + "' contradicts tls = \"" +
                     (h.tls == CheckTls::none       ? "none"
                      : h.tls == CheckTls::starttls ? "starttls"
                                                    : "implicit") +
                     "\"; set tls alone");
  }
  if (h.tls == CheckTls::none)
    for (const char* key : {"tls_verify", "tls_ca_file", "tls_server_name"})
      if (const toml::node* v = t->get(key);
          v && !(v->is_boolean() && !v->as_boolean()->get()) && !(v->is_string() && v->as_string()->get().empty()))
        error(*v, std::string("'") + key + "' has no effect without tls = \"starttls\" or \"implicit\"");
}

void Loader::parse_server(const toml::node& n, PoolConfig& p, std::set<std::string>& names) {
  auto t = n.as_table();
  if (!t) return error(n, "each [[pool." + p.name + ".server]] must be a table");
  ServerConfig s;
  const std::string section = "[pool." + p.name + ".server]";
  bool ok = true;
  const toml::node* address_node = nullptr;
  const toml::node* name_node = nullptr;
  table_keys(*t, "[pool." + p.name + ".server]",
             {
                 {"name",
                  [&](const toml::node& v) {
                    if (auto x = str(v, "name")) {
                      s.name = *x;
                      name_node = &v;
                    } else {
                      ok = false;
                    }
                  }},
                 {"address",
                  [&](const toml::node& v) {
                    if (auto x = str(v, "address")) {
                      s.address = *x;
                      address_node = &v;
                    } else {
                      ok = false;
                    }
                  }},
                 {"port",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "port", 1, 65535))
                      s.port = uint16_t(*i);
                    else
                      ok = false;
                  }},
                 {"weight",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "weight", 0, 256)) s.weight = unsigned(*i);
                  }},
                 {"max_connections",
                  [&](const toml::node& v) {
                    if (auto i = integer(v, "max_connections", 0, 1'000'000)) s.max_connections = unsigned(*i);
                  }},
                 {"backup",
                  [&](const toml::node& v) {
                    if (auto b = boolean(v, "backup")) s.backup = *b;
                  }},
                 {"state",
                  [&](const toml::node& v) {
                    if (auto st = choice<AdminState>(
                            v, "state",
                            {{"ready", AdminState::ready}, {"drain", AdminState::drain}, {"maint", AdminState::maint}}))
                      s.state = *st;
                  }},
             });
  if (!name_node) {
    if (!t->contains("name")) error(n, "a server in pool '" + p.name + "' needs 'name'");
    ok = false;
  } else if (!valid_name(s.name)) {
    error(*name_node, "server name \"" + printable(s.name, 64) + "\" must be " + kNameRule);
    ok = false;
  } else if (!names.insert(s.name).second) {
    error(*name_node, "duplicate server name '" + s.name + "' in pool '" + p.name + "'");
    ok = false;
  }
  if (!address_node) {
    if (!t->contains("address")) error(n, "server '" + s.name + "' in pool '" + p.name + "' needs 'address'");
    ok = false;
  }
  if (ok) {
    ok = address(*address_node, s.address, s.port, false, s.addr, &s.needs_resolution);
    s.host_name = s.needs_resolution;
    s.address_line = address_node->source().begin.line;
    s.address_column = address_node->source().begin.column;
  }
  if (ok) p.servers.push_back(std::move(s));
}

void Loader::parse_pool(const std::string& name, const toml::node& n, Config& c) {
  auto t = n.as_table();
  if (!t) return error(n, "[pool." + name + "] must be a table");
  PoolConfig p;
  p.name = name;
  const toml::node* servers_node = nullptr;
  std::set<std::string> names;
  table_keys(
      *t, "pool." + name,
      {
          {"algorithm",
           [&](const toml::node& v) {
             if (auto a = choice<Algorithm>(v, "algorithm",
                                            {{"roundrobin", Algorithm::roundrobin},
                                             {"leastconn", Algorithm::leastconn},
                                             {"source", Algorithm::source}}))
               p.algorithm = *a;
           }},
          {"hash_prefix_v4",
           [&](const toml::node& v) {
             if (auto i = integer(v, "hash_prefix_v4", 0, 32)) p.hash_prefix_v4 = unsigned(*i);
           }},
          {"hash_prefix_v6",
           [&](const toml::node& v) {
             if (auto i = integer(v, "hash_prefix_v6", 0, 128)) p.hash_prefix_v6 = unsigned(*i);
           }},
          {"hash_balance_factor",
           [&](const toml::node& v) {
             auto i = integer(v, "hash_balance_factor", 0, 100000);
             if (!i) return;
             // 100 or less leaves no room above the average (HAProxy refuses it too).
             if (*i > 0 && *i <= 100)
               return error(v,
                            "'hash_balance_factor' must be 0 (off) or above 100 (a percentage of the average "
                            "load, e.g. 125), not " +
                                std::to_string(*i));
             p.hash_balance_factor = unsigned(*i);
           }},
          {"handoff",
           [&](const toml::node& v) {
             if (auto h = choice<Handoff>(v, "handoff", {{"banner", Handoff::banner}, {"connect", Handoff::connect}}))
               p.handoff = *h;
           }},
          {"retries",
           [&](const toml::node& v) {
             if (auto i = integer(v, "retries", 0, 16)) p.retries = unsigned(*i);
           }},
          {"connect_timeout",
           [&](const toml::node& v) {
             if (auto d = duration(v, "connect_timeout", Millis(10))) p.connect_timeout = *d;
           }},
          {"banner_timeout",
           [&](const toml::node& v) {
             if (auto d = duration(v, "banner_timeout", Millis(10))) p.banner_timeout = *d;
           }},
          {"server_idle_timeout",
           [&](const toml::node& v) {
             if (auto d = duration(v, "server_idle_timeout", Millis(1000))) p.server_idle_timeout = *d;
           }},
          {"health_check", [&](const toml::node& v) { parse_health_check(v, p); }},
          {"server",
           [&](const toml::node& v) {
             servers_node = &v;
             auto arr = v.as_array();
             if (!arr) return error(v, "servers are written as [[pool." + name + ".server]] tables");
             if (arr->empty()) return error(v, "pool '" + name + "' has no servers");
             for (const toml::node& s : *arr) parse_server(s, p, names);
           }},
          {"proxy_protocol",
           [&](const toml::node& v) {
             if (auto x = choice<ProxyOut>(v, "proxy_protocol",
                                           {{"none", ProxyOut::none}, {"v1", ProxyOut::v1}, {"v2", ProxyOut::v2}}))
               p.proxy_protocol = *x;
           }},
          {"queue_timeout",
           [&](const toml::node& v) {
             if (auto d = duration(v, "queue_timeout", Millis(0))) p.queue_timeout = *d;
           }},
          {"slow_start",
           [&](const toml::node& v) {
             if (auto d = duration(v, "slow_start", Millis(0))) p.slow_start = *d;
           }},
      });
  if (!servers_node) error(n, "pool '" + name + "' has no [[pool." + name + ".server]]");
  c.pools.push_back(std::move(p));
}

ConfigLoad Loader::run(std::string_view text) {
  ConfigLoad out;
  toml::table root;
  try {
    root = toml::parse(text, std::string_view(file_));
  } catch (const toml::parse_error& e) {
    error(e.source(), std::string(e.description()));
    out.errors = std::move(errors_);
    return out;
  }
  auto c = std::make_shared<Config>();
  c->path = file_;
  for (auto&& [k, v] : root) {
    const std::string key(k.str());
    if (key == "global") {
      parse_global(v, *c);
    } else if (key == "log") {
      parse_log(v, *c);
      check_log(v, *c);
    } else if (key == "admin") {
      parse_admin(v, *c);
    } else if (key == "listener" || key == "pool") {
      auto t = v.as_table();
      if (!t) {
        error(v, "'" + key + "' must be written as [" + key + ".NAME] tables");
        continue;
      }
      for (auto&& [name, section] : *t) {
        std::string nm(name.str());
        if (!valid_name(nm)) {
          error(name.source().begin.line ? name.source() : section.source(),
                key + " name \"" + printable(nm, 64) + "\" must be " + kNameRule);
          continue;
        }
        if (key == "listener")
          parse_listener(nm, section, *c);
        else
          parse_pool(nm, section, *c);
      }
    } else {
      static constexpr std::string_view kSections[] = {"global", "log", "admin", "listener", "pool"};
      error(k.source(), "unknown section or key '" + key + "'" + did_you_mean(key, kSections));
    }
  }

  if (c->global.hostname.empty()) {
    char host[256] = {};
    if (gethostname(host, sizeof host - 1) == 0 && host[0])
      c->global.hostname = host;
    else
      c->global.hostname = "localhost";
  }
  for (auto& p : c->pools)
    if (p.health_check.ehlo_name.empty()) p.health_check.ehlo_name = c->global.hostname;

  if (c->listeners.empty() && errors_.empty())
    errors_.push_back({file_, 1, 1, "no [listener.NAME] section: smtplb would accept nothing"});
  std::map<std::string, std::string> binds;
  for (const auto& l : c->listeners) {
    // Checked whenever the key was given, an empty name included (a missing key is
    // reported on its own).
    if (listener_pool_refs_.count(l.name) && !c->find_pool(l.pool)) {
      auto it = listener_pool_refs_.find(l.name);
      errors_.push_back({file_, it->second.begin.line, it->second.begin.column,
                         "listener '" + l.name + "' names pool '" + l.pool + "', which is not defined"});
    }
    if (l.port != 0 && l.bind.len != 0) {
      auto [it, fresh] = binds.emplace(l.bind.to_string(), l.name);
      if (!fresh) {
        auto ref = listener_sources_[l.name];
        errors_.push_back(
            {file_, ref.begin.line, ref.begin.column,
             "listener '" + l.name + "' binds " + l.bind.to_string() + " like listener '" + it->second + "'"});
      }
    }
  }

  if (!errors_.empty()) {
    std::stable_sort(errors_.begin(), errors_.end(), [](const ConfigError& a, const ConfigError& b) {
      return a.line != b.line ? a.line < b.line : a.column < b.column;
    });
    out.errors = std::move(errors_);
    return out;
  }
  out.config = std::move(c);
  return out;
}

}  // namespace

AgentConfigLoad Loader::run_agent(std::string_view text) {
  AgentConfigLoad out;
  toml::table root;
  try {
    root = toml::parse(text, std::string_view(file_));
  } catch (const toml::parse_error& e) {
    error(e.source(), std::string(e.description()));
    out.errors = std::move(errors_);
    return out;
  }
  auto c = std::make_shared<AgentConfig>();
  c->path = file_;
  const toml::node* address_node = nullptr;
  const toml::node* low_node = nullptr;
  const toml::node* high_node = nullptr;
  const toml::node* drain_node = nullptr;
  for (auto&& [k, v] : root) {
    const std::string key(k.str());
    const toml::table* t = v.as_table();
    if ((key == "agent" || key == "queue") && !t) {
      error(v, "[" + key + "] must be a table");
      continue;
    }
    if (key == "agent") {
      table_keys(*t, "agent",
                 {
                     {"address",
                      [&](const toml::node& n) {
                        if (auto s = str(n, "address")) {
                          c->address = *s;
                          address_node = &n;
                        }
                      }},
                     {"port",
                      [&](const toml::node& n) {
                        if (auto i = integer(n, "port", 0, 65535)) c->port = uint16_t(*i);
                      }},
                     {"queue_directory",
                      [&](const toml::node& n) {
                        if (auto s = str(n, "queue_directory")) {
                          if (s->empty() || s->front() != '/')
                            error(n, "'queue_directory' must be an absolute path");
                          else
                            c->queue_directory = *s;
                        }
                      }},
                     {"refresh",
                      [&](const toml::node& n) {
                        if (auto d = duration(n, "refresh", Millis(100))) c->refresh = *d;
                      }},
                 });
    } else if (key == "queue") {
      table_keys(*t, "queue",
                 {
                     {"low",
                      [&](const toml::node& n) {
                        if (auto i = integer(n, "low", 0, 100'000'000)) c->queue.low = uint64_t(*i);
                        low_node = &n;
                      }},
                     {"high",
                      [&](const toml::node& n) {
                        if (auto i = integer(n, "high", 1, 100'000'000)) c->queue.high = uint64_t(*i);
                        high_node = &n;
                      }},
                     {"floor",
                      [&](const toml::node& n) {
                        if (auto i = integer(n, "floor", 0, 100)) c->queue.floor = uint32_t(*i);
                      }},
                     {"drain",
                      [&](const toml::node& n) {
                        if (auto i = integer(n, "drain", 0, 100'000'000)) c->queue.drain = uint64_t(*i);
                        drain_node = &n;
                      }},
                 });
    } else {
      static constexpr std::string_view kSections[] = {"agent", "queue"};
      error(k.source(), "unknown section or key '" + key + "'" + did_you_mean(key, kSections));
    }
  }
  if (errors_.empty()) {
    // Without 'high' in the file, the conflict is with the default: point at 'low', which
    // is then necessarily there (the defaults themselves are coherent).
    if (c->queue.high <= c->queue.low)
      error(high_node ? *high_node : *low_node, "'high' (" + std::to_string(c->queue.high) + ") must be above 'low' (" +
                                                    std::to_string(c->queue.low) + ")");
    if (c->queue.drain != 0 && c->queue.drain < c->queue.high)
      error(*drain_node, "'drain' must be 0 (off) or at least 'high' (" + std::to_string(c->queue.high) + ")");
    if (address_node)
      address(*address_node, c->address, c->port, true, c->bind);
    else
      address(root, c->address, c->port, true, c->bind);
  }
  if (!errors_.empty()) {
    out.errors = std::move(errors_);
    return out;
  }
  out.config = std::move(c);
  return out;
}

ConfigLoad load_config_string(std::string_view text, const std::string& path) {
  return Loader(path).run(text);
}

AgentConfigLoad load_agent_config_string(std::string_view text, const std::string& path) {
  return Loader(path).run_agent(text);
}

namespace {

// Why `path` cannot be read, in an operator's words, from the errno of open() or read().
std::string unreadable(int err) {
  if (err == ENOENT) return "the file does not exist";
  if (err == EISDIR) return "this is a directory, not a file";
  std::string why = std::string("cannot read the file: ") + std::strerror(err);
  if (err == EACCES) {
    // Under systemd smtplb runs as its own user: say which one was refused.
    const passwd* pw = ::getpwuid(::geteuid());
    why += " (smtplb runs as user " + (pw ? std::string(pw->pw_name) : std::to_string(::geteuid())) + ")";
  }
  return why;
}

// The whole file, or the errno that stopped reading it.
int read_whole_file(const std::string& path, std::string& text) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  struct stat st {};
  int err = 0;
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    err = EISDIR;
  } else {
    char buf[65536];
    for (;;) {
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n > 0) {
        text.append(buf, static_cast<size_t>(n));
      } else if (n == 0) {
        break;
      } else if (errno != EINTR) {
        err = errno;
        break;
      }
    }
  }
  ::close(fd);
  return err;
}

}  // namespace

ConfigLoad load_config_file(const std::string& path) {
  ConfigLoad out;
  std::string text;
  if (const int err = read_whole_file(path, text); err != 0) {
    out.errors.push_back({path, 0, 0, unreadable(err)});
    return out;
  }
  return load_config_string(text, path);
}

AgentConfigLoad load_agent_config_file(const std::string& path) {
  AgentConfigLoad out;
  std::string text;
  if (const int err = read_whole_file(path, text); err != 0) {
    out.errors.push_back({path, 0, 0, unreadable(err)});
    return out;
  }
  return load_agent_config_string(text, path);
}

}  // namespace smtplb
