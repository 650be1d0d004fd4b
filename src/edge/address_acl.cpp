#include "smtplb/edge/address_acl.hpp"

#include <algorithm>

namespace smtplb {

AddressAcl::AddressAcl(std::span<const Cidr> allow, std::span<const Cidr> deny) : default_allow_(allow.empty()) {
  for (const Cidr& c : allow) add(c, false);
  for (const Cidr& c : deny) add(c, true);
  std::sort(lengths_.begin(), lengths_.end(), std::greater<>());
}

void AddressAcl::add(const Cidr& c, bool deny) {
  Addr128 net;
  unsigned prefix;
  to_block128(c, net, prefix);
  auto& at = nets_[prefix];
  if (at.empty()) lengths_.push_back(uint8_t(prefix));
  bool& d = at[net];
  d = d || deny;  // the same block in both lists: deny wins
}

bool AddressAcl::allows(const Addr128& a) const {
  for (const uint8_t len : lengths_) {
    const auto& at = nets_.at(len);
    auto it = at.find(mask128(a, len));
    if (it != at.end()) return !it->second;
  }
  return default_allow_;
}

}  // namespace smtplb
