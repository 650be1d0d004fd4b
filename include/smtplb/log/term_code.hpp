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
};

enum class Phase : uint8_t {
  none,          // '-' normal end
  queue,         // 'Q' waiting for a free server slot
  connect,       // 'C' connecting to a backend (or before: limits, no usable backend)
  greeting,      // 'H' waiting for the backend's greeting
  data,          // 'D' relaying
  closing,       // 'L' closing
  proxy_header,  // 'R' reading the PROXY header of an upstream balancer
};

inline constexpr size_t kCauseCount = 9;
inline constexpr size_t kPhaseCount = 7;
inline constexpr size_t kTermSlots = kCauseCount * kPhaseCount;
inline constexpr char kCauseChars[kCauseCount + 1] = "-CSPLRcsK";
inline constexpr char kPhaseChars[kPhaseCount + 1] = "-QCHDLR";

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
  friend constexpr bool operator==(TermCode, TermCode) = default;
};

}  // namespace smtplb
