#pragma once
// The access line of a finished session (or a refused client) as a pure formatter.
#include <cstdint>
#include <string>
#include <string_view>

#include "smtplb/log/term_code.hpp"

namespace smtplb {

struct AccessRecord {
  std::string_view client;  // "203.0.113.9:40122"
  std::string_view listener;
  std::string_view pool;
  std::string_view server;  // "-" when none was reached
  unsigned tries = 0;       // backend connection attempts
  int64_t tw_ms = 0;        // time queued for a free server slot; 0 when not queued
  int64_t tc_ms = -1;       // connect time of the final attempt; -1 = not connected
  int64_t tb_ms = -1;       // connect -> greeting accepted; -1 = no greeting
  int64_t tt_ms = 0;        // whole session
  uint64_t bytes_in = 0;    // from the client
  uint64_t bytes_out = 0;   // to the client
  TermCode term;
};

std::string format_access_text(const AccessRecord& r);
// The same fields as one JSON object: {"client":"...","listener":"...",...,"term":"--"}.
std::string format_access_json(const AccessRecord& r);
// A JSON string literal (quotes included) with the escapes JSON requires.
std::string json_quote(std::string_view s);

}  // namespace smtplb
