#pragma once
// The edge defences applied to one new client: the listener's allow / deny lists, then
// its per-client limits in the shared client table (unless the address is exempt).
// Counts its refusals in the listener's counters; the caller replies, logs and holds the
// pin for the session's life.
#include <cstdint>

#include "runtime/server_pool.hpp"

namespace smtplb {

struct EdgeCheck {
  enum class Outcome : uint8_t { pass, deny, limit };
  Outcome outcome = Outcome::pass;
  ClientTable::Verdict verdict = ClientTable::Verdict::ok;  // why a limit refused (or would have)
  bool dry_run = false;                                     // a limit would have refused (limits_dry_run)
  ClientKey key;
  ClientTable::Entry* pin = nullptr;  // an admitted session's hold on its key: release at its end
};

EdgeCheck check_edge(const ListenerRuntime& lr, ClientTable& table, const SocketAddress& client, int64_t now_ms);

}  // namespace smtplb
