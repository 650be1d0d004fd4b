#include "smtplb/proto/smtp_reply.hpp"

#include <algorithm>

namespace smtplb {

void SmtpReplyParser::reset() {
  line_.clear();
  text_.clear();
  error_.clear();
  code_ = 0;
  lines_ = 0;
  status_ = Status::need_more;
}

SmtpReplyParser::Status SmtpReplyParser::feed(std::string_view data, size_t& consumed) {
  consumed = 0;
  if (status_ != Status::need_more) return status_;
  while (consumed < data.size()) {
    size_t nl = data.find('\n', consumed);
    size_t end = nl == std::string_view::npos ? data.size() : nl;
    size_t room = max_line_ - line_.size();
    if (end - consumed > room) {
      consumed = data.size();
      error_ = "reply line longer than " + std::to_string(max_line_) + " bytes";
      return status_ = Status::error;
    }
    line_.append(data.data() + consumed, end - consumed);
    if (nl == std::string_view::npos) {
      consumed = data.size();
      return status_;
    }
    consumed = nl + 1;
    if (finish_line() != Status::need_more) return status_;
  }
  return status_;
}

SmtpReplyParser::Status SmtpReplyParser::finish_line() {
  if (!line_.empty() && line_.back() == '\r') line_.pop_back();
  auto digit = [](char c) { return c >= '0' && c <= '9'; };
  if (line_.size() < 3 || !digit(line_[0]) || !digit(line_[1]) || !digit(line_[2]) || line_[0] < '2' ||
      line_[0] > '5' || (line_.size() > 3 && line_[3] != ' ' && line_[3] != '-')) {
    error_ = "malformed reply line \"" + printable(line_, 60) + "\"";
    return status_ = Status::error;
  }
  int code = (line_[0] - '0') * 100 + (line_[1] - '0') * 10 + (line_[2] - '0');
  if (lines_ > 0 && code != code_) {
    error_ = "reply code changed from " + std::to_string(code_) + " to " + std::to_string(code) + " within one reply";
    return status_ = Status::error;
  }
  code_ = code;
  if (++lines_ > max_lines_) {
    error_ = "reply longer than " + std::to_string(max_lines_) + " lines";
    return status_ = Status::error;
  }
  if (line_.size() > 4) {
    if (!text_.empty()) text_ += ' ';
    text_.append(line_, 4);
  }
  bool last = line_.size() == 3 || line_[3] == ' ';
  line_.clear();
  if (last) status_ = Status::complete;
  return status_;
}

std::string service_unavailable_reply(std::string_view hostname) {
  return "421 4.3.2 " + std::string(hostname) + " Service not available, try again later\r\n";
}

std::string access_denied_reply(std::string_view hostname) {
  return "554 5.7.1 " + std::string(hostname) + " Access denied\r\n";
}

std::string too_many_connections_reply(std::string_view hostname) {
  return "421 4.7.0 " + std::string(hostname) + " Too many connections from your address, try again later\r\n";
}

bool is_positive_greeting(std::string_view line) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  if (line.size() < 3 || line.substr(0, 3) != "220") return false;
  return line.size() == 3 || line[3] == ' ' || line[3] == '-';
}

std::string printable(std::string_view text, size_t max) {
  std::string out;
  for (char c : text) {
    if (c == '\r' || c == '\n') continue;
    unsigned char u = static_cast<unsigned char>(c);
    out += (u >= 0x20 && u < 0x7f) ? c : '?';
  }
  if (out.size() > max) {
    // Shortened: the result, marker included, still fits in max bytes.
    out.resize(max > 3 ? max - 3 : 0);
    out += "...";
    out.resize(std::min(out.size(), max));
  }
  return out;
}

}  // namespace smtplb
