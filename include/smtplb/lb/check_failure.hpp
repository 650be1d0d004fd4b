#pragma once
// Why an active health check failed, as a type: the checker says which step failed, and
// server_check_failures_total{reason} and the logs render it here, in one place.
#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace smtplb {

enum class CheckFailure : uint8_t {
  connect,      // TCP connect refused, unreachable, or the connection broke right after it
  timeout,      // the whole dialogue did not finish within health_check.timeout
  greeting,     // no 220, a malformed or unsolicited greeting, or the server left during it
  ehlo,         // EHLO (plain, or again inside TLS) not answered 250
  starttls,     // STARTTLS not answered 220
  tls,          // TLS context, handshake or record error, or a verification failure not below
  quit,         // QUIT not answered 221
  proxy,        // the failure looks like a PROXY protocol mismatch (greeting/EHLO of a PROXY pool)
  tls_name,     // verification: the certificate does not name tls_server_name (or the address)
  tls_expired,  // verification: the certificate has expired
};

inline constexpr std::array<std::string_view, 10> kCheckFailureNames = {
    "connect", "timeout", "greeting", "ehlo", "starttls", "tls", "quit", "proxy", "tls_name", "tls_expired"};
inline constexpr size_t kCheckFailureCount = kCheckFailureNames.size();

constexpr std::string_view to_string(CheckFailure f) {
  return kCheckFailureNames[size_t(f)];
}

// The steps of a check dialogue, in order.
enum class CheckStep : uint8_t { idle, connect, greeting, ehlo, starttls, tls_handshake, ehlo_tls, quit };

constexpr std::string_view to_string(CheckStep s) {
  switch (s) {
    case CheckStep::connect:
      return "connect";
    case CheckStep::greeting:
      return "greeting";
    case CheckStep::ehlo:
      return "ehlo";
    case CheckStep::starttls:
      return "starttls";
    case CheckStep::tls_handshake:
      return "tls handshake";
    case CheckStep::ehlo_tls:
      return "ehlo-tls";
    case CheckStep::quit:
      return "quit";
    case CheckStep::idle:
      break;
  }
  return "idle";
}

// What a failure during `step` counts as (a refused reply, the server leaving, a failed
// read or write: all fail the step in progress). `proxy_mismatch`: the pool sends PROXY
// and the step is one where a server that does not expect the header fails.
constexpr CheckFailure failure_of(CheckStep step, bool proxy_mismatch) {
  if (proxy_mismatch) return CheckFailure::proxy;
  switch (step) {
    case CheckStep::idle:
    case CheckStep::connect:
      return CheckFailure::connect;
    case CheckStep::greeting:
      return CheckFailure::greeting;
    case CheckStep::ehlo:
    case CheckStep::ehlo_tls:
      return CheckFailure::ehlo;
    case CheckStep::starttls:
      return CheckFailure::starttls;
    case CheckStep::tls_handshake:
      return CheckFailure::tls;
    case CheckStep::quit:
      return CheckFailure::quit;
  }
  return CheckFailure::connect;
}

}  // namespace smtplb
