// What the edge defences cost per accepted session, measured on their pure cores: the
// ACL lookup and the client table's admit + release (the only work check_edge adds to a
// session), with a full table, one thread and two at once. scripts/bench.py --edge prints
// it next to the proxies' CPU per message, so the share of a message's cost is plain.
// usage: edge_cost [KEYS]   (default 100000: the table holds KEYS keys, capacity KEYS)
#include <arpa/inet.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "smtplb/edge/address.hpp"
#include "smtplb/edge/address_acl.hpp"
#include "smtplb/edge/client_table.hpp"
#include "smtplb/edge/rate_limit.hpp"

using namespace smtplb;
using Clock = std::chrono::steady_clock;

namespace {

Addr128 v4(uint32_t host_order) {
  SocketAddress s;
  sockaddr_in in{};
  in.sin_family = AF_INET;
  in.sin_addr.s_addr = htonl(host_order);
  std::memcpy(&s.storage, &in, sizeof in);
  s.len = sizeof in;
  Addr128 a;
  to_addr128(s, a);
  return a;
}

template <class F>
double ns_per_op(size_t ops, F&& f) {
  // The best of five: the least disturbed by other processes on a shared machine.
  double best = 1e18;
  for (int round = 0; round < 5; ++round) {
    const auto t0 = Clock::now();
    f(ops);
    const double ns = std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / double(ops);
    best = std::min(best, ns);
  }
  return best;
}

volatile bool sink;

}  // namespace

int main(int argc, char** argv) {
  const size_t keys = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 100000;
  std::mt19937_64 rng(42);
  std::vector<Addr128> addrs(keys);
  for (auto& a : addrs) a = v4(uint32_t(rng()));

  // 1. ACL: a deny list of 1 100 blocks of mixed lengths (/8 to /32), as a large MX might carry.
  std::vector<Cidr> allow, deny;  // no allow list: an MX takes the whole internet
  for (int i = 0; i < 1100; ++i) {
    const unsigned len = 8 + unsigned(rng() % 25);
    const uint32_t net = uint32_t(rng()) & ~uint32_t(0xFFFFFFFFull >> len);  // no host bits
    char text[40];
    std::snprintf(text, sizeof text, "%u.%u.%u.%u/%u", net >> 24, (net >> 16) & 255, (net >> 8) & 255, net & 255, len);
    Cidr c;
    if (!parse_cidr(text, c)) continue;
    deny.push_back(c);
  }
  const AddressAcl acl(allow, deny);
  const double acl_ns = ns_per_op(1'000'000, [&](size_t n) {
    for (size_t i = 0; i < n; ++i) sink = acl.allows(addrs[i % keys]);
  });

  // 2. The table, filled with `keys` keys (capacity `keys`), limits on (never reached).
  ClientTable table(keys);
  std::string err;
  const ClientLimits limits{50, *parse_rate("1000000/1s", err)};
  int64_t now = 1'000'000;
  for (size_t i = 0; i < keys; ++i) {
    auto adm = table.admit(client_key(addrs[i], 1, 32, 64), limits, now, false);
    if (adm.pin) table.release(adm.pin);
  }
  const double hit_ns = ns_per_op(1'000'000, [&](size_t n) {
    for (size_t i = 0; i < n; ++i) {
      auto adm = table.admit(client_key(addrs[(i * 7919) % keys], 1, 32, 64), limits, now, false);
      if (adm.pin) table.release(adm.pin);
    }
  });
  // New keys into the full table: each admit evicts the least recently seen.
  uint32_t fresh = 0;
  const double miss_ns = ns_per_op(200'000, [&](size_t n) {
    for (size_t i = 0; i < n; ++i) {
      auto adm = table.admit(client_key(v4(0xC6336400u + ++fresh), 2, 32, 64), limits, now, false);
      if (adm.pin) table.release(adm.pin);
    }
  });
  // Two threads at once (the two workers of a 2-core machine), known keys.
  const double two_ns = ns_per_op(1'000'000, [&](size_t n) {
    auto run = [&](size_t offset) {
      for (size_t i = 0; i < n / 2; ++i) {
        auto adm = table.admit(client_key(addrs[(i * 7919 + offset) % keys], 1, 32, 64), limits, now, false);
        if (adm.pin) table.release(adm.pin);
      }
    };
    std::thread t(run, keys / 2);
    run(0);
    t.join();
  });

  std::printf("edge_cost: table %zu keys (capacity %zu), %zu entries after the runs, %llu evictions\n", keys, keys,
              table.size(), static_cast<unsigned long long>(table.evictions()));
  std::printf("acl_ns %.1f  (deny list of %zu blocks)\n", acl_ns, deny.size());
  std::printf("admit_release_known_ns %.1f\n", hit_ns);
  std::printf("admit_release_new_key_evicting_ns %.1f\n", miss_ns);
  std::printf("admit_release_two_threads_ns %.1f  (wall time per session, both threads together)\n", two_ns);
  std::printf("per_session_ns %.1f  (acl + admit/release of a new key: the dearer path)\n", acl_ns + miss_ns);
  return 0;
}
