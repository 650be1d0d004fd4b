#include "smtplb/config/resolve_plan.hpp"

#include <algorithm>
#include <memory>

namespace smtplb {

std::vector<std::string> hosts_to_resolve(const Config& c) {
  std::vector<std::string> hosts;
  for (const auto& p : c.pools)
    for (const auto& s : p.servers)
      if (s.needs_resolution && std::find(hosts.begin(), hosts.end(), s.address) == hosts.end())
        hosts.push_back(s.address);
  return hosts;
}

ConfigLoad apply_lookups(const Config& c, const std::vector<HostLookup>& lookups) {
  ConfigLoad out;
  auto next = std::make_shared<Config>(c);
  for (auto& p : next->pools)
    for (auto& s : p.servers) {
      if (!s.needs_resolution) continue;
      auto it = std::find_if(lookups.begin(), lookups.end(), [&](const HostLookup& l) { return l.host == s.address; });
      if (it == lookups.end() || !it->ok) {
        out.errors.push_back({c.path, s.address_line, s.address_column,
                              "cannot resolve '" + s.address +
                                  "': " + (it == lookups.end() ? std::string("not looked up") : it->error)});
        continue;
      }
      s.addr = it->addr;
      s.addr.set_port(s.port);
      s.needs_resolution = false;
    }
  if (!out.errors.empty()) {
    std::stable_sort(out.errors.begin(), out.errors.end(), [](const ConfigError& a, const ConfigError& b) {
      return a.line != b.line ? a.line < b.line : a.column < b.column;
    });
    return out;
  }
  out.config = std::move(next);
  return out;
}

}  // namespace smtplb
