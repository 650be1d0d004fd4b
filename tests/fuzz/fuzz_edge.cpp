// libFuzzer target for the edge defences' parsers and ACL. The input's first line is fed
// to parse_cidr and parse_rate (no crash; what parses renders back to an equal value);
// the rest builds allow / deny blocks and addresses, and AddressAcl must agree with a
// naive reading of its rule (the longest matching block decides, deny wins a tie, no
// match: allowed only without an allow list). Violations abort().
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_check.hpp"
#include "smtplb/edge/address_acl.hpp"
#include "smtplb/edge/rate_limit.hpp"

namespace {

using namespace smtplb;

struct Rule {
  Addr128 net;
  unsigned prefix;
  bool deny;
};

bool matches(const Rule& r, const Addr128& a) {
  return mask128(a, r.prefix) == r.net;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  const size_t nl = in.find('\n');
  const std::string_view line = in.substr(0, nl);
  Cidr c;
  if (parse_cidr(line, c)) {
    Cidr again;
    FUZZ_CHECK(parse_cidr(c.to_string(), again));
    FUZZ_CHECK(again.family == c.family && again.prefix == c.prefix &&
               std::string(reinterpret_cast<const char*>(again.addr), 16) ==
                   std::string(reinterpret_cast<const char*>(c.addr), 16));
  }
  std::string err;
  if (auto r = parse_rate(line, err)) {
    FUZZ_CHECK(r->count > 0 && r->interval_us() > 0 && r->tolerance_us() >= 0);
    std::string err2;
    auto back = parse_rate(r->to_string(), err2);
    FUZZ_CHECK(back && back->count == r->count && back->period == r->period);
  } else {
    FUZZ_CHECK(!err.empty());
  }
  if (nl == std::string_view::npos) return 0;

  // Blocks: 1 byte flags (bit0 deny, bit1 v6), 1 byte prefix, 4 or 16 address bytes.
  const uint8_t* p = data + nl + 1;
  size_t n = size - nl - 1;
  std::vector<Cidr> allow, deny;
  std::vector<Rule> rules;
  while (n >= 2 && rules.size() < 64) {
    const uint8_t flags = p[0];
    const bool v6 = flags & 2;
    const size_t len = v6 ? 16 : 4;
    if (n < 2 + len) break;
    Cidr b;
    b.family = v6 ? AF_INET6 : AF_INET;
    b.prefix = p[1] % (v6 ? 129 : 33);
    for (size_t i = 0; i < len; ++i) b.addr[i] = p[2 + i];
    // Clear host bits, as parse_cidr requires.
    for (unsigned bit = b.prefix; bit < len * 8; ++bit) b.addr[bit / 8] &= uint8_t(~(0x80 >> (bit % 8)));
    (flags & 1 ? deny : allow).push_back(b);
    Rule r;
    to_block128(b, r.net, r.prefix);
    r.deny = flags & 1;
    rules.push_back(r);
    p += 2 + len;
    n -= 2 + len;
  }
  const AddressAcl acl(allow, deny);
  // Addresses: the rest in 16-byte chunks, each also tried as the IPv4 in its last 4 bytes.
  for (size_t off = 0; off + 16 <= n; off += 16) {
    Addr128 a6{}, a4{};
    for (int i = 0; i < 8; ++i) {
      a6.hi = a6.hi << 8 | p[off + i];
      a6.lo = a6.lo << 8 | p[off + 8 + i];
    }
    a4 = {0, 0xffff00000000ull | (a6.lo & 0xffffffffull)};
    for (const Addr128& a : {a6, a4}) {
      int best = -1;
      bool denied = false;
      for (const Rule& r : rules) {
        if (!matches(r, a)) continue;
        if (int(r.prefix) > best) {
          best = int(r.prefix);
          denied = r.deny;
        } else if (int(r.prefix) == best) {
          denied = denied || r.deny;
        }
      }
      const bool want = best >= 0 ? !denied : allow.empty();
      FUZZ_CHECK(acl.allows(a) == want);
    }
  }
  return 0;
}
