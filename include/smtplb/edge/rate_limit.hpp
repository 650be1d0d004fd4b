#pragma once
// max_connection_rate_per_ip: "COUNT/PERIOD", new sessions per client key, enforced as a
// generic cell rate algorithm (GCRA): the smooth equivalent of a token bucket holding
// COUNT tokens and refilled at COUNT per PERIOD, kept in one timestamp per key. A client
// may open COUNT sessions at once; after that one every PERIOD/COUNT.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "smtplb/config/duration.hpp"

namespace smtplb {

struct RateSpec {
  uint32_t count = 0;  // 0 = off
  Millis period{0};
  bool on() const { return count > 0; }
  // Microseconds between two sessions at the sustained rate.
  int64_t interval_us() const { return period.count() * 1000 / int64_t(count); }
  // How far ahead of now the schedule may run: the burst.
  int64_t tolerance_us() const { return period.count() * 1000 - interval_us(); }
  std::string to_string() const;  // "30/1m"
};

// "30/1m", "5/1s", "1000/1h"; COUNT in 1..1000000, PERIOD a duration from 1s to 1d.
// nullopt with `error` set when malformed.
std::optional<RateSpec> parse_rate(std::string_view text, std::string& error);

// The limiter state of one key: the theoretical arrival time of the next session (µs).
struct Gcra {
  int64_t tat_us = 0;
  // Takes one session at `now_us` if the rate allows it.
  bool admit(const RateSpec& r, int64_t now_us) {
    const int64_t tat = tat_us > now_us ? tat_us : now_us;
    if (tat - now_us > r.tolerance_us()) return false;
    tat_us = tat + r.interval_us();
    return true;
  }
  // The key is over its rate until this time (µs): a new session now would be refused.
  int64_t limited_until_us(const RateSpec& r) const { return tat_us - r.tolerance_us(); }
};

}  // namespace smtplb
