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
  SocketAddress addr;  // port 0; valid when ok
  std::string error;   // why not, when !ok (e.g. "Name or service not known")
};

// The distinct host names the servers of `c` name, in file order. Empty when every
// server address is an IP literal: then `c` is complete as loaded.
std::vector<std::string> hosts_to_resolve(const Config& c);

// A copy of `c` in which every server naming a host gets the looked-up address with its
// own port. A host with no answer in `lookups`, or a failed one, is an error at the
// server's 'address' (one per server naming it, "cannot resolve 'HOST': why"), and then
// no Config is returned, as when loading fails.
ConfigLoad apply_lookups(const Config& c, const std::vector<HostLookup>& lookups);

}  // namespace smtplb
