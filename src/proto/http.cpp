#include "smtplb/proto/http.hpp"

#include <algorithm>

namespace smtplb::http {

namespace {

// Longest request-target accepted (414 beyond); the admin API's paths are short.
constexpr size_t kMaxTarget = 2048;

// RFC 9110 5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
// "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
bool is_tchar(char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  switch (c) {
    case '!':
    case '#':
    case '$':
    case '%':
    case '&':
    case '\'':
    case '*':
    case '+':
    case '-':
    case '.':
    case '^':
    case '_':
    case '`':
    case '|':
    case '~':
      return true;
    default:
      return false;
  }
}

bool is_token(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), is_tchar);
}

bool is_ows(char c) {
  return c == ' ' || c == '\t';
}

char lower(char c) {
  return c >= 'A' && c <= 'Z' ? char(c - 'A' + 'a') : c;
}

bool iequals(std::string_view a, std::string_view b) {
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) { return lower(x) == lower(y); });
}

std::string_view trim_ows(std::string_view s) {
  while (!s.empty() && is_ows(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_ows(s.back())) s.remove_suffix(1);
  return s;
}

bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

// Whether a Connection header value lists `option` (comma-separated, case-insensitive).
bool lists_option(std::string_view value, std::string_view option) {
  while (true) {
    const size_t comma = value.find(',');
    if (iequals(trim_ows(value.substr(0, comma)), option)) return true;
    if (comma == std::string_view::npos) return false;
    value.remove_prefix(comma + 1);
  }
}

// Parses `METHOD SP origin-form SP HTTP/1.x` into req; returns 0, or the status code
// to answer with a reason in `why`.
int parse_request_line(std::string_view line, Request& req, std::string& why) {
  const size_t sp1 = line.find(' ');
  if (sp1 == std::string_view::npos) {
    why = "request line is not 'METHOD target HTTP/1.x'";
    return 400;
  }
  const std::string_view method = line.substr(0, sp1);
  if (!is_token(method)) {
    why = "invalid method";
    return 400;
  }
  const size_t sp2 = line.find(' ', sp1 + 1);
  if (sp2 == std::string_view::npos) {
    why = "request line is not 'METHOD target HTTP/1.x'";
    return 400;
  }
  const std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  const std::string_view version = line.substr(sp2 + 1);
  if (target.size() > kMaxTarget) {
    why = "request target longer than " + std::to_string(kMaxTarget) + " bytes";
    return 414;
  }
  if (target.empty()) {
    why = "empty request target";
    return 400;
  }
  if (target.front() != '/') {
    why = target == "*" ? "asterisk-form request target" : "request target is not a path (origin-form)";
    return 400;
  }
  for (char c : target) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7f) {
      why = "invalid character in request target";
      return 400;
    }
  }
  if (version.size() != 8 || version.substr(0, 5) != "HTTP/" || !is_digit(version[5]) || version[6] != '.' ||
      !is_digit(version[7])) {
    why = "invalid HTTP version";
    return 400;
  }
  if (version[5] != '1') {
    why = "HTTP version " + std::string(version.substr(5)) + " is not supported (only HTTP/1.x)";
    return 505;
  }
  req.method = method;
  req.target = target;
  req.path = target.substr(0, target.find('?'));
  req.version_minor = version[7] - '0';
  return 0;
}

}  // namespace

const std::string* Request::header(std::string_view name) const {
  for (const auto& [n, v] : headers) {
    if (n == name) return &v;
  }
  return nullptr;
}

void RequestParser::reset() {
  head_.clear();
  body_needed_ = 0;
  in_body_ = false;
  req_ = Request{};
  status_code_ = 0;
  error_.clear();
  status_ = Status::need_more;
}

RequestParser::Status RequestParser::fail(int code, std::string why) {
  status_code_ = code;
  error_ = std::move(why);
  return status_ = Status::error;
}

// The head is kept whole in head_ until its empty line arrives (bounded by kMaxHead), so
// a split anywhere in the stream reaches the same verdicts at the same byte: the request
// line is checked when its line feed arrives, the headers when the empty line does.
RequestParser::Status RequestParser::feed(std::string_view data, size_t& consumed) {
  consumed = 0;
  if (status_ != Status::need_more) return status_;
  while (consumed < data.size()) {
    if (in_body_) {
      const size_t take = std::min(body_needed_, data.size() - consumed);
      req_.body.append(data.data() + consumed, take);
      consumed += take;
      body_needed_ -= take;
      if (body_needed_ == 0) {
        in_body_ = false;
        return status_ = Status::complete;
      }
      continue;
    }
    const size_t nl = data.find('\n', consumed);
    const size_t end = nl == std::string_view::npos ? data.size() : nl + 1;
    const size_t room = kMaxHead - head_.size();
    if (end - consumed > room) {
      // Stop at the byte that makes the head one longer than allowed.
      const std::string_view piece = data.substr(consumed, room + 1);
      consumed += piece.size();
      const std::string limit = std::to_string(kMaxHead);
      if (!req_.method.empty()) return fail(431, "request head longer than " + limit + " bytes");
      if (head_.find_first_not_of("\r\n") == std::string::npos &&
          piece.find_first_not_of("\r\n") == std::string_view::npos) {
        return fail(400, "no request line in the first " + limit + " bytes");
      }
      return fail(414, "request line longer than the " + limit + "-byte head limit");
    }
    head_.append(data.data() + consumed, end - consumed);
    consumed = end;
    if (nl == std::string_view::npos) return status_;

    // A line ended; it is the end of head_.
    std::string_view line(head_.data(), head_.size() - 1);
    const size_t prev = line.rfind('\n');
    if (prev != std::string_view::npos) line.remove_prefix(prev + 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (req_.method.empty()) {
      // RFC 9112 2.2: empty lines before the request line are ignored (they still count
      // towards kMaxHead).
      if (line.empty()) continue;
      std::string why;
      const int code = parse_request_line(line, req_, why);
      if (code != 0) return fail(code, std::move(why));
    } else if (line.empty() && parse_head() != Status::need_more) {
      return status_;
    }
  }
  return status_;
}

// Called with the whole head in head_, request line already checked: parses the header
// lines and decides the body length.
RequestParser::Status RequestParser::parse_head() {
  std::string_view rest(head_);
  bool seen_request_line = false;
  while (!rest.empty()) {
    const size_t nl = rest.find('\n');  // every line of head_ ends with one
    std::string_view line = rest.substr(0, nl);
    rest.remove_prefix(nl + 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (!seen_request_line) {
      seen_request_line = !line.empty();
      continue;
    }
    if (line.empty()) break;  // the end of the head
    if (is_ows(line.front())) return fail(400, "obsolete line folding in headers");
    const size_t colon = line.find(':');
    if (colon == std::string_view::npos) return fail(400, "header line without a colon");
    const std::string_view name = line.substr(0, colon);
    if (name.empty()) return fail(400, "empty header name");
    if (is_ows(name.back())) return fail(400, "whitespace between header name and colon");
    if (!is_token(name)) return fail(400, "invalid character in header name");
    const std::string_view value = trim_ows(line.substr(colon + 1));
    for (char c : value) {
      const auto u = static_cast<unsigned char>(c);
      if ((u < 0x20 && c != '\t') || u == 0x7f) return fail(400, "control character in header value");
    }
    std::string lname(name);
    std::transform(lname.begin(), lname.end(), lname.begin(), lower);
    req_.headers.emplace_back(std::move(lname), std::string(value));
  }

  bool close = false;
  bool keep_alive = false;
  bool have_length = false;
  size_t length = 0;
  for (const auto& [name, value] : req_.headers) {
    if (name == "transfer-encoding") {
      return fail(501, "Transfer-Encoding is not supported (no chunked bodies): send Content-Length");
    }
    if (name == "connection") {
      close = close || lists_option(value, "close");
      keep_alive = keep_alive || lists_option(value, "keep-alive");
    } else if (name == "content-length") {
      if (value.empty() || !std::all_of(value.begin(), value.end(), is_digit)) {
        return fail(400, "invalid Content-Length");
      }
      // Saturates just above kMaxBody: anything larger is refused the same way.
      size_t n = 0;
      for (char c : value) n = std::min(n * 10 + size_t(c - '0'), kMaxBody + 1);
      if (have_length && n != length) return fail(400, "conflicting Content-Length headers");
      have_length = true;
      length = n;
    }
  }
  if (length > kMaxBody) return fail(413, "body longer than " + std::to_string(kMaxBody) + " bytes");
  req_.keep_alive = req_.version_minor >= 1 ? !close : keep_alive && !close;
  if (length == 0) return status_ = Status::complete;
  in_body_ = true;
  body_needed_ = length;
  req_.body.reserve(length);
  return status_;
}

const char* reason(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 201:
      return "Created";
    case 202:
      return "Accepted";
    case 204:
      return "No Content";
    case 400:
      return "Bad Request";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 409:
      return "Conflict";
    case 411:
      return "Length Required";
    case 413:
      return "Content Too Large";
    case 414:
      return "URI Too Long";
    case 415:
      return "Unsupported Media Type";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "Unknown";
  }
}

}  // namespace smtplb::http
