#include "smtplb/edge/address_acl.hpp"

#include <algorithm>

namespace smtplb {

AddressAcl::AddressAcl(std::span<const Cidr> allow, std::span<const Cidr> deny) : default_allow_(allow.empty()) {
  for (const Cidr& c : allow) add(c, false);
  for (const Cidr& c : deny) add(c, true);
  std::sort(levels_.begin(), levels_.end(), [](const Level& x, const Level& y) { return x.prefix > y.prefix; });
}

void AddressAcl::add(const Cidr& c, bool deny) {
  Addr128 net;
  unsigned prefix;
  to_block128(c, net, prefix);
  auto level = std::find_if(levels_.begin(), levels_.end(), [&](const Level& l) { return l.prefix == prefix; });
  if (level == levels_.end()) level = levels_.insert(levels_.end(), Level{prefix, {}});
  bool& d = level->nets[net];
  d = d || deny;  // the same block in both lists: deny wins
}

bool AddressAcl::allows(const Addr128& a) const {
  for (const Level& l : levels_) {
    auto it = l.nets.find(mask128(a, l.prefix));
    if (it != l.nets.end()) return !it->second;
  }
  return default_allow_;
}

}  // namespace smtplb
