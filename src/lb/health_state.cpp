#include "smtplb/lb/health_state.hpp"

namespace smtplb {

const char* to_string(Health h) {
  switch (h) {
    case Health::up:
      return "UP";
    case Health::down:
      return "DOWN";
    case Health::unknown:
      break;
  }
  return "UNKNOWN";
}

bool HealthState::set(Health h, TimePoint now) {
  if (h == health_) return false;
  health_ = h;
  last_change_ = now;
  return true;
}

bool HealthState::on_success(TimePoint now) {
  failures_ = 0;
  ++successes_;
  if (health_ == Health::unknown) return set(Health::up, now);
  if (health_ == Health::down && successes_ >= rise_) return set(Health::up, now);
  return false;
}

bool HealthState::on_failure(TimePoint now) {
  successes_ = 0;
  ++failures_;
  if (health_ == Health::unknown) return set(Health::down, now);
  if (health_ == Health::up && failures_ >= fall_) return set(Health::down, now);
  return false;
}

bool HealthState::force_down(TimePoint now) {
  successes_ = 0;
  failures_ = fall_;
  return set(Health::down, now);
}

}  // namespace smtplb
