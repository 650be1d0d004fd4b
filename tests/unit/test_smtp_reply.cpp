#include <doctest/doctest.h>

#include <string>
#include <string_view>
#include <vector>

#include "smtplb/proto/smtp_reply.hpp"

using smtplb::is_positive_greeting;
using smtplb::printable;
using smtplb::SmtpReplyParser;
using Status = SmtpReplyParser::Status;

namespace {

const std::string kEhlo =
    "250-mx1.example.net\r\n"
    "250-PIPELINING\r\n"
    "250-SIZE 10240000\r\n"
    "250-STARTTLS\r\n"
    "250 8BITMIME\r\n";
const std::string kEhloText = "mx1.example.net PIPELINING SIZE 10240000 STARTTLS 8BITMIME";

// Feeds `chunks` in order and requires every chunk before the last to be swallowed whole.
Status feed_chunks(SmtpReplyParser& p, const std::vector<std::string_view>& chunks, size_t& last_consumed) {
  Status st = Status::need_more;
  for (size_t i = 0; i < chunks.size(); ++i) {
    size_t consumed = 12345;
    st = p.feed(chunks[i], consumed);
    REQUIRE(consumed <= chunks[i].size());
    if (i + 1 < chunks.size()) {
      REQUIRE(st == Status::need_more);
      REQUIRE(consumed == chunks[i].size());
    }
    last_consumed = consumed;
  }
  return st;
}

}  // namespace

TEST_CASE("smtp reply: single-line greeting") {
  SmtpReplyParser p;
  const std::string in = "220 mx1.example.net ESMTP Postfix (Debian/GNU)\r\n";
  size_t consumed = 0;
  CHECK(p.feed(in, consumed) == Status::complete);
  CHECK(consumed == in.size());
  CHECK(p.code() == 220);
  CHECK(p.text() == "mx1.example.net ESMTP Postfix (Debian/GNU)");
  CHECK(p.lines() == 1);
  CHECK(p.error().empty());
}

TEST_CASE("smtp reply: multi-line EHLO reply") {
  SmtpReplyParser p;
  size_t consumed = 0;
  CHECK(p.feed(kEhlo, consumed) == Status::complete);
  CHECK(consumed == kEhlo.size());
  CHECK(p.code() == 250);
  CHECK(p.lines() == 5);
  CHECK(p.text() == kEhloText);
}

TEST_CASE("smtp reply: bare codes, empty texts and bare LF") {
  SmtpReplyParser p;
  CHECK(p.feed("250\r\n") == Status::complete);
  CHECK(p.code() == 250);
  CHECK(p.text().empty());
  p.reset();
  CHECK(p.feed("250-\r\n250 ok\r\n") == Status::complete);
  CHECK(p.lines() == 2);
  CHECK(p.text() == "ok");
  p.reset();
  CHECK(p.feed("221 ") == Status::need_more);
  CHECK(p.feed("\r\n") == Status::complete);
  CHECK(p.code() == 221);
  CHECK(p.text().empty());
  p.reset();
  // Some peers end lines with LF alone; accept them.
  CHECK(p.feed("250-a\n250 b\n") == Status::complete);
  CHECK(p.text() == "a b");
  p.reset();
  CHECK(p.feed("354 go ahead\r\n") == Status::complete);
  CHECK(p.code() == 354);
}

TEST_CASE("smtp reply: every code class 2xx to 5xx") {
  for (std::string code : {"200", "220", "250", "354", "421", "450", "500", "554", "599", "299"}) {
    SmtpReplyParser p;
    CAPTURE(code);
    CHECK(p.feed(code + " x\r\n") == Status::complete);
    CHECK(p.code() == std::stoi(code));
  }
}

TEST_CASE("smtp reply: nothing is complete before the final line ends") {
  SmtpReplyParser p;
  size_t consumed = 0;
  CHECK(p.feed("", consumed) == Status::need_more);
  CHECK(consumed == 0);
  CHECK(p.feed("250-first\r\n", consumed) == Status::need_more);
  CHECK(consumed == 11);
  CHECK(p.lines() == 1);
  CHECK(p.feed("250 last", consumed) == Status::need_more);
  CHECK(consumed == 8);
  CHECK(p.feed("\r", consumed) == Status::need_more);
  CHECK(p.feed("\n", consumed) == Status::complete);
  CHECK(consumed == 1);
  CHECK(p.text() == "first last");
}

TEST_CASE("smtp reply: split at every byte position") {
  const std::string in = kEhlo;
  for (size_t i = 0; i < in.size(); ++i) {
    SmtpReplyParser p;
    size_t consumed = 0;
    CAPTURE(i);
    Status st = feed_chunks(p, {std::string_view(in).substr(0, i), std::string_view(in).substr(i)}, consumed);
    CHECK(st == Status::complete);
    CHECK(consumed == in.size() - i);
    CHECK(p.code() == 250);
    CHECK(p.lines() == 5);
    CHECK(p.text() == kEhloText);
  }
}

TEST_CASE("smtp reply: split at every pair of byte positions") {
  const std::string in = "250-mx.example\r\n250-SIZE 1000\r\n250 PIPELINING\r\n";
  const std::string_view v(in);
  for (size_t i = 0; i < in.size(); ++i) {
    for (size_t j = i; j < in.size(); ++j) {
      SmtpReplyParser p;
      size_t consumed = 0;
      Status st = feed_chunks(p, {v.substr(0, i), v.substr(i, j - i), v.substr(j)}, consumed);
      CAPTURE(i);
      CAPTURE(j);
      REQUIRE(st == Status::complete);
      REQUIRE(consumed == in.size() - j);
      REQUIRE(p.text() == "mx.example SIZE 1000 PIPELINING");
      REQUIRE(p.lines() == 3);
    }
  }
}

TEST_CASE("smtp reply: one byte at a time") {
  SmtpReplyParser p;
  for (size_t i = 0; i < kEhlo.size(); ++i) {
    size_t consumed = 0;
    Status st = p.feed(std::string_view(kEhlo).substr(i, 1), consumed);
    CAPTURE(i);
    REQUIRE(consumed == 1);
    REQUIRE(st == (i + 1 == kEhlo.size() ? Status::complete : Status::need_more));
  }
  CHECK(p.text() == kEhloText);
}

TEST_CASE("smtp reply: pipelined bytes after a reply stay with the caller") {
  SmtpReplyParser p;
  const std::string in = "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n";
  size_t consumed = 0;
  CHECK(p.feed(in, consumed) == Status::complete);
  CHECK(consumed == 14);
  CHECK(p.text() == "2.1.0 Ok");
  // A finished parser consumes nothing more until reset.
  CHECK(p.feed(std::string_view(in).substr(consumed), consumed) == Status::complete);
  CHECK(consumed == 0);
  CHECK(p.text() == "2.1.0 Ok");

  p.reset();
  CHECK(p.code() == 0);
  CHECK(p.lines() == 0);
  CHECK(p.text().empty());
  std::string_view rest = std::string_view(in).substr(14);
  CHECK(p.feed(rest, consumed) == Status::complete);
  CHECK(consumed == 14);
  CHECK(p.text() == "2.1.5 Ok");
  p.reset();
  rest = rest.substr(consumed);
  CHECK(p.feed(rest, consumed) == Status::complete);
  CHECK(consumed == rest.size());
  CHECK(p.code() == 354);
  CHECK(p.text() == "End data with <CR><LF>.<CR><LF>");
}

TEST_CASE("smtp reply: the end of a reply split from pipelined bytes") {
  SmtpReplyParser p;
  size_t consumed = 0;
  CHECK(p.feed("220-hello\r\n22", consumed) == Status::need_more);
  CHECK(consumed == 13);
  CHECK(p.feed("0 there\r\n221 2.0.0 Bye\r\n", consumed) == Status::complete);
  CHECK(consumed == 9);
  CHECK(p.text() == "hello there");
  CHECK(p.lines() == 2);
}

TEST_CASE("smtp reply: garbage is an error") {
  const std::vector<std::string> bad = {
      "HTTP/1.1 400 Bad Request\r\n",
      "\r\n",
      "\n",
      "25\r\n",
      "2\r\n",
      "250x\r\n",
      "2500\r\n",
      "250_ok\r\n",
      "199 too low\r\n",
      "600 too high\r\n",
      "000 zero\r\n",
      "100 continue\r\n",
      " 250 leading space\r\n",
      "25O letter O\r\n",
      "ehlo\r\n",
      std::string("\0\0\0\r\n", 5),
      std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", 12),  // a TLS ClientHello
  };
  for (const auto& in : bad) {
    SmtpReplyParser p;
    CAPTURE(printable(in));
    size_t consumed = 0;
    CHECK(p.feed(in, consumed) == Status::error);
    CHECK(consumed <= in.size());
    CHECK(p.error().find("malformed reply line") != std::string::npos);
    // Sticky until reset.
    CHECK(p.feed("250 ok\r\n", consumed) == Status::error);
    CHECK(consumed == 0);
    p.reset();
    CHECK(p.error().empty());
    CHECK(p.feed("250 ok\r\n") == Status::complete);
  }
}

TEST_CASE("smtp reply: garbage after a valid first line") {
  SmtpReplyParser p;
  size_t consumed = 0;
  CHECK(p.feed("250-ok\r\nnonsense\r\n250 end\r\n", consumed) == Status::error);
  CHECK(consumed == 18);
  CHECK(p.error().find("nonsense") != std::string::npos);
}

TEST_CASE("smtp reply: the error message of a hostile line is printable") {
  SmtpReplyParser p;
  CHECK(p.feed(std::string("\x1b[31mred\x07\xff") + std::string(200, 'A') + "\r\n") == Status::error);
  for (char c : p.error()) {
    CAPTURE(int(static_cast<unsigned char>(c)));
    CHECK((c >= 0x20 && c < 0x7f));
  }
  CHECK(p.error().size() < 120);
}

TEST_CASE("smtp reply: code change within one reply") {
  SmtpReplyParser p;
  size_t consumed = 0;
  CHECK(p.feed("250-first\r\n251 second\r\n", consumed) == Status::error);
  CHECK(consumed == 23);
  CHECK(p.error().find("250") != std::string::npos);
  CHECK(p.error().find("251") != std::string::npos);

  SmtpReplyParser q;
  CHECK(q.feed("220-mx ESMTP\r\n") == Status::need_more);
  CHECK(q.feed("421 4.3.2 going away\r\n") == Status::error);
}

TEST_CASE("smtp reply: overlong line without a line end is refused early") {
  SmtpReplyParser p;  // default 2048
  const std::string junk(5000, 'x');
  size_t consumed = 0;
  CHECK(p.feed(junk, consumed) == Status::error);
  CHECK(consumed == junk.size());
  CHECK(p.error().find("longer than 2048") != std::string::npos);

  // Byte by byte: memory stays bounded, the error comes with the first byte that does not fit.
  SmtpReplyParser q;
  size_t fed = 0;
  Status st = Status::need_more;
  while (st == Status::need_more && fed < junk.size()) {
    st = q.feed(std::string_view(junk).substr(fed, 1), consumed);
    REQUIRE(consumed == 1);
    ++fed;
  }
  CHECK(st == Status::error);
  CHECK(fed == 2049);
}

TEST_CASE("smtp reply: line length limit") {
  // A line that fits with its CRLF is accepted; one whose text alone is too long is not.
  SmtpReplyParser p(16, 8);
  CHECK(p.feed("250 0123456789\r\n") == Status::complete);  // 16 bytes with CRLF
  p.reset();
  CHECK(p.feed("250 0123456789abcdef\r\n") == Status::error);
  CHECK(p.error().find("longer than 16") != std::string::npos);
  p.reset();
  // The limit is per line, not per reply.
  CHECK(p.feed("250-0123456789\r\n250-0123456789\r\n250 0123456789\r\n") == Status::complete);
  CHECK(p.lines() == 3);

  SmtpReplyParser big;
  const std::string long_ok = "250 " + std::string(2000, 'a') + "\r\n";
  CHECK(big.feed(long_ok) == Status::complete);
  CHECK(big.text().size() == 2000);
}

TEST_CASE("smtp reply: line count limit") {
  SmtpReplyParser p(2048, 3);
  CHECK(p.feed("250-a\r\n250-b\r\n250 c\r\n") == Status::complete);
  p.reset();
  size_t consumed = 0;
  CHECK(p.feed("250-a\r\n250-b\r\n250-c\r\n250 d\r\n", consumed) == Status::error);
  CHECK(p.error().find("longer than 3 lines") != std::string::npos);

  // An endless continuation is cut off by the default limit too.
  SmtpReplyParser q;
  std::string flood;
  for (int i = 0; i < 200; ++i) flood += "250-x\r\n";
  CHECK(q.feed(flood, consumed) == Status::error);
  CHECK(consumed == 129 * 7);
}

TEST_CASE("smtp reply: reset discards a partial reply") {
  SmtpReplyParser p;
  CHECK(p.feed("250-abc\r\n250 de") == Status::need_more);
  p.reset();
  CHECK(p.feed("421 4.3.2 busy\r\n") == Status::complete);
  CHECK(p.code() == 421);
  CHECK(p.text() == "4.3.2 busy");
  CHECK(p.lines() == 1);
}

TEST_CASE("smtp reply: positive greeting") {
  CHECK(is_positive_greeting("220 mx.example ESMTP"));
  CHECK(is_positive_greeting("220-mx.example ESMTP"));
  CHECK(is_positive_greeting("220"));
  CHECK(is_positive_greeting("220\r"));
  CHECK(is_positive_greeting("220 "));
  CHECK(is_positive_greeting("220 x\r"));

  CHECK_FALSE(is_positive_greeting(""));
  CHECK_FALSE(is_positive_greeting("\r"));
  CHECK_FALSE(is_positive_greeting("22"));
  CHECK_FALSE(is_positive_greeting("2200 x"));
  CHECK_FALSE(is_positive_greeting("220x"));
  CHECK_FALSE(is_positive_greeting("221 bye"));
  CHECK_FALSE(is_positive_greeting("250 ok"));
  CHECK_FALSE(is_positive_greeting("421 4.3.2 All server ports are busy"));
  CHECK_FALSE(is_positive_greeting("554 5.7.1 go away"));
  CHECK_FALSE(is_positive_greeting(" 220 x"));
  CHECK_FALSE(is_positive_greeting("SSH-2.0-OpenSSH_9.2"));
}

TEST_CASE("smtp reply: printable") {
  CHECK(printable("hello world") == "hello world");
  CHECK(printable("a\r\nb") == "ab");
  CHECK(printable("tab\there") == "tab?here");
  CHECK(printable("\x1b[0m") == "?[0m");
  CHECK(printable("caf\xc3\xa9") == "caf??");
  CHECK(printable(std::string("a\0b", 3)) == "a?b");
  CHECK(printable("") == "");
  const std::string s = printable(std::string(500, 'a'), 120);
  CHECK(s.size() == 120);
  CHECK(s.starts_with(std::string(117, 'a')));
  CHECK(s.ends_with("..."));
  // Exactly max bytes is not shortened.
  CHECK(printable(std::string(120, 'b'), 120) == std::string(120, 'b'));
}

TEST_CASE("smtp reply: printable honours its max") {
  for (size_t max : {0u, 1u, 10u, 120u}) {
    CAPTURE(max);
    CHECK(printable(std::string(500, 'a'), max).size() <= max);
  }
  CHECK(printable("abc\r\n", 3) == "abc");
}
