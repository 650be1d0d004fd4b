#pragma once
// The per-session access line (DESIGN section 6) as a pure formatter.
#include <cstdint>
#include <string>
#include <string_view>

namespace smtplb {

// HAProxy-style two-character termination code: who ended the session, then in which
// phase. See docs/logging.md for the full table.
struct TermCode {
  char cause = '-';  // '-' normal, C client, S server, P proxy, L local reply, R resource,
                     // c client timeout, s server timeout, K killed (shutdown)
  char phase = '-';  // '-' normal, Q queue, C connect, H greeting, D data, L closing
};

struct AccessRecord {
  std::string_view client;    // "203.0.113.9:40122"
  std::string_view listener;
  std::string_view pool;
  std::string_view server;    // "-" when none was reached
  unsigned tries = 0;         // backend connection attempts
  int64_t tw_ms = -1;         // queue wait; -1 = never queued
  int64_t tc_ms = -1;         // connect time of the final attempt; -1 = not connected
  int64_t tb_ms = -1;         // connect -> greeting accepted; -1 = no greeting
  int64_t tt_ms = 0;          // whole session
  uint64_t bytes_in = 0;      // from the client
  uint64_t bytes_out = 0;     // to the client
  TermCode term;
};

std::string format_access_text(const AccessRecord& r);
// The same fields as one JSON object: {"client":"...","listener":"...",...,"term":"--"}.
std::string format_access_json(const AccessRecord& r);
// A JSON string literal (quotes included) with the escapes JSON requires.
std::string json_quote(std::string_view s);

}  // namespace smtplb
