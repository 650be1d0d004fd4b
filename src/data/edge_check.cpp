#include "data/edge_check.hpp"

namespace smtplb {

EdgeCheck check_edge(const ListenerRuntime& lr, ClientTable& table, const SocketAddress& client, int64_t now_ms) {
  EdgeCheck e;
  Addr128 a;
  if (!to_addr128(client, a)) return e;  // not an IP client (cannot happen on TCP listeners)
  const ListenerConfig& cfg = *lr.cfg;
  ListenerState& st = *lr.state;
  e.key = client_key(a, st.id, cfg.client_prefix_v4, cfg.client_prefix_v6);
  if (!lr.acl.allows(a)) {
    e.outcome = EdgeCheck::Outcome::deny;
    st.rejected_acl.fetch_add(1, std::memory_order_relaxed);
    return e;
  }
  if (!lr.limits.on() || (!cfg.limits_exempt.empty() && lr.exempt.allows(a))) return e;
  const ClientTable::Admission adm = table.admit(e.key, lr.limits, now_ms, cfg.limits_dry_run);
  e.verdict = adm.verdict;
  e.pin = adm.pin;
  if (adm.verdict == ClientTable::Verdict::ok) return e;
  const bool rate = adm.verdict == ClientTable::Verdict::over_rate;
  if (cfg.limits_dry_run) {
    e.dry_run = true;
    (rate ? st.dry_run_rate : st.dry_run_limit).fetch_add(1, std::memory_order_relaxed);
    return e;
  }
  e.outcome = EdgeCheck::Outcome::limit;
  (rate ? st.rejected_per_ip_rate : st.rejected_per_ip_limit).fetch_add(1, std::memory_order_relaxed);
  return e;
}

}  // namespace smtplb
