#pragma once
// A small, strict HTTP/1.1 request parser for the admin API, pure and incremental.
// Bounded: request line + headers at most kMaxHead bytes, body at most kMaxBody.
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace smtplb::http {

inline constexpr size_t kMaxHead = 8 * 1024;
inline constexpr size_t kMaxBody = 64 * 1024;

struct Request {
  std::string method;                                        // "GET", "POST", ... (case-sensitive, as RFC 9110 says)
  std::string target;                                        // origin-form path with any query, e.g. "/metrics?x=1"
  std::string path;                                          // target without the query
  int version_minor = 1;                                     // HTTP/1.<minor>
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased, values trimmed
  std::string body;
  bool keep_alive = true;  // HTTP/1.1 default unless "Connection: close"; 1.0 only with keep-alive
  // First header value with this (lower-case) name, or nullptr.
  const std::string* header(std::string_view name) const;
};

class RequestParser {
 public:
  enum class Status { need_more, complete, error };

  // Feeds bytes; on complete, request() is ready and `consumed` tells where the next
  // pipelined request starts. On error, status_code() is the HTTP status to answer
  // (400, 413, 414, 431, 501, 505) and error() says why.
  Status feed(std::string_view data, size_t& consumed);
  void reset();

  const Request& request() const { return req_; }
  Request& request() { return req_; }
  int status_code() const { return status_code_; }
  const std::string& error() const { return error_; }

 private:
  Status fail(int code, std::string why);
  Status parse_head();

  std::string head_;        // bytes of the request line and headers so far
  size_t body_needed_ = 0;  // Content-Length still to read
  bool in_body_ = false;
  Request req_;
  int status_code_ = 0;
  std::string error_;
  Status status_ = Status::need_more;
};

// The reason phrase of a status code ("OK", "Not Found", ...).
const char* reason(int status);

}  // namespace smtplb::http
