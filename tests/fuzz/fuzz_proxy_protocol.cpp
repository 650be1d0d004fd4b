// libFuzzer target for the PROXY protocol codec (v1 text, v2 binary). The input is the
// start of a connection from an upstream balancer, parsed with each Accept mode. The
// input also drives the encoder: its first bytes are read as a pair of addresses to be
// encoded and parsed back. Invariants are checked with abort(), so a violation is
// reported like a crash.
//
// Invariants, for each Accept mode:
//  - ok: consumed is at least the fixed part of a header, at most the input and the
//    version's limit; the version is one the listener accepts; no error text;
//  - error: an error text; need_more: none;
//  - ok and not local: both addresses of the same family, AF_INET or AF_INET6;
//  - ok: the header alone parses the same (nothing after it is looked at), and any
//    prefix of the input is need_more or the same verdict (never ok with a different
//    consumed, never ok early);
//  - ok and not local: encoding the header with the same version and parsing that gives
//    the same addresses and ports, and encoding is then stable;
//  - the encoder's output for any address pair parses back to it.
#include <arpa/inet.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "smtplb/proto/proxy_protocol.hpp"

namespace {

using smtplb::SocketAddress;
using smtplb::proxy::Accept;
using smtplb::proxy::Header;
using smtplb::proxy::ParseResult;
using smtplb::proxy::Version;
using Status = ParseResult::Status;
namespace proxy = smtplb::proxy;

// Parses an exact-size heap copy, so AddressSanitizer sees any read past the view.
ParseResult parse_copy(std::string_view data, Accept accept) {
  std::unique_ptr<char[]> buf(new char[data.size() ? data.size() : 1]);
  if (!data.empty()) std::memcpy(buf.get(), data.data(), data.size());
  return proxy::parse(std::string_view(buf.get(), data.size()), accept);
}

bool is_ip(const SocketAddress& a) {
  return a.family() == AF_INET || a.family() == AF_INET6;
}

// Family, address bytes and port (not flow info or scope, which neither version carries).
bool same_address(const SocketAddress& a, const SocketAddress& b) {
  if (a.family() != b.family() || a.port() != b.port()) return false;
  if (a.family() == AF_INET)
    return std::memcmp(&reinterpret_cast<const sockaddr_in*>(&a.storage)->sin_addr,
                       &reinterpret_cast<const sockaddr_in*>(&b.storage)->sin_addr, 4) == 0;
  if (a.family() == AF_INET6)
    return std::memcmp(&reinterpret_cast<const sockaddr_in6*>(&a.storage)->sin6_addr,
                       &reinterpret_cast<const sockaddr_in6*>(&b.storage)->sin6_addr, 16) == 0;
  return false;
}

bool same_result(const ParseResult& a, const ParseResult& b) {
  if (a.status != b.status) return false;
  if (a.status != Status::ok) return true;
  if (a.consumed != b.consumed || a.version != b.version || a.header.local != b.header.local) return false;
  return a.header.local ||
         (same_address(a.header.source, b.header.source) && same_address(a.header.destination, b.header.destination));
}

bool accepts(Accept accept, Version v) {
  return accept == Accept::any || (accept == Accept::v1) == (v == Version::v1);
}

size_t limit(Version v) {
  return v == Version::v1 ? proxy::kMaxV1 : proxy::kMaxV2;
}

// Encodes h (an IP pair) with v, parses it back and checks it is h again.
void check_round_trip(const Header& h, Version v) {
  const std::string wire = proxy::encode(v, h);
  FUZZ_CHECK(wire.size() <= limit(v));
  const std::string with_tail = wire + "EHLO x\r\n";
  for (Accept accept : {v == Version::v1 ? Accept::v1 : Accept::v2, Accept::any}) {
    const ParseResult r = parse_copy(with_tail, accept);
    FUZZ_CHECK(r.status == Status::ok);
    FUZZ_CHECK(r.consumed == wire.size());
    FUZZ_CHECK(r.version == v);
    FUZZ_CHECK(!r.header.local);
    FUZZ_CHECK(same_address(r.header.source, h.source));
    FUZZ_CHECK(same_address(r.header.destination, h.destination));
    FUZZ_CHECK(proxy::encode(v, r.header) == wire);
  }
}

void check_parse(std::string_view data, Accept accept) {
  const ParseResult r = parse_copy(data, accept);
  switch (r.status) {
    case Status::need_more:
      FUZZ_CHECK(r.error.empty());
      // Undecided input is short: the signature or the fixed part, a v1 line before its
      // 107th byte, or a v2 header within its limit.
      FUZZ_CHECK(data.size() < proxy::kMaxV2);
      break;
    case Status::error:
      FUZZ_CHECK(!r.error.empty());
      break;
    case Status::ok:
      FUZZ_CHECK(r.error.empty());
      FUZZ_CHECK(accepts(accept, r.version));
      FUZZ_CHECK(r.consumed <= data.size());
      FUZZ_CHECK(r.consumed <= limit(r.version));
      FUZZ_CHECK(r.consumed >= (r.version == Version::v1 ? size_t(15) : size_t(16)));
      if (r.version == Version::v1) {
        FUZZ_CHECK(data.substr(0, 6) == "PROXY ");
        FUZZ_CHECK(data.substr(r.consumed - 2, 2) == "\r\n");
      } else {
        FUZZ_CHECK(data.substr(0, 12) == std::string_view("\r\n\r\n\0\r\nQUIT\n", 12));
      }
      if (!r.header.local) {
        FUZZ_CHECK(is_ip(r.header.source));
        FUZZ_CHECK(r.header.source.family() == r.header.destination.family());
        // The re-encoded header parses to the same addresses and encodes stably.
        check_round_trip(r.header, r.version);
        if (r.version == Version::v1) {
          // A TCP4/TCP6 line holds nothing but the protocol, addresses, ports and spaces.
          const std::string_view line = data.substr(6, r.consumed - 2 - 6);
          for (char c : line) FUZZ_CHECK(c != '\0' && std::strchr("TCP46 0123456789abcdefABCDEF:.", c) != nullptr);
        } else {
          // The fixed part is what the encoder writes for that pair.
          const std::string wire = proxy::encode(Version::v2, r.header);
          FUZZ_CHECK(wire.size() <= r.consumed);
          FUZZ_CHECK(data.substr(0, 16 - 2) == std::string_view(wire).substr(0, 16 - 2));
        }
      } else {
        FUZZ_CHECK(!is_ip(r.header.source) && !is_ip(r.header.destination));
      }
      // The header alone gives the same verdict: nothing after it was looked at.
      FUZZ_CHECK(same_result(parse_copy(data.substr(0, r.consumed), accept), r));
      break;
  }

  // Growing prefixes: need_more, or the same verdict as the whole input. Every prefix is
  // tried up to a little past the header (or past a v1 line's limit), then those around
  // where a v2 header would end, then a few more.
  auto check_prefix = [&](size_t n) {
    if (n > data.size()) return;
    const ParseResult p = parse_copy(data.substr(0, n), accept);
    if (p.status == Status::need_more) {
      // An ok input is undecided only before its header is complete.
      if (r.status == Status::ok) FUZZ_CHECK(n < r.consumed);
      return;
    }
    FUZZ_CHECK(same_result(p, r));
    if (r.status == Status::ok) FUZZ_CHECK(n >= r.consumed);
  };
  const size_t horizon = std::min(data.size(), r.status == Status::ok ? r.consumed + 2 : proxy::kMaxV1 + 2);
  for (size_t n = 0; n <= horizon; ++n) check_prefix(n);
  if (data.size() >= 16) {
    const size_t end = 16 + ((size_t(uint8_t(data[14])) << 8) | uint8_t(data[15]));
    for (size_t n = end - 2; n <= end + 1; ++n) check_prefix(n);
  }
  for (size_t n = horizon + 1; n < data.size(); n = n * 2 + 1) check_prefix(n);
  check_prefix(data.size() - (data.empty() ? 0 : 1));
}

// A header built from raw bytes: byte 0 picks the families, then up to 2 x 16 address
// bytes and 2 x 2 port bytes.
void check_encoder(std::string_view data) {
  if (data.size() < 1 + 32 + 4) return;
  const auto* b = reinterpret_cast<const unsigned char*>(data.data());
  const bool six = b[0] & 1;
  Header h;
  h.local = (b[0] & 0x06) == 0x06;
  for (int i = 0; i < 2; ++i) {
    SocketAddress& a = i == 0 ? h.source : h.destination;
    const uint16_t port = uint16_t((b[33 + 2 * i] << 8) | b[34 + 2 * i]);
    if (six) {
      auto* sin6 = reinterpret_cast<sockaddr_in6*>(&a.storage);
      sin6->sin6_family = AF_INET6;
      std::memcpy(&sin6->sin6_addr, b + 1 + 16 * i, 16);
      // Flow info and scope are not carried; they must not disturb the encoding.
      sin6->sin6_flowinfo = b[0];
      sin6->sin6_scope_id = b[0] >> 4;
      a.len = sizeof(sockaddr_in6);
    } else {
      auto* sin = reinterpret_cast<sockaddr_in*>(&a.storage);
      sin->sin_family = AF_INET;
      std::memcpy(&sin->sin_addr, b + 1 + 16 * i, 4);
      a.len = sizeof(sockaddr_in);
    }
    a.set_port(port);
    FUZZ_CHECK(a.port() == port);
  }
  if (b[0] & 0x08) h.destination.set_family(six ? AF_INET : AF_INET6);  // a mixed pair
  const bool ip_pair = !h.local && h.source.family() == h.destination.family();
  for (Version v : {Version::v1, Version::v2}) {
    if (ip_pair) {
      check_round_trip(h, v);
    } else {
      const std::string wire = proxy::encode(v, h);
      const ParseResult r = parse_copy(wire, Accept::any);
      FUZZ_CHECK(r.status == Status::ok && r.header.local && r.consumed == wire.size() && r.version == v);
      FUZZ_CHECK(wire.size() == (v == Version::v1 ? size_t(15) : size_t(16)));
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  const std::string_view data(reinterpret_cast<const char*>(bytes), size);
  for (Accept accept : {Accept::v1, Accept::v2, Accept::any}) check_parse(data, accept);

  // The listener modes agree: "any" takes what a single-version listener takes.
  const ParseResult any = proxy::parse(data, Accept::any);
  const ParseResult v1 = proxy::parse(data, Accept::v1);
  const ParseResult v2 = proxy::parse(data, Accept::v2);
  if (v1.status != Status::error) FUZZ_CHECK(same_result(v1, any));
  if (v2.status != Status::error) FUZZ_CHECK(same_result(v2, any));
  FUZZ_CHECK(v1.status == Status::error || v2.status == Status::error || data.empty());

  check_encoder(data);
  return 0;
}
