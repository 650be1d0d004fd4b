#pragma once
// How a session ended, as a type: HAProxy-style two-character termination codes (who or
// what ended it, then in which phase), rendered to text here and nowhere else. See
// docs/logging.md for the table operators read.
#include <cstddef>
#include <cstdint>
#include <string>

namespace smtplb {

enum class Cause : uint8_t {
  none,            // '-' normal end
  client,          // 'C' the client closed or reset
  server,          // 'S' the server refused, reset, closed or sent no 220
  proxy,           // 'P' smtplb refused the connection (untrusted or malformed PROXY header)
  local,           // 'L' smtplb answered by itself
  resource,        // 'R' a limit or local resources (descriptors, ports, memory)
  client_timeout,  // 'c'
  server_timeout,  // 's'
  killed,          // 'K' smtplb was stopping
  client_rule,     // 'c' (with A or L) a rule on the client's address refused it
};

enum class Phase : uint8_t {
  none,          // '-' normal end
  queue,         // 'Q' waiting for a free server slot
  connect,       // 'C' connecting to a backend (or before: limits, no usable backend)
  greeting,      // 'H' waiting for the backend's greeting
  data,          // 'D' relaying
  limit,         // 'L' a per-client limit or rate (max_connections_per_ip, max_connection_rate_per_ip)
  proxy_header,  // 'R' reading the PROXY header of an upstream balancer
  acl,           // 'A' the listener's allow / deny lists
};

inline constexpr size_t kCauseCount = 10;
inline constexpr size_t kPhaseCount = 8;
inline constexpr size_t kTermSlots = kCauseCount * kPhaseCount;
// 'c' twice: a client timeout and a client refused by an address rule share HAProxy's
// letter for "the client's side"; the phase tells them apart (cA and cL are only ever
// address rules, a client timeout never happens in those phases).
inline constexpr char kCauseChars[kCauseCount + 1] = "-CSPLRcsKc";
inline constexpr char kPhaseChars[kPhaseCount + 1] = "-QCHDLRA";

struct TermCode {
  Cause cause = Cause::none;
  Phase phase = Phase::none;

  constexpr char cause_char() const { return kCauseChars[size_t(cause)]; }
  constexpr char phase_char() const { return kPhaseChars[size_t(phase)]; }
  // "--", "sQ", ...
  std::string text() const { return {cause_char(), phase_char()}; }
  // Slot of this code in per-listener counters.
  constexpr size_t index() const { return size_t(cause) * kPhaseCount + size_t(phase); }
  static constexpr TermCode from_index(size_t i) { return {Cause(i / kPhaseCount), Phase(i % kPhaseCount)}; }
  // False for the codes that share a rendering and that smtplb never produces: an address
  // rule refuses only in phase A or L, and a client timeout never happens there. The
  // other codes render uniquely.
  constexpr bool possible() const {
    const bool rule_phase = phase == Phase::acl || phase == Phase::limit;
    return cause == Cause::client_rule ? rule_phase : !(rule_phase && cause == Cause::client_timeout);
  }
  friend constexpr bool operator==(TermCode, TermCode) = default;
};

}  // namespace smtplb
