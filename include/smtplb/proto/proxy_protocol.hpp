#pragma once
// HAProxy PROXY protocol v1 (text) and v2 (binary) headers, pure: encoder and an
// incremental parser. Spec: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "smtplb/config/config.hpp"

namespace smtplb::proxy {

enum class Version : uint8_t { v1, v2 };
// What a listener accepts.
enum class Accept : uint8_t { v1, v2, any };

struct Header {
  // True for v1 "UNKNOWN", v2 LOCAL, and v2 with an unspecified or non-IP family: the
  // connection carries no client address (typically the upstream balancer's own check).
  bool local = false;
  SocketAddress source;       // the original client
  SocketAddress destination;  // the address the client connected to
};

// Largest header the parser accepts. v1 is at most 107 bytes by the spec; v2 is 16 bytes
// plus addresses plus TLVs, which smtplb skips (a bound keeps a hostile peer from making
// it buffer much).
inline constexpr size_t kMaxV1 = 107;
inline constexpr size_t kMaxV2 = 16 + 1024;

// Encodes a header. source and destination must be of the same family (AF_INET or
// AF_INET6) unless local is set; otherwise the header is "local" (v1 UNKNOWN, v2 LOCAL).
std::string encode(Version v, const Header& h);

struct ParseResult {
  enum class Status : uint8_t { need_more, ok, error };
  Status status = Status::need_more;
  size_t consumed = 0;  // header length when ok
  Version version = Version::v1;
  Header header;
  std::string error;  // when error: what was wrong, for the log
};

// Parses the start of a connection's bytes. need_more until a complete header (or a
// decisive error) is seen; never looks past the header, so consumed bytes can be cut off
// and the rest relayed.
ParseResult parse(std::string_view data, Accept accept);

}  // namespace smtplb::proxy
