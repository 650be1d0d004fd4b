#pragma once
// Client addresses as the edge defences see them: one 128-bit space in which an IPv4
// address is its IPv4-mapped IPv6 form (::ffff:a.b.c.d), so IPv4, IPv6 and v4-mapped
// clients meet the same rules, and an IPv4 block /n is the mapped block /96+n.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "smtplb/config/config.hpp"

namespace smtplb {

struct Addr128 {
  uint64_t hi = 0, lo = 0;
  friend bool operator==(const Addr128&, const Addr128&) = default;
};

// The address of `a` in the common space; false for a family that is neither.
bool to_addr128(const SocketAddress& a, Addr128& out);
// A block of the common space: its network and prefix length (0..128).
void to_block128(const Cidr& c, Addr128& net, unsigned& prefix);
// `a` with every bit after the first `prefix` cleared.
Addr128 mask128(const Addr128& a, unsigned prefix);
// True when the address is an IPv4 address in its mapped form.
inline bool is_v4(const Addr128& a) {
  return a.hi == 0 && (a.lo >> 32) == 0xffffu;
}

// The key under which a client is counted: its address masked to the listener's
// client_prefix_v4 / client_prefix_v6, and the listener (limits are per listener).
struct ClientKey {
  Addr128 net;
  uint32_t listener = 0;  // ListenerState::id
  uint8_t prefix = 128;   // in the common space
  friend bool operator==(const ClientKey&, const ClientKey&) = default;
  // "192.0.2.0/24" or "2001:db8:1:2::/64".
  std::string to_string() const;
};

ClientKey client_key(const Addr128& a, uint32_t listener, unsigned prefix_v4, unsigned prefix_v6);

// The key of source affinity (algorithm = "source"): the client's address masked to the
// pool's hash_prefix_v4 / hash_prefix_v6, and its hash, the same on every host and build
// (so two balancers agree). Not per listener: a client reaches the same server through
// any listener of the pool.
struct SourceKey {
  Addr128 net;
  uint8_t prefix = 128;  // in the common space
  uint64_t hash = 0;
  // "192.0.2.0/24" or "2001:db8:1:2::/64".
  std::string to_string() const { return ClientKey{net, 0, prefix}.to_string(); }
};

SourceKey source_key(const Addr128& a, unsigned prefix_v4, unsigned prefix_v6);

struct ClientKeyHash {
  size_t operator()(const ClientKey& k) const {
    // splitmix64 over the words: keys of one /64 differ only in a few bits.
    auto mix = [](uint64_t x) {
      x += 0x9e3779b97f4a7c15ull;
      x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
      x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
      return x ^ (x >> 31);
    };
    return size_t(mix(k.net.hi ^ mix(k.net.lo ^ mix(uint64_t(k.listener) << 8 | k.prefix))));
  }
};

}  // namespace smtplb
