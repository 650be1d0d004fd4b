#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <set>
#include <string>

#include "smtplb/log/access_log.hpp"

using smtplb::AccessRecord;
using smtplb::Cause;
using smtplb::format_access_text;
using smtplb::Phase;

TEST_CASE("access log: the line of docs/logging.md") {
  AccessRecord r;
  r.client = "203.0.113.9:40122";
  r.listener = "mx";
  r.pool = "postfix";
  r.server = "pf1";
  r.tries = 1;
  r.tw_ms = 0;
  r.tc_ms = 2;
  r.tb_ms = 14;
  r.tt_ms = 5012;
  r.bytes_in = 1834;
  r.bytes_out = 912;
  CHECK(format_access_text(r) ==
        "client=203.0.113.9:40122 listener=mx pool=postfix server=pf1 tries=1 Tw=0 Tc=2 Tb=14 Tt=5012 "
        "bytes_in=1834 bytes_out=912 term=--");
}

TEST_CASE("access log: a session that never reached a server") {
  AccessRecord r;
  r.client = "[2001:db8::1]:5000";
  r.listener = "submission";
  r.pool = "";
  r.server = "";
  r.tries = 3;
  r.tt_ms = 15003;
  r.bytes_out = 62;
  r.term = {Cause::server, Phase::greeting};
  // Unset times stay -1 (HAProxy's "never happened"); empty pool and server print "-".
  CHECK(format_access_text(r) ==
        "client=[2001:db8::1]:5000 listener=submission pool=- server=- tries=3 Tw=0 Tc=-1 Tb=-1 "
        "Tt=15003 bytes_in=0 bytes_out=62 term=SH");
}

TEST_CASE("access log: termination codes and extreme counters") {
  AccessRecord r;
  r.client = "127.0.0.1:1";
  r.listener = "l";
  r.pool = "p";
  r.server = "-";
  r.bytes_in = std::numeric_limits<uint64_t>::max();
  r.bytes_out = std::numeric_limits<uint64_t>::max();
  r.tt_ms = std::numeric_limits<int64_t>::max();
  r.term = {Cause::killed, Phase::data};
  CHECK(format_access_text(r) ==
        "client=127.0.0.1:1 listener=l pool=p server=- tries=0 Tw=0 Tc=-1 Tb=-1 "
        "Tt=9223372036854775807 bytes_in=18446744073709551615 bytes_out=18446744073709551615 term=KD");
  r.term = {Cause::client_timeout, Phase::data};
  CHECK(format_access_text(r).ends_with(" term=cD"));
  r.term = {Cause::local, Phase::queue};
  CHECK(format_access_text(r).ends_with(" term=LQ"));
}

TEST_CASE("access log: default record") {
  AccessRecord r;
  CHECK(format_access_text(r) ==
        "client= listener= pool=- server=- tries=0 Tw=0 Tc=-1 Tb=-1 Tt=0 bytes_in=0 bytes_out=0 term=--");
}

TEST_CASE("access log: JSON has the same fields and escapes") {
  smtplb::AccessRecord r;
  r.client = "203.0.113.9:40122";
  r.listener = "mx";
  r.pool = "postfix";
  r.server = "pf\"1";
  r.tries = 2;
  r.tw_ms = 0;
  r.tc_ms = 2;
  r.tb_ms = 14;
  r.tt_ms = 5012;
  r.bytes_in = 1834;
  r.bytes_out = 912;
  r.term = {Cause::server, Phase::greeting};
  CHECK(smtplb::format_access_json(r) ==
        "{\"client\":\"203.0.113.9:40122\",\"listener\":\"mx\",\"pool\":\"postfix\",\"server\":\"pf\\\"1\","
        "\"tries\":2,\"Tw\":0,\"Tc\":2,\"Tb\":14,\"Tt\":5012,\"bytes_in\":1834,\"bytes_out\":912,\"term\":\"SH\"}");
  CHECK(smtplb::json_quote(std::string_view("a\\b\n\x01", 5)) == "\"a\\\\b\\n\\u0001\"");
}

TEST_CASE("termination codes: one rendering, one counter slot each") {
  using smtplb::kTermSlots;
  using smtplb::TermCode;
  std::set<std::string> texts;
  size_t possible = 0;
  for (size_t i = 0; i < kTermSlots; ++i) {
    const TermCode t = TermCode::from_index(i);
    CHECK(t.index() == i);
    if (!t.possible()) continue;
    ++possible;
    texts.insert(t.text());
  }
  CHECK(texts.size() == possible);
  CHECK(possible > kTermSlots / 2);
  CHECK(TermCode{}.text() == "--");
  CHECK(TermCode{Cause::server_timeout, Phase::queue}.text() == "sQ");
  CHECK(TermCode{Cause::resource, Phase::connect}.text() == "RC");
  CHECK(TermCode{Cause::proxy, Phase::proxy_header}.text() == "PR");
  CHECK(TermCode{Cause::killed, Phase::greeting}.text() == "KH");
  CHECK(TermCode{Cause::client, Phase::limit}.text() == "CL");
  CHECK(TermCode{Cause::client_rule, Phase::limit}.text() == "cL");
  CHECK(TermCode{Cause::client_rule, Phase::acl}.text() == "cA");
}
