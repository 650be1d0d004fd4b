// libFuzzer target for the incremental SMTP reply parser. The input is a byte stream from
// a backend; it is fed whole and in pseudo-random chunks (1..64 bytes), and both runs must
// see the same replies at the same offsets. Invariants are checked with abort(), so a
// violation is reported like a crash.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_check.hpp"
#include "smtplb/proto/smtp_reply.hpp"

namespace {

using smtplb::SmtpReplyParser;
using Status = SmtpReplyParser::Status;

// What the caller learns at the end of each reply, or at the end of the input.
struct Event {
  Status status;
  int code;
  size_t lines;
  std::string text;
  std::string error;
  size_t end;  // stream offset just after the reply; compared for complete replies only
               // (an overlong line swallows the rest of whatever chunk revealed it)

  bool operator==(const Event& o) const {
    return status == o.status && code == o.code && lines == o.lines && text == o.text && error == o.error &&
           (status != Status::complete || end == o.end);
  }
};

// Splits `data` into chunks (all at once when seed == 0) and parses reply after reply,
// resetting after each one as the session and health check code do; stops at the first
// error because callers drop the connection there.
std::vector<Event> parse_stream(std::string_view data, size_t max_line, size_t max_lines, uint64_t seed) {
  SmtpReplyParser p(max_line, max_lines);
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
        break;
      }
      FUZZ_CHECK(consumed > 0);
      // A finished parser keeps its verdict and consumes nothing until reset().
      size_t again = SIZE_MAX;
      FUZZ_CHECK(p.feed(rest.substr(consumed), again) == st);
      FUZZ_CHECK(again == 0);
      if (st == Status::complete) {
        FUZZ_CHECK(p.code() >= 200 && p.code() <= 599);
        FUZZ_CHECK(p.lines() >= 1 && p.lines() <= max_lines);
        FUZZ_CHECK(p.text().find('\n') == std::string::npos);
        FUZZ_CHECK(p.error().empty());
        // The reply ends with its line feed.
        FUZZ_CHECK(rest[consumed - 1] == '\n');
      } else {
        FUZZ_CHECK(!p.error().empty());
      }
      events.push_back({st, p.code(), p.lines(), p.text(), p.error(), pos + off + consumed});
      if (st == Status::error) return events;
      p.reset();
      FUZZ_CHECK(p.code() == 0 && p.lines() == 0 && p.text().empty() && p.error().empty());
      off += consumed;
    }
    pos += len;
  }
  events.push_back({Status::need_more, p.code(), p.lines(), p.text(), p.error(), data.size()});
  return events;
}

uint64_t fnv1a(std::string_view data) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : data) h = (h ^ c) * 1099511628211ULL;
  return h | 1;  // never 0, which means "whole"
}

void check_greeting(std::string_view data) {
  const std::string_view line = data.substr(0, data.find('\n'));
  const bool positive = smtplb::is_positive_greeting(line);
  if (positive) {
    FUZZ_CHECK(line.size() >= 3 && line.substr(0, 3) == "220");
  }
  // The handoff verdict and the parser agree on what a 220 greeting line is.
  if (positive && line.size() < 1000) {
    SmtpReplyParser p;
    const std::string with_end = std::string(line) + "\n";
    const Status st = p.feed(with_end);
    FUZZ_CHECK(st != Status::error);
    FUZZ_CHECK(p.code() == 220);
  }
}

void check_printable(std::string_view data) {
  const size_t max = data.empty() ? 0 : static_cast<unsigned char>(data[0]);
  const std::string out = smtplb::printable(data, max);
  for (char c : out) FUZZ_CHECK(c >= 0x20 && c < 0x7f);
  FUZZ_CHECK(out.size() <= max + 3);  // "..." is appended after `max` characters
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  const std::string_view data(reinterpret_cast<const char*>(bytes), size);
  const uint64_t seed = fnv1a(data);

  const auto whole = parse_stream(data, 2048, 128, 0);
  const auto chunked = parse_stream(data, 2048, 128, seed);
  FUZZ_CHECK(whole == chunked);

  // Tight limits reach the overlong-line and too-many-lines paths with short inputs.
  const auto small_whole = parse_stream(data, 16, 3, 0);
  const auto small_chunked = parse_stream(data, 16, 3, seed * 31 + 2);
  FUZZ_CHECK(small_whole == small_chunked);

  check_greeting(data);
  check_printable(data);
  return 0;
}
