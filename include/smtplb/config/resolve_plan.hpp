#pragma once
// Host names of a loaded configuration and what to do with their addresses, without
// doing any lookup: loading a file yields names, the control loop resolves them (off the
// loop, src/control/resolver.cpp) and these functions turn the answers into a complete Config or
// into errors at the place each name was written.
#include <string>
#include <vector>

#include "smtplb/config/config.hpp"

namespace smtplb {

// The answer for one host name.
struct HostLookup {
  std::string host;
  bool ok = false;
  SocketAddress addr;  // port 0; valid when ok: the answer's first address
  std::string error;   // why not, when !ok (e.g. "Name or service not known")
  // Every address of the answer (port 0, first included, at most kMaxAddresses): a
  // server whose address is still among them keeps it, so a name whose answers rotate
  // (round-robin DNS) does not move its servers at every lookup.
  std::vector<SocketAddress> all;
  static constexpr size_t kMaxAddresses = 16;
};

// The distinct host names the servers of `c` name that have no address yet, in file
// order. Empty when every server address is an IP literal: then `c` is complete as loaded.
std::vector<std::string> hosts_to_resolve(const Config& c);

// The distinct host names any server of `c` names, resolved or not, in file order: what
// is looked up again every global.resolve_interval.
std::vector<std::string> host_names(const Config& c);

// Two servers of two configurations are the same for the answers of their host name:
// same pool, name, address as written and port.
bool same_named_server(const PoolConfig& pa, const ServerConfig& a, const PoolConfig& pb, const ServerConfig& b);

// A copy of `c` in which every server naming a host gets an address with its own port.
// Never fails: the configuration is usable whatever the resolver says.
// - `running` (a reload: the configuration in use) holds the same server with an
//   address: it keeps that address, whatever the answer. A changed address is not
//   taken here: the control loop checks it first (src/control/process.cpp), then
//   switches. A failed answer is a warning ("keeps its address").
// - Otherwise the answer's address; a failed or missing answer leaves the server
//   without one (needs_resolution stays set: it starts DOWN, the name is looked up
//   again) and is a warning at its 'address': "cannot resolve 'HOST': why; ...".
ConfigLoad apply_lookups(const Config& c, const std::vector<HostLookup>& lookups, const Config* running = nullptr);

}  // namespace smtplb
