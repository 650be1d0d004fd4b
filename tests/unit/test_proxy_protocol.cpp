#include <doctest/doctest.h>

#include <arpa/inet.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "smtplb/proto/proxy_protocol.hpp"

using smtplb::SocketAddress;
using smtplb::proxy::Accept;
using smtplb::proxy::encode;
using smtplb::proxy::Header;
using smtplb::proxy::kMaxV1;
using smtplb::proxy::kMaxV2;
using smtplb::proxy::parse;
using smtplb::proxy::ParseResult;
using smtplb::proxy::Version;
using Status = ParseResult::Status;

namespace {

using namespace std::string_literals;

constexpr Accept kAllAccepts[] = {Accept::v1, Accept::v2, Accept::any};

// The v2 signature; a std::string because of the NUL in the middle.
const std::string kSig = "\r\n\r\n\0\r\nQUIT\n"s;

SocketAddress ip4(const char* ip, uint16_t port) {
  SocketAddress a;
  auto* sin = reinterpret_cast<sockaddr_in*>(&a.storage);
  sin->sin_family = AF_INET;
  REQUIRE(inet_pton(AF_INET, ip, &sin->sin_addr) == 1);
  sin->sin_port = htons(port);
  a.len = sizeof(sockaddr_in);
  return a;
}

SocketAddress ip6(const char* ip, uint16_t port) {
  SocketAddress a;
  auto* sin6 = reinterpret_cast<sockaddr_in6*>(&a.storage);
  sin6->sin6_family = AF_INET6;
  REQUIRE(inet_pton(AF_INET6, ip, &sin6->sin6_addr) == 1);
  sin6->sin6_port = htons(port);
  a.len = sizeof(sockaddr_in6);
  return a;
}

Header header(SocketAddress src, SocketAddress dst) {
  Header h;
  h.source = src;
  h.destination = dst;
  return h;
}

// Raw bytes, so a test can spell a v2 header as a list of octets.
std::string bytes(std::initializer_list<int> octets) {
  std::string out;
  for (int o : octets) out += char(uint8_t(o));
  return out;
}

// A v2 header: signature, version/command, family/transport, big-endian length of body.
std::string v2(uint8_t ver_cmd, uint8_t fam, const std::string& body) {
  std::string out = kSig;
  out += char(ver_cmd);
  out += char(fam);
  out += char(body.size() >> 8);
  out += char(body.size() & 0xff);
  return out + body;
}

std::string v2_len(uint8_t ver_cmd, uint8_t fam, uint16_t len) {
  return kSig + bytes({ver_cmd, fam, len >> 8, len & 0xff});
}

// The spec's example connection 192.168.0.1:56324 -> 192.168.0.11:443, as v2 address block.
const std::string kV2Tcp4Addrs = bytes({192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb});

// 2001:db8::1:56324 -> 2001:db8::2:25.
const std::string kV2Tcp6Addrs = bytes({0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,  //
                                        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,  //
                                        0xdc, 0x04, 0x00, 0x19});

// Two TLVs: PP2_TYPE_ALPN "smtp" and PP2_TYPE_NOOP with three bytes of padding.
const std::string kTlvs = bytes({0x01, 0x00, 0x04, 's', 'm', 't', 'p', 0x04, 0x00, 0x03, 0, 0, 0});

ParseResult ok_parse(std::string_view data, Accept accept, size_t consumed) {
  const ParseResult r = parse(data, accept);
  REQUIRE_MESSAGE(r.status == Status::ok, r.error);
  CHECK(r.consumed == consumed);
  CHECK(r.error.empty());
  return r;
}

// The input with control bytes escaped, for failure messages.
std::string escaped(std::string_view data) {
  static const char hex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : data) {
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += char(c);
    } else {
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

void check_error(std::string_view data, Accept accept = Accept::any) {
  const ParseResult r = parse(data, accept);
  CHECK_MESSAGE(r.status == Status::error, "input: ", escaped(data));
  if (r.status == Status::error) CHECK(!r.error.empty());
}

// Feeds growing prefixes of header + tail: need_more for every proper prefix of the header
// (never ok early, never an error), then ok with consumed == header.size() from the
// complete header on, whatever follows it.
void check_every_split(const std::string& hdr, Accept accept, const std::string& tail = "EHLO client.example\r\n") {
  const std::string data = hdr + tail;
  for (size_t i = 0; i <= data.size(); ++i) {
    CAPTURE(i);
    // An exact-size copy, so a read past the end of the view is a real out-of-bounds read.
    const std::vector<char> buf(data.begin(), data.begin() + long(i));
    const ParseResult r = parse(std::string_view(buf.data(), buf.size()), accept);
    if (i < hdr.size()) {
      REQUIRE_MESSAGE(r.status == Status::need_more, r.error);
    } else {
      REQUIRE_MESSAGE(r.status == Status::ok, r.error);
      REQUIRE(r.consumed == hdr.size());
    }
  }
}

bool same_address(const SocketAddress& a, const SocketAddress& b) {
  if (a.family() != b.family()) return false;
  if (a.port() != b.port()) return false;
  if (a.family() == AF_INET)
    return std::memcmp(&reinterpret_cast<const sockaddr_in*>(&a.storage)->sin_addr,
                       &reinterpret_cast<const sockaddr_in*>(&b.storage)->sin_addr, 4) == 0;
  if (a.family() == AF_INET6)
    return std::memcmp(&reinterpret_cast<const sockaddr_in6*>(&a.storage)->sin6_addr,
                       &reinterpret_cast<const sockaddr_in6*>(&b.storage)->sin6_addr, 16) == 0;
  return false;
}

const std::string kV1Tcp4 = "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
const std::string kFfff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";  // 39 characters

}  // namespace

// ---------------------------------------------------------------------------------------
// v1

TEST_CASE("proxy v1: the spec's TCP4 example") {
  for (Accept accept : {Accept::v1, Accept::any}) {
    const ParseResult r = ok_parse(kV1Tcp4, accept, kV1Tcp4.size());
    CHECK(r.version == Version::v1);
    CHECK_FALSE(r.header.local);
    CHECK(r.header.source.family() == AF_INET);
    CHECK(r.header.destination.family() == AF_INET);
    CHECK(r.header.source.to_string() == "192.168.0.1:56324");
    CHECK(r.header.destination.to_string() == "192.168.0.11:443");
    CHECK(r.header.source.len == sizeof(sockaddr_in));
  }
}

TEST_CASE("proxy v1: longest TCP4 line (56 bytes)") {
  const std::string line = "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
  REQUIRE(line.size() == 56);
  const ParseResult r = ok_parse(line, Accept::v1, 56);
  CHECK(r.header.source.to_string() == "255.255.255.255:65535");
  CHECK(r.header.destination.to_string() == "255.255.255.255:65535");
}

TEST_CASE("proxy v1: TCP6, including the spec's longest TCP6 line (104 bytes with CRLF)") {
  const std::string line = "PROXY TCP6 2001:db8::1 2001:db8::2 56324 25\r\n";
  ParseResult r = ok_parse(line, Accept::any, line.size());
  CHECK(r.version == Version::v1);
  CHECK_FALSE(r.header.local);
  CHECK(r.header.source.family() == AF_INET6);
  CHECK(r.header.destination.family() == AF_INET6);
  CHECK(r.header.source.to_string() == "[2001:db8::1]:56324");
  CHECK(r.header.destination.to_string() == "[2001:db8::2]:25");
  CHECK(r.header.source.len == sizeof(sockaddr_in6));

  // 5 + 1 + 4 + 1 + 39 + 1 + 39 + 1 + 5 + 1 + 5 + 2 = 104 (the spec counts the CRLF).
  const std::string longest = "PROXY TCP6 " + kFfff + " " + kFfff + " 65535 65535\r\n";
  REQUIRE(longest.size() == 104);
  r = ok_parse(longest, Accept::v1, 104);
  CHECK(r.header.source.to_string() == "[" + kFfff + "]:65535");
  CHECK(r.header.destination.to_string() == "[" + kFfff + "]:65535");
  check_every_split(longest, Accept::v1);

  // Compressed forms, the unspecified address and IPv4-mapped addresses are all TCP6.
  r = ok_parse("PROXY TCP6 :: ::1 0 1\r\n", Accept::v1, 23);
  CHECK(r.header.source.to_string() == "[::]:0");
  CHECK(r.header.destination.to_string() == "[::1]:1");
  r = ok_parse("PROXY TCP6 ::ffff:192.0.2.1 ::ffff:192.0.2.2 1 2\r\n", Accept::v1, 50);
  CHECK(r.header.source.family() == AF_INET6);
  CHECK(r.header.source.to_string() == "[::ffff:192.0.2.1]:1");
}

TEST_CASE("proxy v1: UNKNOWN, short and long forms, with and without trailing data") {
  ParseResult r = ok_parse("PROXY UNKNOWN\r\n", Accept::v1, 15);
  CHECK(r.version == Version::v1);
  CHECK(r.header.local);
  CHECK(r.header.source.family() == AF_UNSPEC);
  CHECK(r.header.destination.family() == AF_UNSPEC);

  r = ok_parse("PROXY UNKNOWN\r\nEHLO client.example\r\n", Accept::any, 15);
  CHECK(r.header.local);

  // The receiver ignores whatever follows UNKNOWN up to the CRLF.
  r = ok_parse("PROXY UNKNOWN 192.168.0.1 192.168.0.11 56324 443\r\nQUIT\r\n", Accept::v1, 50);
  CHECK(r.header.local);

  // The spec's worst case is exactly 107 bytes and must be accepted.
  const std::string worst = "PROXY UNKNOWN " + kFfff + " " + kFfff + " 65535 65535\r\n";
  REQUIRE(worst.size() == 107);
  REQUIRE(worst.size() == kMaxV1);
  r = ok_parse(worst, Accept::v1, 107);
  CHECK(r.header.local);
  check_every_split(worst, Accept::v1);
  check_every_split("PROXY UNKNOWN\r\n", Accept::any);

  // "UNKNOWN" must be the whole protocol word.
  check_error("PROXY UNKNOWNX\r\n");
  check_error("PROXY UNKNOWN\n");
}

TEST_CASE("proxy v1: every split position") {
  for (Accept accept : {Accept::v1, Accept::any}) {
    CAPTURE(int(accept));
    check_every_split(kV1Tcp4, accept);
    check_every_split("PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", accept);
    check_every_split("PROXY TCP6 2001:db8::1 2001:db8::2 56324 25\r\n", accept);
    // Tails that look like headers or contain line ends are not looked at.
    check_every_split(kV1Tcp4, accept, kV1Tcp4);
    check_every_split(kV1Tcp4, accept, "\n\n\r\n");
    check_every_split(kV1Tcp4, accept, kSig);
  }
}

TEST_CASE("proxy v1: bytes after the header are left unconsumed") {
  const std::string data = kV1Tcp4 + "EHLO x\r\n";
  const ParseResult r = ok_parse(data, Accept::v1, kV1Tcp4.size());
  CHECK(data.substr(r.consumed) == "EHLO x\r\n");
  // Even when the rest is long and has no line end for a while.
  ok_parse(kV1Tcp4 + std::string(5000, 'x'), Accept::any, kV1Tcp4.size());
}

TEST_CASE("proxy v1: truncated and oversized lines") {
  // No LF yet and fewer than 107 bytes: wait.
  for (const std::string& partial :
       {"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443"s, "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r"s, "PROXY "s,
        "PROXY " + std::string(100, 'x')}) {
    CAPTURE(partial);
    REQUIRE(partial.size() < kMaxV1);
    CHECK(parse(partial, Accept::v1).status == Status::need_more);
    CHECK(parse(partial, Accept::any).status == Status::need_more);
  }
  // 106 bytes without LF could still end in LF at byte 107; 107 bytes without LF cannot.
  const std::string long_unknown = "PROXY UNKNOWN " + std::string(200, 'f');
  CHECK(parse(std::string_view(long_unknown).substr(0, 106), Accept::v1).status == Status::need_more);
  CHECK(parse(std::string_view(long_unknown).substr(0, 107), Accept::v1).status == Status::error);
  CHECK(parse(std::string_view(long_unknown).substr(0, 108), Accept::v1).status == Status::error);
  CHECK(parse(long_unknown, Accept::any).status == Status::error);

  // A 108-byte line is refused even though its CRLF is there.
  const std::string too_long = "PROXY UNKNOWN " + kFfff + " " + kFfff + " 65535 655350\r\n";
  REQUIRE(too_long.size() == 108);
  check_error(too_long, Accept::v1);
  check_error(too_long + "EHLO x\r\n", Accept::any);
  // Same with padding in a TCP4 line.
  check_error("PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + std::string(80, ' ') + "\r\n", Accept::v1);
}

TEST_CASE("proxy v1: bad signatures") {
  for (Accept accept : {Accept::v1, Accept::any}) {
    CAPTURE(int(accept));
    check_error("PROXY\r\n", accept);
    check_error("PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", accept);
    check_error("proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", accept);
    check_error("PROXy", accept);
    check_error(" PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", accept);
    check_error("EHLO client.example\r\n", accept);
    check_error("GET / HTTP/1.1\r\n", accept);
    check_error("X", accept);
    check_error(std::string(1, '\0'), accept);
    // A prefix of "PROXY " is not decided yet.
    for (size_t n = 1; n < 6; ++n)
      CHECK(parse(std::string_view("PROXY ").substr(0, n), accept).status == Status::need_more);
  }
  CHECK(parse("", Accept::v1).status == Status::need_more);
  CHECK(parse("", Accept::v2).status == Status::need_more);
  CHECK(parse("", Accept::any).status == Status::need_more);
}

TEST_CASE("proxy v1: bad fields") {
  const std::vector<std::string> bad = {
      // missing fields
      "PROXY \r\n",
      "PROXY TCP4\r\n",
      "PROXY TCP4 \r\n",
      "PROXY TCP4 192.168.0.1\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 \r\n",
      // extra fields and stray spaces
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 25\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 x y z\r\n",
      "PROXY  TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
      "PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n",
      "PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11  56324 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324  443\r\n",
      "PROXY TCP4\t192.168.0.1 192.168.0.11 56324 443\r\n",
      "PROXY TCP4 192.168.0.1\t192.168.0.11 56324 443\r\n",
      // unknown protocols
      "PROXY TCP5 192.168.0.1 192.168.0.11 56324 443\r\n",
      "PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\r\n",
      "PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n",
      "PROXY TCP 192.168.0.1 192.168.0.11 56324 443\r\n",
      "PROXY TCP44 192.168.0.1 192.168.0.11 56324 443\r\n",
      // addresses of the wrong family or malformed
      "PROXY TCP4 ::1 ::1 56324 443\r\n",
      "PROXY TCP4 192.168.0.1 ::1 56324 443\r\n",
      "PROXY TCP4 ::ffff:192.168.0.1 192.168.0.11 56324 443\r\n",
      "PROXY TCP6 192.168.0.1 192.168.0.11 56324 443\r\n",
      "PROXY TCP6 ::1 192.168.0.11 56324 443\r\n",
      "PROXY TCP4 256.168.0.1 192.168.0.11 56324 443\r\n",
      "PROXY TCP4 192.168.0 192.168.0.11 56324 443\r\n",
      "PROXY TCP4 192.168.0.1.5 192.168.0.11 56324 443\r\n",
      "PROXY TCP4 192.168.000.001 192.168.0.11 56324 443\r\n",
      "PROXY TCP4 localhost 192.168.0.11 56324 443\r\n",
      "PROXY TCP4 192.168.0.1: 192.168.0.11 56324 443\r\n",
      "PROXY TCP6 [::1] [::1] 56324 443\r\n",
      "PROXY TCP6 fe80::1%eth0 ::1 56324 443\r\n",
      "PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 56324 443\r\n",
      "PROXY TCP6 :::1 ::1 56324 443\r\n",
      // ports
      "PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 65536\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 99999 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 100000 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 +1 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 0443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 00 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 5632a 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 0x10 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 1e3 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 https 443\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443.\r\n",
      // line ends
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\r\n",
      "PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \n",
      "PROXY TCP4 192.168.0.1 192.168.0.11\r\n56324 443\r\n",
      "PROXY \n",
  };
  for (const std::string& line : bad) {
    CAPTURE(line);
    check_error(line, Accept::v1);
    check_error(line + "EHLO x\r\n", Accept::any);
    // Not decided before the line end: every proper prefix waits.
    const size_t lf = line.find('\n');
    for (size_t i = 0; i < lf; ++i)
      CHECK(parse(std::string_view(line).substr(0, i), Accept::v1).status == Status::need_more);
  }
}

// inet_pton() stops at the first NUL: "1.2.3.4\0junk" must not pass as 1.2.3.4.
TEST_CASE("proxy v1: a NUL byte inside an address field is refused") {
  check_error("PROXY TCP4 192.168.0.1\0junk 192.168.0.11 56324 443\r\n"s, Accept::v1);
  check_error("PROXY TCP4 192.168.0.1 192.168.0.11\0 56324 443\r\n"s, Accept::v1);
  check_error("PROXY TCP6 ::1\0:2 ::1 56324 443\r\n"s, Accept::v1);
}

// ---------------------------------------------------------------------------------------
// v2

TEST_CASE("proxy v2: TCP4, with and without TLVs") {
  const std::string hdr = v2(0x21, 0x11, kV2Tcp4Addrs);
  REQUIRE(hdr.size() == 28);
  REQUIRE(hdr == kSig + bytes({0x21, 0x11, 0x00, 0x0c}) + kV2Tcp4Addrs);
  for (Accept accept : {Accept::v2, Accept::any}) {
    ParseResult r = ok_parse(hdr, accept, 28);
    CHECK(r.version == Version::v2);
    CHECK_FALSE(r.header.local);
    CHECK(r.header.source.family() == AF_INET);
    CHECK(r.header.destination.family() == AF_INET);
    CHECK(r.header.source.len == sizeof(sockaddr_in));
    CHECK(r.header.source.to_string() == "192.168.0.1:56324");
    CHECK(r.header.destination.to_string() == "192.168.0.11:443");

    // TLVs after the addresses are skipped: consumed = 16 + len.
    const std::string with_tlvs = v2(0x21, 0x11, kV2Tcp4Addrs + kTlvs);
    r = ok_parse(with_tlvs + "EHLO x\r\n", accept, 16 + 12 + kTlvs.size());
    CHECK(r.header.source.to_string() == "192.168.0.1:56324");
    CHECK(r.header.destination.to_string() == "192.168.0.11:443");
  }
}

TEST_CASE("proxy v2: TCP6, with and without TLVs") {
  const std::string hdr = v2(0x21, 0x21, kV2Tcp6Addrs);
  REQUIRE(hdr.size() == 52);
  for (Accept accept : {Accept::v2, Accept::any}) {
    ParseResult r = ok_parse(hdr, accept, 52);
    CHECK(r.version == Version::v2);
    CHECK_FALSE(r.header.local);
    CHECK(r.header.source.family() == AF_INET6);
    CHECK(r.header.destination.family() == AF_INET6);
    CHECK(r.header.source.len == sizeof(sockaddr_in6));
    CHECK(r.header.source.to_string() == "[2001:db8::1]:56324");
    CHECK(r.header.destination.to_string() == "[2001:db8::2]:25");

    r = ok_parse(v2(0x21, 0x21, kV2Tcp6Addrs + kTlvs), accept, 16 + 36 + kTlvs.size());
    CHECK(r.header.source.to_string() == "[2001:db8::1]:56324");
    CHECK(r.header.destination.to_string() == "[2001:db8::2]:25");
  }
}

TEST_CASE("proxy v2: LOCAL ignores the family and any addresses") {
  ParseResult r = ok_parse(v2(0x20, 0x00, ""), Accept::v2, 16);
  CHECK(r.version == Version::v2);
  CHECK(r.header.local);
  CHECK(r.header.source.family() == AF_UNSPEC);
  r = ok_parse(v2(0x20, 0x11, kV2Tcp4Addrs), Accept::any, 28);
  CHECK(r.header.local);
  r = ok_parse(v2(0x20, 0x21, kV2Tcp6Addrs + kTlvs), Accept::any, 16 + 36 + kTlvs.size());
  CHECK(r.header.local);
  // Even with a family smtplb would refuse for PROXY, or too short a body for it.
  CHECK(ok_parse(v2(0x20, 0x12, ""), Accept::v2, 16).header.local);
  CHECK(ok_parse(v2(0x20, 0x11, "abc"), Accept::v2, 19).header.local);
  check_every_split(v2(0x20, 0x00, ""), Accept::v2);
}

TEST_CASE("proxy v2: PROXY with UNSPEC or UNIX carries no IP client address") {
  ParseResult r = ok_parse(v2(0x21, 0x00, ""), Accept::v2, 16);
  CHECK(r.header.local);
  r = ok_parse(v2(0x21, 0x00, "ignored"), Accept::v2, 23);
  CHECK(r.header.local);
  // AF_UNIX stream: two 108-byte paths.
  std::string unix_addrs(216, '\0');
  std::memcpy(unix_addrs.data(), "/run/client.sock", 16);
  std::memcpy(unix_addrs.data() + 108, "/run/smtplb.sock", 16);
  r = ok_parse(v2(0x21, 0x31, unix_addrs) + "EHLO x\r\n", Accept::any, 232);
  CHECK(r.version == Version::v2);
  CHECK(r.header.local);
  r = ok_parse(v2(0x21, 0x31, unix_addrs + kTlvs), Accept::v2, 232 + kTlvs.size());
  CHECK(r.header.local);
  check_every_split(v2(0x21, 0x31, unix_addrs), Accept::any);
}

TEST_CASE("proxy v2: datagram, unknown families, versions and commands are refused") {
  for (Accept accept : {Accept::v2, Accept::any}) {
    CAPTURE(int(accept));
    check_error(v2(0x21, 0x12, kV2Tcp4Addrs), accept);  // UDP over IPv4
    check_error(v2(0x21, 0x22, kV2Tcp6Addrs), accept);  // UDP over IPv6
    check_error(v2(0x21, 0x10, kV2Tcp4Addrs), accept);  // IPv4, unspecified transport
    check_error(v2(0x21, 0x13, kV2Tcp4Addrs), accept);  // IPv4, transport 3
    check_error(v2(0x21, 0x41, kV2Tcp4Addrs), accept);  // family 4
    check_error(v2(0x21, 0xf1, kV2Tcp4Addrs), accept);  // family 15
    check_error(v2(0x11, 0x11, kV2Tcp4Addrs), accept);  // version 1 in a v2 signature
    check_error(v2(0x31, 0x11, kV2Tcp4Addrs), accept);  // version 3
    check_error(v2(0x01, 0x11, kV2Tcp4Addrs), accept);  // version 0
    check_error(v2(0x22, 0x11, kV2Tcp4Addrs), accept);  // command 2
    check_error(v2(0x2f, 0x11, kV2Tcp4Addrs), accept);  // command 15
    // Address blocks shorter than the family needs.
    check_error(v2(0x21, 0x11, kV2Tcp4Addrs.substr(0, 11)), accept);
    check_error(v2(0x21, 0x11, ""), accept);
    check_error(v2(0x21, 0x21, kV2Tcp6Addrs.substr(0, 35)), accept);
    check_error(v2(0x21, 0x21, kV2Tcp4Addrs), accept);
  }
}

TEST_CASE("proxy v2: bad signatures") {
  for (Accept accept : {Accept::v2, Accept::any}) {
    CAPTURE(int(accept));
    // Each byte of the signature flipped in turn.
    const std::string good = v2(0x21, 0x11, kV2Tcp4Addrs);
    for (size_t i = 0; i < 12; ++i) {
      CAPTURE(i);
      std::string bad = good;
      bad[i] = char(bad[i] ^ 0x20);
      check_error(bad, accept);
      // Decided as soon as the wrong byte arrives.
      check_error(std::string_view(bad).substr(0, i + 1), accept);
    }
    check_error("\r\n\r\n\r\n"s, accept);
    check_error("\r\n\r\n\0\r\nQUIT\r\n"s, accept);
    // A prefix of the signature is not decided yet.
    for (size_t n = 1; n < 12; ++n)
      CHECK(parse(std::string_view(kSig).substr(0, n), accept).status == Status::need_more);
  }
}

TEST_CASE("proxy v2: every split position") {
  for (Accept accept : {Accept::v2, Accept::any}) {
    CAPTURE(int(accept));
    check_every_split(v2(0x21, 0x11, kV2Tcp4Addrs), accept);
    check_every_split(v2(0x21, 0x11, kV2Tcp4Addrs + kTlvs), accept);
    check_every_split(v2(0x21, 0x21, kV2Tcp6Addrs), accept);
    check_every_split(v2(0x21, 0x21, kV2Tcp6Addrs + kTlvs), accept);
    check_every_split(v2(0x21, 0x00, ""), accept);
    check_every_split(v2(0x21, 0x11, kV2Tcp4Addrs), accept, v2(0x21, 0x11, kV2Tcp4Addrs));
    check_every_split(v2(0x21, 0x11, kV2Tcp4Addrs), accept, "");
  }
}

TEST_CASE("proxy v2: length limit") {
  // The largest accepted header is kMaxV2 bytes: the address block plus TLVs up to the limit.
  REQUIRE(kMaxV2 == 16 + 1024);
  std::string padding = kV2Tcp4Addrs + bytes({0x04, 0x03, 0xf1}) + std::string(1024 - 12 - 3, '\0');
  REQUIRE(padding.size() == 1024);
  const std::string biggest = v2(0x21, 0x11, padding);
  const ParseResult r = ok_parse(biggest + "EHLO x\r\n", Accept::v2, kMaxV2);
  CHECK(r.header.source.to_string() == "192.168.0.1:56324");
  CHECK(parse(std::string_view(biggest).substr(0, kMaxV2 - 1), Accept::v2).status == Status::need_more);

  // Over the limit: refused as soon as the length is known, without waiting for the body.
  for (uint16_t len : {uint16_t(1025), uint16_t(2048), uint16_t(0xffff)}) {
    CAPTURE(len);
    const std::string hdr = v2_len(0x21, 0x11, len);
    CHECK(parse(std::string_view(hdr).substr(0, 15), Accept::v2).status == Status::need_more);
    check_error(hdr, Accept::v2);
    check_error(hdr + kV2Tcp4Addrs, Accept::any);
    check_error(v2_len(0x20, 0x00, len), Accept::any);  // LOCAL too
  }
  // Truncated: a length the data does not reach yet waits.
  CHECK(parse(v2_len(0x21, 0x11, 12), Accept::v2).status == Status::need_more);
  CHECK(parse(v2_len(0x21, 0x11, 12) + kV2Tcp4Addrs.substr(0, 11), Accept::v2).status == Status::need_more);
  CHECK(parse(v2_len(0x21, 0x21, 1024), Accept::any).status == Status::need_more);
}

// ---------------------------------------------------------------------------------------
// Accept modes

TEST_CASE("proxy: a listener takes only the versions it accepts") {
  const std::string v1 = kV1Tcp4 + "EHLO x\r\n";
  const std::string v2hdr = v2(0x21, 0x11, kV2Tcp4Addrs) + "EHLO x\r\n";

  CHECK(parse(v1, Accept::v1).status == Status::ok);
  CHECK(parse(v1, Accept::v2).status == Status::error);
  CHECK(parse(v1, Accept::any).status == Status::ok);
  CHECK(parse(v2hdr, Accept::v1).status == Status::error);
  CHECK(parse(v2hdr, Accept::v2).status == Status::ok);
  CHECK(parse(v2hdr, Accept::any).status == Status::ok);
  CHECK(parse(v1, Accept::any).version == Version::v1);
  CHECK(parse(v2hdr, Accept::any).version == Version::v2);

  // Refused from the first byte on: no waiting for a header the listener would not take.
  for (size_t n = 1; n <= 16; ++n) {
    CAPTURE(n);
    CHECK(parse(std::string_view(v1).substr(0, n), Accept::v2).status == Status::error);
    CHECK(parse(std::string_view(v2hdr).substr(0, n), Accept::v1).status == Status::error);
  }
  // Local headers too.
  CHECK(parse("PROXY UNKNOWN\r\n", Accept::v2).status == Status::error);
  CHECK(parse(v2(0x20, 0x00, ""), Accept::v1).status == Status::error);

  // Neither version: refused whatever the listener accepts.
  for (Accept accept : kAllAccepts) {
    CAPTURE(int(accept));
    check_error("EHLO client.example\r\n", accept);
    check_error("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"s, accept);  // a TLS ClientHello
  }
}

// ---------------------------------------------------------------------------------------
// Encoder

TEST_CASE("proxy encode: v1 bytes") {
  CHECK(encode(Version::v1, header(ip4("192.168.0.1", 56324), ip4("192.168.0.11", 443))) == kV1Tcp4);
  CHECK(encode(Version::v1, header(ip4("255.255.255.255", 65535), ip4("0.0.0.0", 0))) ==
        "PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n");
  CHECK(encode(Version::v1, header(ip6("2001:db8::1", 56324), ip6("2001:db8::2", 25))) ==
        "PROXY TCP6 2001:db8::1 2001:db8::2 56324 25\r\n");
  // inet_ntop's canonical form (RFC 5952): lower case, longest zero run compressed.
  CHECK(encode(Version::v1, header(ip6("2001:DB8:0:0:0:0:0:1", 1), ip6("::1", 2))) ==
        "PROXY TCP6 2001:db8::1 ::1 1 2\r\n");
  CHECK(encode(Version::v1, header(ip6(kFfff.c_str(), 65535), ip6(kFfff.c_str(), 65535))) ==
        "PROXY TCP6 " + kFfff + " " + kFfff + " 65535 65535\r\n");
}

TEST_CASE("proxy encode: v2 bytes") {
  CHECK(encode(Version::v2, header(ip4("192.168.0.1", 56324), ip4("192.168.0.11", 443))) ==
        kSig + bytes({0x21, 0x11, 0x00, 0x0c, 192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb}));
  CHECK(encode(Version::v2, header(ip4("10.0.0.1", 0), ip4("10.0.0.2", 65535))) ==
        kSig + bytes({0x21, 0x11, 0x00, 0x0c, 10, 0, 0, 1, 10, 0, 0, 2, 0x00, 0x00, 0xff, 0xff}));
  CHECK(encode(Version::v2, header(ip6("2001:db8::1", 56324), ip6("2001:db8::2", 25))) ==
        kSig + bytes({0x21, 0x21, 0x00, 0x24}) + kV2Tcp6Addrs);
}

TEST_CASE("proxy encode: local headers") {
  const std::string v2_local = kSig + bytes({0x20, 0x00, 0x00, 0x00});
  REQUIRE(v2_local.size() == 16);

  Header local = header(ip4("192.168.0.1", 56324), ip4("192.168.0.11", 443));
  local.local = true;
  CHECK(encode(Version::v1, local) == "PROXY UNKNOWN\r\n");
  CHECK(encode(Version::v2, local) == v2_local);

  // No addresses, or addresses that do not make an IP pair, are local too.
  const Header none;
  CHECK(encode(Version::v1, none) == "PROXY UNKNOWN\r\n");
  CHECK(encode(Version::v2, none) == v2_local);
  const Header mixed = header(ip4("192.168.0.1", 1), ip6("::1", 2));
  CHECK(encode(Version::v1, mixed) == "PROXY UNKNOWN\r\n");
  CHECK(encode(Version::v2, mixed) == v2_local);
  Header unix_pair;
  unix_pair.source.set_family(AF_UNIX);
  unix_pair.destination.set_family(AF_UNIX);
  CHECK(encode(Version::v1, unix_pair) == "PROXY UNKNOWN\r\n");
  CHECK(encode(Version::v2, unix_pair) == v2_local);

  // And they parse back as local.
  CHECK(ok_parse(encode(Version::v1, local), Accept::any, 15).header.local);
  CHECK(ok_parse(encode(Version::v2, local), Accept::any, 16).header.local);
}

TEST_CASE("proxy: encode then parse round trip") {
  const std::vector<const char*> v4 = {"0.0.0.0",      "127.0.0.1",   "192.168.0.1",     "10.1.2.3",
                                       "172.16.254.1", "203.0.113.7", "255.255.255.255", "1.0.0.0"};
  const std::vector<const char*> v6 = {"::",
                                       "::1",
                                       "2001:db8::1",
                                       "2001:db8:85a3::8a2e:370:7334",
                                       "fe80::1",
                                       "::ffff:192.0.2.128",
                                       "64:ff9b::c000:280",
                                       "1:2:3:4:5:6:7:8",
                                       "1::8",
                                       "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"};
  const std::vector<uint16_t> ports = {0, 1, 25, 443, 587, 1024, 56324, 65534, 65535};

  std::vector<Header> headers;
  for (size_t i = 0; i < v4.size(); ++i)
    for (size_t j = 0; j < ports.size(); ++j)
      headers.push_back(
          header(ip4(v4[i], ports[j]), ip4(v4[(i + j + 1) % v4.size()], ports[(j * 3 + 1) % ports.size()])));
  for (size_t i = 0; i < v6.size(); ++i)
    for (size_t j = 0; j < ports.size(); ++j)
      headers.push_back(
          header(ip6(v6[i], ports[j]), ip6(v6[(i + j + 1) % v6.size()], ports[(j * 5 + 2) % ports.size()])));

  for (const Header& h : headers) {
    for (Version v : {Version::v1, Version::v2}) {
      const std::string wire = encode(v, h);
      CAPTURE(h.source.to_string());
      CAPTURE(h.destination.to_string());
      CAPTURE(int(v));
      if (v == Version::v1) CHECK(wire.size() <= kMaxV1);
      const ParseResult r = ok_parse(wire + "EHLO x\r\n", v == Version::v1 ? Accept::v1 : Accept::v2, wire.size());
      CHECK(r.version == v);
      CHECK_FALSE(r.header.local);
      CHECK(same_address(r.header.source, h.source));
      CHECK(same_address(r.header.destination, h.destination));
      CHECK(r.header.source.to_string() == h.source.to_string());
      CHECK(r.header.destination.to_string() == h.destination.to_string());
      // Encoding what was parsed gives the same bytes back.
      CHECK(encode(v, r.header) == wire);
      CHECK(ok_parse(wire, Accept::any, wire.size()).version == v);
    }
  }
}
