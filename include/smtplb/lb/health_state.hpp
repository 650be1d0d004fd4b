#pragma once
// Rise/fall hysteresis for one server, pure: the caller passes the time of each result.
#include <chrono>
#include <cstdint>

namespace smtplb {

enum class Health : uint8_t {
  unknown,  // never checked: takes no traffic
  up,
  down,
};

const char* to_string(Health h);

class HealthState {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;

  HealthState(unsigned rise, unsigned fall) : rise_(rise ? rise : 1), fall_(fall ? fall : 1) {}

  // Each returns true when the state changed. The first result of an unknown server
  // decides at once (up or down), so a restart does not wait `rise` intervals before
  // taking traffic, and a dead server never gets any.
  bool on_success(TimePoint now);
  bool on_failure(TimePoint now);
  // Passive ejection: the data path saw `fall` failures in a row. Goes DOWN at once
  // whatever the check history; active checks then need `rise` successes as usual.
  bool force_down(TimePoint now);
  // New thresholds from a reload; the state and the current runs are kept (a run that
  // already reaches the new threshold takes effect at the next result).
  void set_thresholds(unsigned rise, unsigned fall) {
    rise_ = rise ? rise : 1;
    fall_ = fall ? fall : 1;
  }

  Health health() const { return health_; }
  TimePoint last_change() const { return last_change_; }
  unsigned consecutive_successes() const { return successes_; }
  unsigned consecutive_failures() const { return failures_; }
  unsigned rise() const { return rise_; }
  unsigned fall() const { return fall_; }

 private:
  bool set(Health h, TimePoint now);

  unsigned rise_;
  unsigned fall_;
  unsigned successes_ = 0;
  unsigned failures_ = 0;
  Health health_ = Health::unknown;
  TimePoint last_change_{};
};

}  // namespace smtplb
