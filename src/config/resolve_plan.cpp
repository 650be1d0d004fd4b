#include "smtplb/config/resolve_plan.hpp"

#include <algorithm>
#include <memory>

namespace smtplb {

namespace {
void add_unique(std::vector<std::string>& hosts, const std::string& h) {
  if (std::find(hosts.begin(), hosts.end(), h) == hosts.end()) hosts.push_back(h);
}

const ServerConfig* find_same(const Config* running, const PoolConfig& pool, const ServerConfig& s) {
  if (!running) return nullptr;
  for (const auto& rp : running->pools)
    for (const auto& rs : rp.servers)
      if (same_named_server(rp, rs, pool, s)) return &rs;
  return nullptr;
}
}  // namespace

std::vector<std::string> hosts_to_resolve(const Config& c) {
  std::vector<std::string> hosts;
  for (const auto& p : c.pools)
    for (const auto& s : p.servers)
      if (s.needs_resolution) add_unique(hosts, s.address);
  return hosts;
}

std::vector<std::string> host_names(const Config& c) {
  std::vector<std::string> hosts;
  for (const auto& p : c.pools)
    for (const auto& s : p.servers)
      if (s.host_name) add_unique(hosts, s.address);
  return hosts;
}

bool same_named_server(const PoolConfig& pa, const ServerConfig& a, const PoolConfig& pb, const ServerConfig& b) {
  return pa.name == pb.name && a.name == b.name && a.address == b.address && a.port == b.port;
}

ConfigLoad apply_lookups(const Config& c, const std::vector<HostLookup>& lookups, const Config* running) {
  ConfigLoad out;
  auto next = std::make_shared<Config>(c);
  for (auto& p : next->pools)
    for (auto& s : p.servers) {
      if (!s.needs_resolution) continue;
      auto it = std::find_if(lookups.begin(), lookups.end(), [&](const HostLookup& l) { return l.host == s.address; });
      const ServerConfig* same = find_same(running, p, s);
      if (same && same->addr.len != 0) {
        s.addr = same->addr;
        s.needs_resolution = false;
      } else if (it != lookups.end() && it->ok) {
        s.addr = it->addr;
        s.addr.set_port(s.port);
        s.needs_resolution = false;
      }
      if (it != lookups.end() && it->ok) continue;
      const std::string why = it == lookups.end() ? std::string("not looked up") : it->error;
      out.warnings.push_back(
          {c.path, s.address_line, s.address_column,
           "cannot resolve '" + s.address + "': " + why +
               (s.needs_resolution
                    ? "; server " + p.name + "/" + s.name + " starts DOWN and the name is looked up again"
                    : "; server " + p.name + "/" + s.name + " keeps its address " + s.addr.to_string())});
    }
  std::stable_sort(out.warnings.begin(), out.warnings.end(), [](const ConfigError& a, const ConfigError& b) {
    return a.line != b.line ? a.line < b.line : a.column < b.column;
  });
  out.config = std::move(next);
  return out;
}

}  // namespace smtplb
