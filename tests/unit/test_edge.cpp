// The edge defences' pure parts: client addresses in one 128-bit space, allow / deny
// lists (longest prefix decides, deny wins a tie), client keys, the rate limiter with an
// injected clock, and the shared client table's eviction and pinning.
#include <doctest/doctest.h>

#include <arpa/inet.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "smtplb/edge/address_acl.hpp"
#include "smtplb/edge/client_table.hpp"
#include "smtplb/edge/rate_limit.hpp"

using namespace smtplb;

namespace {

Addr128 ip(const std::string& text) {
  SocketAddress a;
  if (text.find(':') == std::string::npos) {
    auto* sin = reinterpret_cast<sockaddr_in*>(&a.storage);
    sin->sin_family = AF_INET;
    REQUIRE(inet_pton(AF_INET, text.c_str(), &sin->sin_addr) == 1);
  } else {
    auto* sin6 = reinterpret_cast<sockaddr_in6*>(&a.storage);
    sin6->sin6_family = AF_INET6;
    REQUIRE(inet_pton(AF_INET6, text.c_str(), &sin6->sin6_addr) == 1);
  }
  Addr128 out;
  REQUIRE(to_addr128(a, out));
  return out;
}

std::vector<Cidr> blocks(std::initializer_list<const char*> texts) {
  std::vector<Cidr> out;
  for (const char* t : texts) {
    Cidr c;
    REQUIRE_MESSAGE(parse_cidr(t, c), t);
    out.push_back(c);
  }
  return out;
}

AddressAcl acl(std::initializer_list<const char*> allow, std::initializer_list<const char*> deny) {
  const auto a = blocks(allow);
  const auto d = blocks(deny);
  return AddressAcl(a, d);
}

}  // namespace

TEST_CASE("edge: IPv4, IPv6 and v4-mapped addresses share one space") {
  CHECK(ip("192.0.2.1") == ip("::ffff:192.0.2.1"));
  CHECK(is_v4(ip("192.0.2.1")));
  CHECK_FALSE(is_v4(ip("2001:db8::1")));
  CHECK(mask128(ip("2001:db8:1:2:3:4:5:6"), 64) == ip("2001:db8:1:2::"));
  CHECK(mask128(ip("2001:db8:1:2:3:4:5:6"), 0) == ip("::"));
  CHECK(mask128(ip("2001:db8:1:2:3:4:5:6"), 128) == ip("2001:db8:1:2:3:4:5:6"));
  CHECK(mask128(ip("192.0.2.77"), 96 + 24) == ip("192.0.2.0"));
}

TEST_CASE("edge: an empty ACL allows everything, an allow list allows only itself") {
  CHECK(AddressAcl().allows(ip("192.0.2.1")));
  const AddressAcl a = acl({"192.0.2.0/24", "2001:db8::/32"}, {});
  CHECK(a.allows(ip("192.0.2.200")));
  CHECK(a.allows(ip("::ffff:192.0.2.200")));  // v4-mapped meets the IPv4 block
  CHECK(a.allows(ip("2001:db8:ffff::1")));
  CHECK_FALSE(a.allows(ip("198.51.100.1")));
  CHECK_FALSE(a.allows(ip("2001:db9::1")));
}

TEST_CASE("edge: the longest matching block decides, and deny wins between equal blocks") {
  // Deny a network, allow one host in it.
  const AddressAcl a = acl({"192.0.2.7/32"}, {"192.0.2.0/24"});
  CHECK(a.allows(ip("192.0.2.7")));
  CHECK_FALSE(a.allows(ip("192.0.2.8")));
  CHECK_FALSE(a.allows(ip("198.51.100.1")));  // an allow list exists: others are denied
  // Allow a network, deny a part of it.
  const AddressAcl b = acl({"198.51.100.0/24"}, {"198.51.100.128/25"});
  CHECK(b.allows(ip("198.51.100.1")));
  CHECK_FALSE(b.allows(ip("198.51.100.200")));
  // The same block in both lists.
  const AddressAcl c = acl({"192.0.2.0/24"}, {"192.0.2.0/24"});
  CHECK_FALSE(c.allows(ip("192.0.2.1")));
  // Deny only: everyone else is allowed.
  const AddressAcl d = acl({}, {"2001:db8::/32", "192.0.2.1"});
  CHECK_FALSE(d.allows(ip("2001:db8::5")));
  CHECK_FALSE(d.allows(ip("192.0.2.1")));
  CHECK(d.allows(ip("192.0.2.2")));
  CHECK(d.allows(ip("2001:db9::5")));
}

TEST_CASE("edge: /0 and /128 edges") {
  const AddressAcl all4 = acl({}, {"0.0.0.0/0"});
  CHECK_FALSE(all4.allows(ip("192.0.2.1")));
  CHECK(all4.allows(ip("2001:db8::1")));  // an IPv4 /0 is every IPv4 address, not IPv6
  const AddressAcl all6 = acl({}, {"::/0"});
  CHECK_FALSE(all6.allows(ip("2001:db8::1")));
  CHECK_FALSE(all6.allows(ip("192.0.2.1")));  // ::/0 holds the mapped IPv4 addresses too
  const AddressAcl host = acl({"::/0"}, {"2001:db8::1/128"});
  CHECK_FALSE(host.allows(ip("2001:db8::1")));
  CHECK(host.allows(ip("2001:db8::2")));
}

TEST_CASE("edge: client keys mask to the listener's prefixes and name their block") {
  const ClientKey a = client_key(ip("192.0.2.77"), 1, 24, 64);
  const ClientKey b = client_key(ip("192.0.2.1"), 1, 24, 64);
  const ClientKey c = client_key(ip("192.0.3.1"), 1, 24, 64);
  CHECK(a == b);
  CHECK_FALSE(a == c);
  CHECK(a.to_string() == "192.0.2.0/24");
  CHECK_FALSE(client_key(ip("192.0.2.77"), 2, 24, 64) == a);  // another listener
  const ClientKey v6a = client_key(ip("2001:db8:1:2::1"), 1, 32, 64);
  const ClientKey v6b = client_key(ip("2001:db8:1:2:ffff::9"), 1, 32, 64);
  CHECK(v6a == v6b);
  CHECK(v6a.to_string() == "2001:db8:1:2::/64");
  CHECK(ClientKeyHash{}(v6a) == ClientKeyHash{}(v6b));
  CHECK(client_key(ip("192.0.2.77"), 1, 32, 64).to_string() == "192.0.2.77/32");
}

TEST_CASE("edge: rates parse as COUNT/PERIOD and refuse nonsense") {
  std::string err;
  auto r = parse_rate("30/1m", err);
  REQUIRE(r);
  CHECK(r->count == 30);
  CHECK(r->period == Millis(60000));
  CHECK(r->to_string() == "30/1m");
  CHECK(r->interval_us() == 2000000);
  for (const char* bad :
       {"", "30", "/1m", "0/1m", "30/0s", "30/500ms", "x/1m", "30/1y", "-1/1m", "30/2d", "1000001/1s"}) {
    err.clear();
    CHECK_MESSAGE(!parse_rate(bad, err), bad);
    CHECK_FALSE(err.empty());
  }
}

TEST_CASE("edge: the rate limiter takes COUNT at once, then one per PERIOD/COUNT") {
  std::string err;
  const RateSpec r = *parse_rate("30/1m", err);
  Gcra g;
  const int64_t t0 = 1'000'000'000;
  for (int i = 0; i < 30; ++i) CHECK(g.admit(r, t0));
  CHECK_FALSE(g.admit(r, t0));  // the 31st in the period
  CHECK_FALSE(g.admit(r, t0 + 1'999'000));
  CHECK(g.admit(r, t0 + 2'000'000));  // one interval later
  CHECK_FALSE(g.admit(r, t0 + 2'000'000));
  // A full period of silence refills the whole burst.
  for (int i = 0; i < 30; ++i) CHECK(g.admit(r, t0 + 62'000'000));
  CHECK_FALSE(g.admit(r, t0 + 62'000'000));
  // Many per second: sub-millisecond intervals do not round to "no limit".
  const RateSpec fast = *parse_rate("5000/1s", err);
  Gcra f;
  int taken = 0;
  for (int i = 0; i < 20000; ++i) taken += f.admit(fast, t0);
  CHECK(taken == 5000);
}

TEST_CASE("edge: the client table counts open sessions per key and enforces the limits") {
  ClientTable t(1000);
  ClientLimits lim;
  lim.max_concurrent = 10;
  const ClientKey k = client_key(ip("192.0.2.1"), 1, 32, 64);
  const ClientKey other = client_key(ip("192.0.2.2"), 1, 32, 64);
  std::vector<ClientTable::Entry*> pins;
  for (int i = 0; i < 10; ++i) {
    auto a = t.admit(k, lim, 0, false);
    REQUIRE(a.verdict == ClientTable::Verdict::ok);
    REQUIRE(a.pin);
    pins.push_back(a.pin);
  }
  auto eleventh = t.admit(k, lim, 0, false);
  CHECK(eleventh.verdict == ClientTable::Verdict::over_concurrent);
  CHECK(eleventh.pin == nullptr);
  CHECK(t.admit(other, lim, 0, false).verdict == ClientTable::Verdict::ok);  // another key is unaffected
  // Dry run: admitted, and the verdict says what a real run would do.
  auto dry = t.admit(k, lim, 0, true);
  CHECK(dry.verdict == ClientTable::Verdict::over_concurrent);
  REQUIRE(dry.pin);
  t.release(dry.pin);
  t.release(pins.back());
  pins.pop_back();
  CHECK(t.admit(k, lim, 0, false).verdict == ClientTable::Verdict::ok);
  const auto top = t.top(1, 0);
  REQUIRE(top.size() == 1);
  CHECK(top[0].key == k);
  CHECK(top[0].sessions == 10);

  ClientLimits rate;
  std::string err;
  rate.rate = *parse_rate("3/1s", err);
  const ClientKey r = client_key(ip("2001:db8::1"), 1, 32, 64);
  for (int i = 0; i < 3; ++i) t.release(t.admit(r, rate, 5000, false).pin);
  CHECK(t.admit(r, rate, 5000, false).verdict == ClientTable::Verdict::over_rate);
  CHECK(t.admit(r, rate, 5334, false).verdict == ClientTable::Verdict::ok);  // one third of a second later
}

TEST_CASE("edge: the client table stays bounded, evicts the least recently seen, never a pinned or limited key") {
  ClientTable t(ClientTable::kShards * 4);  // 4 keys per shard
  ClientLimits lim;
  lim.max_concurrent = 2;
  std::string err;
  lim.rate = *parse_rate("2/1m", err);
  // A key over its concurrency limit (pinned) and one over its rate (no open session).
  const ClientKey pinned = client_key(ip("192.0.2.1"), 1, 32, 64);
  const ClientKey limited = client_key(ip("192.0.2.2"), 1, 32, 64);
  auto p1 = t.admit(pinned, lim, 0, false);
  auto p2 = t.admit(pinned, lim, 0, false);
  REQUIRE((p1.pin && p2.pin));
  t.release(t.admit(limited, lim, 0, false).pin);
  t.release(t.admit(limited, lim, 0, false).pin);
  CHECK(t.admit(limited, lim, 0, false).verdict == ClientTable::Verdict::over_rate);
  // A flood of distinct keys, each one session that ends at once.
  const ClientLimits conc_only{2, {}};
  for (uint32_t i = 0; i < 100000; ++i) {
    Addr128 a = ip("2001:db8::");
    a.lo = uint64_t(i) << 16;
    auto adm = t.admit(client_key(a, 1, 32, 128), conc_only, 1, false);
    REQUIRE(adm.pin);
    t.release(adm.pin);
  }
  CHECK(t.size() <= ClientTable::kShards * 4 + 2);
  CHECK(t.evictions() >= 100000 - ClientTable::kShards * 4);
  // Both limits still hold.
  CHECK(t.admit(pinned, lim, 2, false).verdict == ClientTable::Verdict::over_concurrent);
  CHECK(t.admit(limited, lim, 2, false).verdict == ClientTable::Verdict::over_rate);
  t.release(p1.pin);
  t.release(p2.pin);
}

TEST_CASE("edge: the client table holds its limits under concurrent workers") {
  ClientTable t(10000);
  ClientLimits lim;
  lim.max_concurrent = 5;
  const ClientKey k = client_key(ip("192.0.2.9"), 1, 32, 64);
  std::atomic<int> peak{0}, open{0}, admitted{0};
  auto worker = [&] {
    for (int i = 0; i < 20000; ++i) {
      auto a = t.admit(k, lim, 0, false);
      if (!a.pin) continue;
      admitted.fetch_add(1);
      const int now = open.fetch_add(1) + 1;
      int p = peak.load();
      while (now > p && !peak.compare_exchange_weak(p, now)) {
      }
      open.fetch_sub(1);
      t.release(a.pin);
    }
  };
  std::thread a(worker), b(worker), c(worker);
  a.join();
  b.join();
  c.join();
  CHECK(peak.load() <= 5);
  CHECK(admitted.load() > 0);
  CHECK(t.admit(k, lim, 0, false).pin);  // every pin was given back
}
