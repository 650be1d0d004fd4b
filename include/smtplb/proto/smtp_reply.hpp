#pragma once
// Incremental SMTP reply parser (RFC 5321 4.2): "250-first\r\n250 last\r\n".
// Bytes may arrive split anywhere; feed() consumes what belongs to one reply.
#include <cstddef>
#include <string>
#include <string_view>

namespace smtplb {

class SmtpReplyParser {
 public:
  enum class Status { need_more, complete, error };

  // RFC 5321 caps a reply line at 512 octets; real servers exceed it a little, so the
  // default allows more while still bounding memory against a hostile peer.
  explicit SmtpReplyParser(size_t max_line = 2048, size_t max_lines = 128)
      : max_line_(max_line), max_lines_(max_lines) {}

  // Consumes bytes up to the end of the reply (or all of `data` when more is needed).
  // `consumed` tells how many bytes were used, so pipelined bytes after a reply stay with
  // the caller. After complete or error, call reset() before parsing the next reply.
  Status feed(std::string_view data, size_t& consumed);
  Status feed(std::string_view data) {
    size_t c = 0;
    return feed(data, c);
  }

  void reset();
  int code() const { return code_; }
  // Text of all lines joined with ' ' (without codes), for logs: "4.3.2 All ports busy".
  const std::string& text() const { return text_; }
  size_t lines() const { return lines_; }
  const std::string& error() const { return error_; }

 private:
  Status finish_line();

  size_t max_line_;
  size_t max_lines_;
  std::string line_;  // current partial line
  std::string text_;
  std::string error_;
  int code_ = 0;
  size_t lines_ = 0;
  Status status_ = Status::need_more;
};

// Verdict on a greeting's first line for the banner-gated handoff: "220 ..." or "220-..."
// is accepted; anything else is not. `line` excludes the line ending.
bool is_positive_greeting(std::string_view line);

// smtplb's own answer when it cannot serve a client (no server, a limit, stopping):
// "421 4.3.2 <hostname> Service not available, try again later\r\n".
std::string service_unavailable_reply(std::string_view hostname);
// To a client the listener's deny list (or allow list) refuses:
// "554 5.7.1 <hostname> Access denied\r\n".
std::string access_denied_reply(std::string_view hostname);
// To a client over its per-client limit or rate:
// "421 4.7.0 <hostname> Too many connections from your address, try again later\r\n".
std::string too_many_connections_reply(std::string_view hostname);

// Sanitises peer text for a log line: printable ASCII, line ends dropped, at most `max`
// bytes (a shortened result ends in "...").
std::string printable(std::string_view text, size_t max = 120);

}  // namespace smtplb
