#include "smtplb/log/access_log.hpp"

#include <fmt/format.h>

namespace smtplb {

std::string format_access_text(const AccessRecord& r) {
  return fmt::format(
      "client={} listener={} pool={} server={} tries={} Tw={} Tc={} Tb={} Tt={} bytes_in={} "
      "bytes_out={} term={}{}",
      r.client, r.listener, r.pool.empty() ? std::string_view("-") : r.pool,
      r.server.empty() ? std::string_view("-") : r.server, r.tries, r.tw_ms, r.tc_ms, r.tb_ms, r.tt_ms, r.bytes_in,
      r.bytes_out, r.term.cause_char(), r.term.phase_char());
}

std::string json_quote(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20)
          out += fmt::format("\\u{:04x}", c);
        else
          out += char(c);
    }
  }
  out += '"';
  return out;
}

std::string format_access_json(const AccessRecord& r) {
  const char term[3] = {r.term.cause_char(), r.term.phase_char(), '\0'};
  return fmt::format(
      "{{\"client\":{},\"listener\":{},\"pool\":{},\"server\":{},\"tries\":{},\"Tw\":{},\"Tc\":{},\"Tb\":{},"
      "\"Tt\":{},\"bytes_in\":{},\"bytes_out\":{},\"term\":{}}}",
      json_quote(r.client), json_quote(r.listener), json_quote(r.pool.empty() ? std::string_view("-") : r.pool),
      json_quote(r.server.empty() ? std::string_view("-") : r.server), r.tries, r.tw_ms, r.tc_ms, r.tb_ms, r.tt_ms,
      r.bytes_in, r.bytes_out, json_quote(term));
}

}  // namespace smtplb
