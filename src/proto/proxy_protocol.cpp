#include "smtplb/proto/proxy_protocol.hpp"

#include <arpa/inet.h>

#include <algorithm>
#include <cstring>

namespace smtplb::proxy {

namespace {

constexpr char kSig[12] = {'\r', '\n', '\r', '\n', '\0', '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};
constexpr std::string_view kSignature(kSig, sizeof kSig);
constexpr std::string_view kV1Prefix = "PROXY ";

std::string ip_string(const SocketAddress& a) {
  char buf[INET6_ADDRSTRLEN] = "";
  if (a.family() == AF_INET)
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&a.storage)->sin_addr, buf, sizeof buf);
  else
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&a.storage)->sin6_addr, buf, sizeof buf);
  return buf;
}

bool same_ip_family(const Header& h) {
  return !h.local && (h.source.family() == AF_INET || h.source.family() == AF_INET6) &&
         h.source.family() == h.destination.family();
}

void put16(std::string& out, uint16_t v) {
  out += char(v >> 8);
  out += char(v & 0xff);
}

ParseResult fail(std::string why) {
  ParseResult r;
  r.status = ParseResult::Status::error;
  r.error = std::move(why);
  return r;
}

bool parse_ip(std::string_view text, int family, SocketAddress& out) {
  if (text.empty() || text.size() >= INET6_ADDRSTRLEN) return false;
  // inet_pton stops at a NUL; only address characters may be there at all.
  if (text.find_first_not_of("0123456789abcdefABCDEF.:") != std::string_view::npos) return false;
  char buf[INET6_ADDRSTRLEN];
  std::memcpy(buf, text.data(), text.size());
  buf[text.size()] = '\0';
  out = SocketAddress{};
  if (family == AF_INET) {
    auto* sin = reinterpret_cast<sockaddr_in*>(&out.storage);
    if (inet_pton(AF_INET, buf, &sin->sin_addr) != 1) return false;
    sin->sin_family = AF_INET;
    out.len = sizeof(sockaddr_in);
  } else {
    auto* sin6 = reinterpret_cast<sockaddr_in6*>(&out.storage);
    if (inet_pton(AF_INET6, buf, &sin6->sin6_addr) != 1) return false;
    sin6->sin6_family = AF_INET6;
    out.len = sizeof(sockaddr_in6);
  }
  return true;
}

// A port as the spec writes it: decimal, 0..65535, no sign, no leading zeros.
bool parse_port(std::string_view text, uint16_t& port) {
  if (text.empty() || text.size() > 5 || (text.size() > 1 && text[0] == '0')) return false;
  uint32_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + uint32_t(c - '0');
  }
  if (v > 65535) return false;
  port = uint16_t(v);
  return true;
}

ParseResult parse_v1(std::string_view data) {
  const size_t lf = data.find('\n');
  if (lf == std::string_view::npos) {
    if (data.size() >= kMaxV1) return fail("v1 header longer than 107 bytes");
    ParseResult r;
    return r;  // need more
  }
  if (lf + 1 > kMaxV1) return fail("v1 header longer than 107 bytes");
  if (lf == 0 || data[lf - 1] != '\r') return fail("v1 header does not end with CRLF");
  std::string_view line = data.substr(kV1Prefix.size(), lf - 1 - kV1Prefix.size());
  ParseResult r;
  r.status = ParseResult::Status::ok;
  r.consumed = lf + 1;
  r.version = Version::v1;
  if (line.substr(0, 7) == "UNKNOWN") {
    // "PROXY UNKNOWN" may be followed by anything up to CRLF; the receiver ignores it.
    if (line.size() > 7 && line[7] != ' ') return fail("v1 header has an unknown protocol");
    r.header.local = true;
    return r;
  }
  std::string_view parts[6];
  size_t n = 0;
  for (size_t pos = 0;;) {
    if (n == 6) return fail("v1 header needs: PROXY TCP4|TCP6 SRC DST SPORT DPORT");
    const size_t sp = line.find(' ', pos);
    parts[n++] = line.substr(pos, sp == std::string_view::npos ? std::string_view::npos : sp - pos);
    if (sp == std::string_view::npos) break;
    pos = sp + 1;
  }
  bool empty_part = false;
  for (size_t i = 0; i < n; ++i) empty_part |= parts[i].empty();
  if (n != 5 || empty_part) return fail("v1 header needs: PROXY TCP4|TCP6 SRC DST SPORT DPORT");
  int family;
  if (parts[0] == "TCP4")
    family = AF_INET;
  else if (parts[0] == "TCP6")
    family = AF_INET6;
  else
    return fail("v1 header has an unknown protocol");
  uint16_t sport, dport;
  if (!parse_ip(parts[1], family, r.header.source) || !parse_ip(parts[2], family, r.header.destination))
    return fail("v1 header has a bad address for its protocol");
  if (!parse_port(parts[3], sport) || !parse_port(parts[4], dport)) return fail("v1 header has a bad port");
  r.header.source.set_port(sport);
  r.header.destination.set_port(dport);
  return r;
}

ParseResult parse_v2(std::string_view data) {
  ParseResult r;
  if (data.size() < 16) return r;  // need more
  const auto* b = reinterpret_cast<const unsigned char*>(data.data());
  if ((b[12] >> 4) != 2) return fail("v2 header has version " + std::to_string(b[12] >> 4));
  const unsigned cmd = b[12] & 0x0f;
  if (cmd > 1) return fail("v2 header has an unknown command");
  const size_t len = (size_t(b[14]) << 8) | b[15];
  if (16 + len > kMaxV2) return fail("v2 header longer than " + std::to_string(kMaxV2) + " bytes");
  if (data.size() < 16 + len) return r;  // need more
  r.status = ParseResult::Status::ok;
  r.consumed = 16 + len;
  r.version = Version::v2;
  if (cmd == 0) {  // LOCAL: the proxy's own connection; addresses, if any, are ignored
    r.header.local = true;
    return r;
  }
  const unsigned family = b[13] >> 4, transport = b[13] & 0x0f;
  if (family == 0 || family == 3) {  // UNSPEC or AF_UNIX: no IP client address
    r.header.local = true;
    return r;
  }
  if (transport != 1) return fail("v2 header is not for a stream (TCP) connection");
  const unsigned char* a = b + 16;
  if (family == 1) {
    if (len < 12) return fail("v2 header too short for IPv4 addresses");
    auto set4 = [](SocketAddress& out, const unsigned char* ip, const unsigned char* port) {
      out = SocketAddress{};
      auto* sin = reinterpret_cast<sockaddr_in*>(&out.storage);
      sin->sin_family = AF_INET;
      std::memcpy(&sin->sin_addr, ip, 4);
      std::memcpy(&sin->sin_port, port, 2);
      out.len = sizeof(sockaddr_in);
    };
    set4(r.header.source, a, a + 8);
    set4(r.header.destination, a + 4, a + 10);
  } else if (family == 2) {
    if (len < 36) return fail("v2 header too short for IPv6 addresses");
    auto set6 = [](SocketAddress& out, const unsigned char* ip, const unsigned char* port) {
      out = SocketAddress{};
      auto* sin6 = reinterpret_cast<sockaddr_in6*>(&out.storage);
      sin6->sin6_family = AF_INET6;
      std::memcpy(&sin6->sin6_addr, ip, 16);
      std::memcpy(&sin6->sin6_port, port, 2);
      out.len = sizeof(sockaddr_in6);
    };
    set6(r.header.source, a, a + 32);
    set6(r.header.destination, a + 16, a + 34);
  } else {
    return fail("v2 header has an unknown address family");
  }
  // TLVs after the addresses are skipped: smtplb needs none of them.
  return r;
}

}  // namespace

std::string encode(Version v, const Header& h) {
  const bool ip = same_ip_family(h);
  if (v == Version::v1) {
    if (!ip) return "PROXY UNKNOWN\r\n";
    return std::string("PROXY ") + (h.source.family() == AF_INET ? "TCP4 " : "TCP6 ") + ip_string(h.source) + " " +
           ip_string(h.destination) + " " + std::to_string(h.source.port()) + " " +
           std::to_string(h.destination.port()) + "\r\n";
  }
  std::string out(kSignature);
  if (!ip) {
    out += char(0x20);  // version 2, LOCAL
    out += char(0x00);  // UNSPEC
    put16(out, 0);
    return out;
  }
  out += char(0x21);  // version 2, PROXY
  if (h.source.family() == AF_INET) {
    out += char(0x11);  // AF_INET, STREAM
    put16(out, 12);
    const auto* s = reinterpret_cast<const sockaddr_in*>(&h.source.storage);
    const auto* d = reinterpret_cast<const sockaddr_in*>(&h.destination.storage);
    out.append(reinterpret_cast<const char*>(&s->sin_addr), 4);
    out.append(reinterpret_cast<const char*>(&d->sin_addr), 4);
  } else {
    out += char(0x21);  // AF_INET6, STREAM
    put16(out, 36);
    const auto* s = reinterpret_cast<const sockaddr_in6*>(&h.source.storage);
    const auto* d = reinterpret_cast<const sockaddr_in6*>(&h.destination.storage);
    out.append(reinterpret_cast<const char*>(&s->sin6_addr), 16);
    out.append(reinterpret_cast<const char*>(&d->sin6_addr), 16);
  }
  put16(out, h.source.port());
  put16(out, h.destination.port());
  return out;
}

ParseResult parse(std::string_view data, Accept accept) {
  if (data.empty()) return {};
  // Decide the version from as many bytes as are there; a prefix that still matches a
  // signature needs more bytes, anything else is not a PROXY header at all.
  const size_t n1 = std::min(data.size(), kV1Prefix.size());
  const size_t n2 = std::min(data.size(), kSignature.size());
  const bool maybe_v1 = accept != Accept::v2 && data.substr(0, n1) == kV1Prefix.substr(0, n1);
  const bool maybe_v2 = accept != Accept::v1 && data.substr(0, n2) == kSignature.substr(0, n2);
  if (maybe_v1) return data.size() < kV1Prefix.size() ? ParseResult{} : parse_v1(data);
  if (maybe_v2) return data.size() < kSignature.size() ? ParseResult{} : parse_v2(data);
  switch (accept) {
    case Accept::v1:
      return fail("expected a PROXY v1 header");
    case Accept::v2:
      return fail("expected a PROXY v2 header");
    case Accept::any:
      break;
  }
  return fail("expected a PROXY header");
}

}  // namespace smtplb::proxy
