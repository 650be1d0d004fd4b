#include "smtplb/access_log.hpp"

#include <fmt/format.h>

namespace smtplb {

std::string format_access_text(const AccessRecord& r) {
  return fmt::format(
      "client={} listener={} pool={} server={} tries={} Tw={} Tc={} Tb={} Tt={} bytes_in={} "
      "bytes_out={} term={}{}",
      r.client, r.listener, r.pool.empty() ? std::string_view("-") : r.pool,
      r.server.empty() ? std::string_view("-") : r.server, r.tries, r.tw_ms, r.tc_ms, r.tb_ms,
      r.tt_ms, r.bytes_in, r.bytes_out, r.term.cause, r.term.phase);
}

}  // namespace smtplb
