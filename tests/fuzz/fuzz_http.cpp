// libFuzzer target for the admin API's HTTP/1.x request parser, and its query strings
// (parse_query: the input read as one, re-encoded and parsed again must give the same). The input is a byte
// stream from a client; it is fed whole and in pseudo-random chunks (1..64 bytes), request
// after request as a keep-alive connection would, and both runs must see the same
// requests and the same verdict at the same offsets. Invariants are checked with abort(),
// so a violation is reported like a crash.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "fuzz_check.hpp"
#include "smtplb/proto/admin_routes.hpp"
#include "smtplb/proto/http.hpp"

namespace {

using smtplb::http::kMaxBody;
using smtplb::http::kMaxHead;
using smtplb::http::Request;
using smtplb::http::RequestParser;
using Status = RequestParser::Status;

// What the caller learns at the end of each request, or at the end of the input.
struct Event {
  Status status;
  int code;
  std::string error;
  std::string method, target, path;
  int version_minor;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  bool keep_alive;
  size_t end;  // stream offset just after the request, or where the error was decided

  bool operator==(const Event& o) const {
    return status == o.status && code == o.code && error == o.error && method == o.method && target == o.target &&
           path == o.path && version_minor == o.version_minor && headers == o.headers && body == o.body &&
           keep_alive == o.keep_alive && end == o.end;
  }
};

bool is_tchar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         std::strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

void check_complete(const Request& r) {
  FUZZ_CHECK(!r.method.empty());
  FUZZ_CHECK(std::all_of(r.method.begin(), r.method.end(), is_tchar));
  FUZZ_CHECK(!r.target.empty() && r.target.size() <= 2048);
  FUZZ_CHECK(r.target[0] == '/');
  for (char c : r.target) FUZZ_CHECK(static_cast<unsigned char>(c) > 0x20 && static_cast<unsigned char>(c) < 0x7f);
  FUZZ_CHECK(r.target.compare(0, r.path.size(), r.path) == 0);
  FUZZ_CHECK(r.path.find('?') == std::string::npos);
  FUZZ_CHECK(r.path.size() == r.target.size() || r.target[r.path.size()] == '?');
  FUZZ_CHECK(r.version_minor >= 0 && r.version_minor <= 9);
  for (const auto& [name, value] : r.headers) {
    FUZZ_CHECK(!name.empty());
    for (char c : name) FUZZ_CHECK(is_tchar(c) && !(c >= 'A' && c <= 'Z'));
    FUZZ_CHECK(name != "transfer-encoding");
    if (!value.empty()) {
      FUZZ_CHECK(value.front() != ' ' && value.front() != '\t');
      FUZZ_CHECK(value.back() != ' ' && value.back() != '\t');
    }
    for (char c : value) {
      const auto u = static_cast<unsigned char>(c);
      FUZZ_CHECK(u >= 0x20 || c == '\t');
      FUZZ_CHECK(u != 0x7f);
    }
    if (name == "content-length") {
      // Digits only, every copy the same value, and the body is that long.
      FUZZ_CHECK(!value.empty() && value.find_first_not_of("0123456789") == std::string::npos);
      size_t n = 0;
      for (char c : value) n = std::min(n * 10 + size_t(c - '0'), kMaxBody + 1);
      FUZZ_CHECK(n <= kMaxBody);
      FUZZ_CHECK(r.body.size() == n);
    }
  }
  if (r.header("content-length") == nullptr) FUZZ_CHECK(r.body.empty());
}

bool is_documented_error(int code) {
  return code == 400 || code == 413 || code == 414 || code == 431 || code == 501 || code == 505;
}

// Splits `data` into chunks (all at once when seed == 0) and parses request after request,
// resetting after each one as the admin server does; stops at the first error because the
// server closes the connection there.
std::vector<Event> parse_stream(std::string_view data, uint64_t seed) {
  RequestParser p;
  std::vector<Event> events;
  uint64_t x = seed;
  size_t pos = 0;
  while (pos < data.size()) {
    size_t len = data.size() - pos;
    if (seed != 0) {
      x = x * 6364136223846793005ULL + 1442695040888963407ULL;
      const size_t r = size_t(x >> 33);
      len = std::min(len, r % 4 == 0 ? size_t(1) : 1 + r % 64);
    }
    // An exact-size heap copy, so AddressSanitizer sees any read past the chunk.
    std::unique_ptr<char[]> buf(new char[len]);
    std::memcpy(buf.get(), data.data() + pos, len);
    size_t off = 0;
    while (off < len) {
      const std::string_view rest(buf.get() + off, len - off);
      size_t consumed = SIZE_MAX;
      const Status st = p.feed(rest, consumed);
      FUZZ_CHECK(consumed <= rest.size());
      if (st == Status::need_more) {
        FUZZ_CHECK(consumed == rest.size());
        FUZZ_CHECK(p.error().empty());
        FUZZ_CHECK(p.status_code() == 0);
        break;
      }
      FUZZ_CHECK(consumed > 0);
      // A finished parser keeps its verdict and consumes nothing until reset().
      size_t again = SIZE_MAX;
      FUZZ_CHECK(p.feed(rest.substr(consumed), again) == st);
      FUZZ_CHECK(again == 0);
      const Request& r = p.request();
      if (st == Status::complete) {
        FUZZ_CHECK(p.status_code() == 0);
        FUZZ_CHECK(p.error().empty());
        check_complete(r);
      } else {
        FUZZ_CHECK(is_documented_error(p.status_code()));
        FUZZ_CHECK(!p.error().empty());
        FUZZ_CHECK(std::strcmp(smtplb::http::reason(p.status_code()), "Unknown") != 0);
      }
      events.push_back({st, p.status_code(), p.error(), r.method, r.target, r.path, r.version_minor, r.headers, r.body,
                        r.keep_alive, pos + off + consumed});
      if (st == Status::error) return events;
      p.reset();
      FUZZ_CHECK(p.status_code() == 0 && p.error().empty() && p.request().method.empty() &&
                 p.request().headers.empty() && p.request().body.empty());
      off += consumed;
    }
    pos += len;
  }
  events.push_back({Status::need_more, 0, {}, {}, {}, {}, 1, {}, {}, true, data.size()});
  return events;
}

uint64_t fnv1a(std::string_view data) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : data) h = (h ^ c) * 1099511628211ULL;
  return h | 1;  // never 0, which means "whole"
}

// Percent-encodes every byte but unreserved ones, the way a client may write a query.
std::string encode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == ':') {
      out += char(c);
    } else {
      char esc[4];
      std::snprintf(esc, sizeof esc, "%%%02X", c);
      out += esc;
    }
  }
  return out;
}

void check_query(std::string_view query) {
  std::vector<std::pair<std::string, std::string>> params, again;
  std::string error;
  if (!smtplb::parse_query(query, params, error)) {
    FUZZ_CHECK(!error.empty());
    return;
  }
  std::string encoded;
  for (const auto& [name, value] : params) {
    FUZZ_CHECK(!name.empty());
    encoded += (encoded.empty() ? "" : "&") + encode(name) + "=" + encode(value);
  }
  FUZZ_CHECK(smtplb::parse_query(encoded, again, error));
  FUZZ_CHECK(again == params);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  // Past twice the head and body limits every input is only more of the same.
  if (size > 2 * (kMaxHead + kMaxBody)) return 0;
  const std::string_view data(reinterpret_cast<const char*>(bytes), size);
  const uint64_t seed = fnv1a(data);

  const auto whole = parse_stream(data, 0);
  const auto chunked = parse_stream(data, seed);
  FUZZ_CHECK(whole == chunked);
  const auto other = parse_stream(data, seed * 31 + 2);
  FUZZ_CHECK(whole == other);
  check_query(data.substr(0, 4096));
  return 0;
}
