#include <doctest/doctest.h>

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "smtplb/proto/http.hpp"

using smtplb::http::kMaxBody;
using smtplb::http::kMaxHead;
using smtplb::http::reason;
using smtplb::http::Request;
using smtplb::http::RequestParser;
using Status = RequestParser::Status;

namespace {

using namespace std::string_literals;

const std::string kGet =
    "GET /metrics?name=x HTTP/1.1\r\n"
    "Host: 127.0.0.1:9090\r\n"
    "User-Agent: curl/7.88.1\r\n"
    "Accept: */*\r\n"
    "\r\n";

const std::string kPost =
    "POST /servers/mx/mx1/state HTTP/1.1\r\n"
    "Host: localhost\r\n"
    "Content-Type: text/plain\r\n"
    "Content-Length: 5\r\n"
    "\r\n"
    "drain";

// One parse of a whole buffer.
struct Result {
  Status status;
  size_t consumed;
  int code;
  std::string error;
  Request req;
};

Result parse(std::string_view in) {
  RequestParser p;
  size_t consumed = 12345;
  const Status st = p.feed(in, consumed);
  return {st, consumed, p.status_code(), p.error(), p.request()};
}

// The status code of a whole request that must be refused.
int error_code(std::string_view in) {
  const Result r = parse(in);
  CHECK_MESSAGE(r.status == Status::error, "input: ", std::string(in));
  CHECK_MESSAGE(!r.error.empty(), "input: ", std::string(in));
  return r.code;
}

// A GET with one extra header line; the verdict of the parser on it.
Result with_header(std::string_view line) {
  return parse("GET / HTTP/1.1\r\nHost: a\r\n" + std::string(line) + "\r\n\r\n");
}

// What a connection sees: every complete request of a stream fed in `chunks`, resetting
// after each, and the final status (need_more at the end of the input, or error).
struct Stream {
  std::vector<Request> requests;
  Status last = Status::need_more;
  int code = 0;
};

Stream parse_stream(const std::vector<std::string_view>& chunks) {
  RequestParser p;
  Stream s;
  for (std::string_view chunk : chunks) {
    while (true) {
      size_t consumed = 12345;
      const Status st = p.feed(chunk, consumed);
      REQUIRE(consumed <= chunk.size());
      if (st == Status::need_more) {
        REQUIRE(consumed == chunk.size());
        break;
      }
      if (st == Status::error) {
        s.last = st;
        s.code = p.status_code();
        return s;
      }
      s.requests.push_back(p.request());
      p.reset();
      chunk.remove_prefix(consumed);
    }
  }
  return s;
}

bool same(const Request& a, const Request& b) {
  return a.method == b.method && a.target == b.target && a.path == b.path && a.version_minor == b.version_minor &&
         a.headers == b.headers && a.body == b.body && a.keep_alive == b.keep_alive;
}

}  // namespace

TEST_CASE("http: simple GET") {
  const Result r = parse(kGet);
  REQUIRE(r.status == Status::complete);
  CHECK(r.consumed == kGet.size());
  CHECK(r.code == 0);
  CHECK(r.error.empty());
  CHECK(r.req.method == "GET");
  CHECK(r.req.target == "/metrics?name=x");
  CHECK(r.req.path == "/metrics");
  CHECK(r.req.version_minor == 1);
  CHECK(r.req.keep_alive);
  CHECK(r.req.body.empty());
  const std::vector<std::pair<std::string, std::string>> headers = {
      {"host", "127.0.0.1:9090"}, {"user-agent", "curl/7.88.1"}, {"accept", "*/*"}};
  CHECK(r.req.headers == headers);
  REQUIRE(r.req.header("host") != nullptr);
  CHECK(*r.req.header("host") == "127.0.0.1:9090");
  CHECK(r.req.header("content-length") == nullptr);
}

TEST_CASE("http: POST with a body") {
  const Result r = parse(kPost);
  REQUIRE(r.status == Status::complete);
  CHECK(r.consumed == kPost.size());
  CHECK(r.req.method == "POST");
  CHECK(r.req.path == "/servers/mx/mx1/state");
  CHECK(r.req.target == r.req.path);
  CHECK(r.req.body == "drain");
  CHECK(*r.req.header("content-type") == "text/plain");

  // The head alone waits for the body; the body completes it.
  RequestParser p;
  const size_t head = kPost.size() - 5;
  size_t consumed = 0;
  CHECK(p.feed(std::string_view(kPost).substr(0, head), consumed) == Status::need_more);
  CHECK(consumed == head);
  CHECK(p.feed("dra", consumed) == Status::need_more);
  CHECK(consumed == 3);
  CHECK(p.feed("in", consumed) == Status::complete);
  CHECK(consumed == 2);
  CHECK(p.request().body == "drain");
}

TEST_CASE("http: bare LF line ends, a zero Content-Length, an empty path query") {
  const Result r = parse("GET /healthz? HTTP/1.1\nHost: a\n\n");
  REQUIRE(r.status == Status::complete);
  CHECK(r.req.target == "/healthz?");
  CHECK(r.req.path == "/healthz");
  const Result z = parse("POST /reload HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
  REQUIRE(z.status == Status::complete);
  CHECK(z.req.body.empty());
  // Mixed line ends are each taken on their own.
  CHECK(parse("GET / HTTP/1.1\nHost: a\r\n\n").status == Status::complete);
  // Empty lines before the request line are ignored (RFC 9112 2.2).
  const Result lead = parse("\r\n\nGET / HTTP/1.1\r\n\r\n");
  REQUIRE(lead.status == Status::complete);
  CHECK(lead.req.method == "GET");
  CHECK(lead.consumed == 21);
}

TEST_CASE("http: split at every byte position") {
  for (const std::string& in : {kGet, kPost}) {
    const Stream whole = parse_stream({in});
    REQUIRE(whole.requests.size() == 1);
    for (size_t i = 0; i <= in.size(); ++i) {
      CAPTURE(i);
      const std::string_view v(in);
      const Stream two = parse_stream({v.substr(0, i), v.substr(i)});
      REQUIRE(two.requests.size() == 1);
      CHECK(same(two.requests[0], whole.requests[0]));
    }
    std::vector<std::string_view> bytes;
    for (size_t i = 0; i < in.size(); ++i) bytes.push_back(std::string_view(in).substr(i, 1));
    const Stream one_by_one = parse_stream(bytes);
    REQUIRE(one_by_one.requests.size() == 1);
    CHECK(same(one_by_one.requests[0], whole.requests[0]));
  }
}

TEST_CASE("http: pipelined requests leave the next one unconsumed") {
  const std::string in = kPost + kGet + "DELETE /x HTTP/1.0\r\n\r\n" + "GET /partial HT";
  RequestParser p;
  size_t consumed = 0;
  std::string_view rest(in);
  REQUIRE(p.feed(rest, consumed) == Status::complete);
  CHECK(consumed == kPost.size());
  CHECK(p.request().body == "drain");
  // Finished: the same verdict, nothing more consumed, until reset().
  CHECK(p.feed(rest.substr(consumed), consumed) == Status::complete);
  CHECK(consumed == 0);
  CHECK(p.request().method == "POST");
  rest.remove_prefix(kPost.size());
  p.reset();
  REQUIRE(p.feed(rest, consumed) == Status::complete);
  CHECK(consumed == kGet.size());
  CHECK(p.request().path == "/metrics");
  CHECK(p.request().body.empty());
  rest.remove_prefix(consumed);
  p.reset();
  REQUIRE(p.feed(rest, consumed) == Status::complete);
  CHECK(p.request().method == "DELETE");
  CHECK(p.request().version_minor == 0);
  CHECK_FALSE(p.request().keep_alive);
  rest.remove_prefix(consumed);
  p.reset();
  CHECK(p.feed(rest, consumed) == Status::need_more);
  CHECK(consumed == rest.size());

  // Every split of the whole stream gives the same requests.
  const std::string_view all(in);
  const Stream whole = parse_stream({all});
  REQUIRE(whole.requests.size() == 3);
  for (size_t i = 0; i <= all.size(); ++i) {
    CAPTURE(i);
    const Stream two = parse_stream({all.substr(0, i), all.substr(i)});
    REQUIRE(two.requests.size() == 3);
    for (size_t k = 0; k < 3; ++k) CHECK(same(two.requests[k], whole.requests[k]));
    CHECK(two.last == Status::need_more);
  }
}

TEST_CASE("http: request line errors") {
  CHECK(error_code("G@T / HTTP/1.1\r\n\r\n") == 400);
  CHECK(error_code(" GET / HTTP/1.1\r\n\r\n") == 400);
  CHECK(error_code("GET\r\n\r\n") == 400);
  CHECK(error_code("GET /\r\n\r\n") == 400);  // HTTP/0.9
  CHECK(error_code("GET  / HTTP/1.1\r\n\r\n") == 400);
  CHECK(error_code("GET / HTTP/1.1 \r\n\r\n") == 400);
  CHECK(error_code("GET / HTTP/1.1\r\r\n\r\n") == 400);
  CHECK(error_code("GET\t/ HTTP/1.1\r\n\r\n") == 400);
  CHECK(error_code("GET / http/1.1\r\n\r\n") == 400);
  CHECK(error_code("GET / HTTP/1.10\r\n\r\n") == 400);
  CHECK(error_code("GET / HTTP/1\r\n\r\n") == 400);
  CHECK(error_code("GET / HTTP/1.x\r\n\r\n") == 400);
  CHECK(error_code("GET / HTTP/2.0\r\n\r\n") == 505);
  CHECK(error_code("GET / HTTP/0.9\r\n\r\n") == 505);
  CHECK(error_code("GET / HTTP/3.0\r\n\r\n") == 505);
  CHECK(error_code("GET http://localhost/metrics HTTP/1.1\r\n\r\n") == 400);
  CHECK(error_code("OPTIONS * HTTP/1.1\r\n\r\n") == 400);
  CHECK(error_code("CONNECT localhost:9090 HTTP/1.1\r\n\r\n") == 400);
  CHECK(error_code("GET /a\0b HTTP/1.1\r\n\r\n"s) == 400);
  CHECK(error_code("GET /a\x01 HTTP/1.1\r\n\r\n") == 400);
  CHECK(error_code("GET /a\x7f HTTP/1.1\r\n\r\n") == 400);
  CHECK(error_code("GET /\xc3\xa9 HTTP/1.1\r\n\r\n") == 400);
  CHECK(error_code("GET /a\rb HTTP/1.1\r\n\r\n") == 400);

  // The verdict comes with the request line's line feed, before any header.
  RequestParser p;
  size_t consumed = 0;
  CHECK(p.feed("GET / HTTP/2.0\r\nHost: a\r\n", consumed) == Status::error);
  CHECK(consumed == 16);
  CHECK(p.status_code() == 505);
  CHECK(p.error().find("not supported") != std::string::npos);

  // Methods are case-sensitive tokens; the server decides what it implements.
  const Result lower = parse("get / HTTP/1.1\r\n\r\n");
  REQUIRE(lower.status == Status::complete);
  CHECK(lower.req.method == "get");
  CHECK(parse("M-SEARCH_X.1~ / HTTP/1.1\r\n\r\n").status == Status::complete);
}

TEST_CASE("http: request target limit is 2 KiB") {
  const std::string ok_target = "/" + std::string(2047, 'a');
  const Result ok = parse("GET " + ok_target + " HTTP/1.1\r\n\r\n");
  REQUIRE(ok.status == Status::complete);
  CHECK(ok.req.target == ok_target);
  CHECK(error_code("GET /" + std::string(2048, 'a') + " HTTP/1.1\r\n\r\n") == 414);
  CHECK(error_code("GET /" + std::string(2048, 'a') + "\r\n\r\n") == 400);  // no version: not even a request line

  // A request line that never ends is cut at the head limit.
  RequestParser p;
  const std::string endless = "GET /" + std::string(3 * kMaxHead, 'a');
  size_t consumed = 0;
  CHECK(p.feed(endless, consumed) == Status::error);
  CHECK(p.status_code() == 414);
  CHECK(consumed == kMaxHead + 1);
}

TEST_CASE("http: header errors") {
  CHECK(with_header("Host : a").status == Status::error);
  CHECK(with_header("Host : a").code == 400);
  CHECK(with_header("Host\t: a").code == 400);
  CHECK(with_header(" folded").code == 400);
  CHECK(with_header("\tfolded").code == 400);
  CHECK(with_header("Host a").code == 400);
  CHECK(with_header(": a").code == 400);
  CHECK(with_header("Ho st: a").code == 400);
  CHECK(with_header("X(y): a").code == 400);
  CHECK(with_header("X-A: a\x01z").code == 400);
  CHECK(with_header("X-A: a\x7f").code == 400);
  CHECK(with_header("X-A: a\rz").code == 400);
  CHECK(with_header("X-A: a\0z"s).code == 400);
  CHECK(with_header("X-A: a\x1b[0m").code == 400);
  CHECK(error_code("GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n") == 400);

  // Values are trimmed of SP and HTAB; HTAB inside and non-ASCII bytes (obs-text) stay.
  const Result tabs = with_header("X-A: \t a\tb c \t");
  REQUIRE(tabs.status == Status::complete);
  CHECK(*tabs.req.header("x-a") == "a\tb c");
  const Result empty = with_header("X-Empty:");
  REQUIRE(empty.status == Status::complete);
  CHECK(*empty.req.header("x-empty") == "");
  const Result utf8 = with_header("X-Name: caf\xc3\xa9");
  REQUIRE(utf8.status == Status::complete);
  CHECK(*utf8.req.header("x-name") == "caf\xc3\xa9");
  const Result colon = with_header("X-Url: http://a:1/b");
  REQUIRE(colon.status == Status::complete);
  CHECK(*colon.req.header("x-url") == "http://a:1/b");
}

TEST_CASE("http: header names are lower-cased, values keep their case") {
  const Result r =
      parse("POST /reload HTTP/1.1\r\nCONTENT-length: 2\r\nX-Request-ID: AbC\r\nx-request-id: second\r\n\r\nok");
  REQUIRE(r.status == Status::complete);
  CHECK(r.req.headers[0].first == "content-length");
  CHECK(r.req.headers[1] == std::pair<std::string, std::string>("x-request-id", "AbC"));
  // header() finds the first of repeated fields, by its lower-case name.
  CHECK(*r.req.header("x-request-id") == "AbC");
  CHECK(r.req.header("X-Request-ID") == nullptr);
  CHECK(r.req.body == "ok");
}

TEST_CASE("http: head limit") {
  const std::string start = "GET / HTTP/1.1\r\nX: ";
  // Exactly kMaxHead bytes of head, final empty line included, is accepted.
  const std::string fits = start + std::string(kMaxHead - start.size() - 4, 'v') + "\r\n\r\n";
  REQUIRE(fits.size() == kMaxHead);
  const Result ok = parse(fits + "GET");
  REQUIRE(ok.status == Status::complete);
  CHECK(ok.consumed == kMaxHead);

  const std::string over = start + std::string(kMaxHead - start.size() - 3, 'v') + "\r\n\r\n";
  REQUIRE(over.size() == kMaxHead + 1);
  const Result r = parse(over);
  CHECK(r.status == Status::error);
  CHECK(r.code == 431);
  CHECK(r.consumed == kMaxHead + 1);

  // Many small headers reach it too, whatever the split.
  std::string many = "GET / HTTP/1.1\r\n";
  while (many.size() <= kMaxHead) many += "X-Header: 0123456789\r\n";
  many += "\r\n";
  CHECK(error_code(many) == 431);
  const std::string_view v(many);
  for (size_t i : {size_t(1), size_t(100), kMaxHead - 1, kMaxHead, kMaxHead + 1}) {
    const Stream s = parse_stream({v.substr(0, i), v.substr(i)});
    CHECK(s.last == Status::error);
    CHECK(s.code == 431);
  }

  // Nothing but empty lines: no request line at all.
  std::string blank;
  while (blank.size() <= kMaxHead) blank += "\r\n";
  CHECK(error_code(blank) == 400);
}

TEST_CASE("http: Content-Length rules and body limit") {
  CHECK(with_header("Content-Length: -1").code == 400);
  CHECK(with_header("Content-Length: +1").code == 400);
  CHECK(with_header("Content-Length: 0x10").code == 400);
  CHECK(with_header("Content-Length: 1 2").code == 400);
  CHECK(with_header("Content-Length: 1, 1").code == 400);
  CHECK(with_header("Content-Length:").code == 400);
  CHECK(with_header("Content-Length: 1.0").code == 400);
  CHECK(error_code("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab") == 400);

  const std::string dup_in = "POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 003\r\n\r\nabcXYZ";
  const Result dup = parse(dup_in);
  REQUIRE(dup.status == Status::complete);
  CHECK(dup.req.body == "abc");
  CHECK(dup.consumed == dup_in.size() - 3);

  // Transfer-Encoding is refused, with or without a Content-Length.
  const Result te = with_header("Transfer-Encoding: chunked");
  CHECK(te.status == Status::error);
  CHECK(te.code == 501);
  CHECK(te.error.find("chunked") != std::string::npos);
  CHECK(error_code("POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\n\r\nabc") == 501);

  // The body limit is decided from the header, before any body byte.
  const std::string max = "POST / HTTP/1.1\r\nContent-Length: " + std::to_string(kMaxBody) + "\r\n\r\n";
  RequestParser p;
  size_t consumed = 0;
  CHECK(p.feed(max, consumed) == Status::need_more);
  const std::string body(kMaxBody, 'b');
  CHECK(p.feed(body + "NEXT", consumed) == Status::complete);
  CHECK(consumed == kMaxBody);
  CHECK(p.request().body == body);

  const std::string too_big = "POST / HTTP/1.1\r\nContent-Length: " + std::to_string(kMaxBody + 1) + "\r\n\r\n";
  p.reset();
  CHECK(p.feed(too_big, consumed) == Status::error);
  CHECK(consumed == too_big.size());
  CHECK(p.status_code() == 413);
  CHECK(with_header("Content-Length: 99999999999999999999999999999999").code == 413);
  CHECK(with_header("Content-Length: 18446744073709551616").code == 413);
}

TEST_CASE("http: keep-alive rules") {
  const auto ka = [](std::string_view version, std::string_view headers) {
    const Result r = parse("GET / " + std::string(version) + "\r\n" + std::string(headers) + "\r\n");
    REQUIRE(r.status == Status::complete);
    return r.req.keep_alive;
  };
  CHECK(ka("HTTP/1.1", ""));
  CHECK(ka("HTTP/1.1", "Connection: keep-alive\r\n"));
  CHECK(ka("HTTP/1.1", "Connection: upgrade\r\n"));
  CHECK_FALSE(ka("HTTP/1.1", "Connection: close\r\n"));
  CHECK_FALSE(ka("HTTP/1.1", "Connection: CLOSE\r\n"));
  CHECK_FALSE(ka("HTTP/1.1", "Connection: upgrade,\t Close \r\n"));
  CHECK_FALSE(ka("HTTP/1.1", "Connection: te\r\nconnection: close\r\n"));
  CHECK(ka("HTTP/1.1", "Connection: closed\r\n"));
  CHECK(ka("HTTP/1.1", "Connection: not-close\r\n"));
  CHECK(ka("HTTP/1.1", "X-Connection: close\r\n"));
  CHECK(ka("HTTP/1.9", ""));

  CHECK_FALSE(ka("HTTP/1.0", ""));
  CHECK(ka("HTTP/1.0", "Connection: keep-alive\r\n"));
  CHECK(ka("HTTP/1.0", "Connection: Keep-Alive\r\n"));
  CHECK(ka("HTTP/1.0", "Connection: foo, keep-alive\r\n"));
  CHECK_FALSE(ka("HTTP/1.0", "Connection: keep-alive, close\r\n"));
  CHECK_FALSE(ka("HTTP/1.0", "Connection: keepalive\r\n"));
  CHECK_FALSE(ka("HTTP/1.0", "Keep-Alive: timeout=5\r\n"));
}

TEST_CASE("http: a finished parser keeps its verdict until reset") {
  RequestParser p;
  size_t consumed = 99;
  CHECK(p.feed("BAD@ / HTTP/1.1\r\n", consumed) == Status::error);
  CHECK(consumed == 17);
  const std::string error = p.error();
  CHECK(p.feed(kGet, consumed) == Status::error);
  CHECK(consumed == 0);
  CHECK(p.status_code() == 400);
  CHECK(p.error() == error);
  p.reset();
  CHECK(p.status_code() == 0);
  CHECK(p.error().empty());
  CHECK(p.feed(kGet, consumed) == Status::complete);
  CHECK(consumed == kGet.size());
  CHECK(p.feed("", consumed) == Status::complete);
  CHECK(consumed == 0);
  p.reset();
  CHECK(p.request().method.empty());
  CHECK(p.request().headers.empty());
  CHECK(p.feed("", consumed) == Status::need_more);
  CHECK(consumed == 0);
}

TEST_CASE("http: reason phrases") {
  CHECK(std::string_view(reason(200)) == "OK");
  CHECK(std::string_view(reason(204)) == "No Content");
  CHECK(std::string_view(reason(404)) == "Not Found");
  CHECK(std::string_view(reason(413)) == "Content Too Large");
  CHECK(std::string_view(reason(431)) == "Request Header Fields Too Large");
  CHECK(std::string_view(reason(503)) == "Service Unavailable");
  CHECK(std::string_view(reason(505)) == "HTTP Version Not Supported");
  for (int code : {200, 201, 202, 204, 400, 403, 404, 405, 409, 411, 413, 414, 415, 431, 500, 501, 503, 505}) {
    CAPTURE(code);
    CHECK(std::string_view(reason(code)) != "Unknown");
  }
  CHECK(std::string_view(reason(0)) == "Unknown");
  CHECK(std::string_view(reason(418)) == "Unknown");
  CHECK(std::string_view(reason(-1)) == "Unknown");
}
