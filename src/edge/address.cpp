#include "smtplb/edge/address.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstring>

#include "smtplb/lb/source_hash.hpp"

namespace smtplb {

namespace {

uint64_t load_be64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = v << 8 | p[i];
  return v;
}

void store_be64(unsigned char* p, uint64_t v) {
  for (int i = 7; i >= 0; --i) {
    p[i] = static_cast<unsigned char>(v);
    v >>= 8;
  }
}

Addr128 from_v4(const unsigned char* b) {
  return {0, 0xffff00000000ull | uint64_t(b[0]) << 24 | uint64_t(b[1]) << 16 | uint64_t(b[2]) << 8 | b[3]};
}

}  // namespace

bool to_addr128(const SocketAddress& a, Addr128& out) {
  if (a.family() == AF_INET) {
    out = from_v4(reinterpret_cast<const unsigned char*>(&reinterpret_cast<const sockaddr_in*>(&a.storage)->sin_addr));
    return true;
  }
  if (a.family() == AF_INET6) {
    const auto* b =
        reinterpret_cast<const unsigned char*>(&reinterpret_cast<const sockaddr_in6*>(&a.storage)->sin6_addr);
    out = {load_be64(b), load_be64(b + 8)};
    return true;
  }
  return false;
}

void to_block128(const Cidr& c, Addr128& net, unsigned& prefix) {
  if (c.family == AF_INET) {
    net = from_v4(c.addr);
    prefix = 96 + c.prefix;
  } else {
    net = {load_be64(c.addr), load_be64(c.addr + 8)};
    prefix = c.prefix;
  }
  net = mask128(net, prefix);
}

Addr128 mask128(const Addr128& a, unsigned prefix) {
  if (prefix >= 128) return a;
  if (prefix == 0) return {};
  if (prefix <= 64) return {a.hi & (~0ull << (64 - prefix)), 0};
  return {a.hi, a.lo & (~0ull << (128 - prefix))};
}

ClientKey client_key(const Addr128& a, uint32_t listener, unsigned prefix_v4, unsigned prefix_v6) {
  const unsigned prefix = is_v4(a) ? 96 + prefix_v4 : prefix_v6;
  return {mask128(a, prefix), listener, uint8_t(prefix)};
}

SourceKey source_key(const Addr128& a, unsigned prefix_v4, unsigned prefix_v6) {
  const unsigned prefix = is_v4(a) ? 96 + prefix_v4 : prefix_v6;
  const Addr128 net = mask128(a, prefix);
  return {net, uint8_t(prefix), mix64(mix64(mix64(net.hi ^ 0x736d74706c62ull) ^ net.lo) ^ prefix)};
}

std::string ClientKey::to_string() const {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (is_v4(net)) {
    unsigned char b[4] = {static_cast<unsigned char>(net.lo >> 24), static_cast<unsigned char>(net.lo >> 16),
                          static_cast<unsigned char>(net.lo >> 8), static_cast<unsigned char>(net.lo)};
    inet_ntop(AF_INET, b, buf, sizeof buf);
    return std::string(buf) + "/" + std::to_string(prefix - 96);
  }
  unsigned char b[16];
  store_be64(b, net.hi);
  store_be64(b + 8, net.lo);
  inet_ntop(AF_INET6, b, buf, sizeof buf);
  return std::string(buf) + "/" + std::to_string(unsigned(prefix));
}

}  // namespace smtplb
