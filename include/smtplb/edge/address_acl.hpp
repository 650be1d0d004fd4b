#pragma once
// A listener's allow / deny lists. The most specific matching block decides (the longest
// prefix, as in a routing table), so an operator can allow a network and deny a part of
// it, or deny a network and allow one host in it; between an allow and a deny block of
// the same length, deny wins. An address no block matches is allowed when the allow list
// is empty, denied otherwise. IPv4 blocks match IPv4-mapped IPv6 clients too.
#include <span>
#include <unordered_map>
#include <vector>

#include "smtplb/edge/address.hpp"

namespace smtplb {

class AddressAcl {
 public:
  AddressAcl() = default;  // allows everything
  AddressAcl(std::span<const Cidr> allow, std::span<const Cidr> deny);

  bool allows(const Addr128& a) const;

 private:
  struct NetHash {
    size_t operator()(const Addr128& a) const { return size_t(a.hi * 0x9e3779b97f4a7c15ull ^ a.lo); }
  };
  void add(const Cidr& c, bool deny);

  struct Level {
    unsigned prefix;
    std::unordered_map<Addr128, bool, NetHash> nets;  // network -> denied
  };
  bool default_allow_ = true;
  std::vector<Level> levels_;  // the prefix lengths in use, longest first: one probe each
};

}  // namespace smtplb
