#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "smtplb/lb/health_state.hpp"

using smtplb::Health;
using smtplb::HealthState;
using namespace std::chrono_literals;

namespace {

// An injected clock: tests name instants instead of sleeping.
HealthState::TimePoint at(int seconds) {
  return HealthState::TimePoint{} + std::chrono::seconds(seconds);
}

}  // namespace

TEST_CASE("health: a new server is unknown") {
  HealthState h(2, 3);
  CHECK(h.health() == Health::unknown);
  CHECK(h.rise() == 2);
  CHECK(h.fall() == 3);
  CHECK(h.consecutive_successes() == 0);
  CHECK(h.consecutive_failures() == 0);
  CHECK(h.last_change() == HealthState::TimePoint{});
}

TEST_CASE("health: the first success of an unknown server brings it up at once") {
  HealthState h(5, 5);
  CHECK(h.on_success(at(10)));
  CHECK(h.health() == Health::up);
  CHECK(h.last_change() == at(10));
  CHECK(h.consecutive_successes() == 1);
}

TEST_CASE("health: the first failure of an unknown server takes it down at once") {
  HealthState h(5, 5);
  CHECK(h.on_failure(at(10)));
  CHECK(h.health() == Health::down);
  CHECK(h.last_change() == at(10));
  CHECK(h.consecutive_failures() == 1);
}

TEST_CASE("health: down needs rise consecutive successes") {
  HealthState h(3, 2);
  REQUIRE(h.on_failure(at(1)));
  CHECK_FALSE(h.on_success(at(2)));
  CHECK_FALSE(h.on_success(at(3)));
  CHECK(h.health() == Health::down);
  CHECK(h.last_change() == at(1));
  CHECK(h.on_success(at(4)));
  CHECK(h.health() == Health::up);
  CHECK(h.last_change() == at(4));
  // Further successes change nothing.
  CHECK_FALSE(h.on_success(at(5)));
  CHECK(h.last_change() == at(4));
}

TEST_CASE("health: a failure restarts the rise count") {
  HealthState h(3, 2);
  REQUIRE(h.on_failure(at(1)));
  CHECK_FALSE(h.on_success(at(2)));
  CHECK_FALSE(h.on_success(at(3)));
  CHECK_FALSE(h.on_failure(at(4)));
  CHECK(h.consecutive_successes() == 0);
  CHECK(h.consecutive_failures() == 1);
  CHECK_FALSE(h.on_success(at(5)));
  CHECK_FALSE(h.on_success(at(6)));
  CHECK(h.health() == Health::down);
  CHECK(h.on_success(at(7)));
  CHECK(h.health() == Health::up);
  CHECK(h.last_change() == at(7));
}

TEST_CASE("health: up needs fall consecutive failures") {
  HealthState h(2, 3);
  REQUIRE(h.on_success(at(1)));
  CHECK_FALSE(h.on_failure(at(2)));
  CHECK_FALSE(h.on_failure(at(3)));
  CHECK(h.health() == Health::up);
  CHECK(h.on_failure(at(4)));
  CHECK(h.health() == Health::down);
  CHECK(h.last_change() == at(4));
  CHECK(h.consecutive_failures() == 3);
  CHECK_FALSE(h.on_failure(at(5)));
  CHECK(h.last_change() == at(4));
}

TEST_CASE("health: a success restarts the fall count") {
  HealthState h(2, 3);
  REQUIRE(h.on_success(at(1)));
  CHECK_FALSE(h.on_failure(at(2)));
  CHECK_FALSE(h.on_failure(at(3)));
  CHECK_FALSE(h.on_success(at(4)));
  CHECK(h.consecutive_failures() == 0);
  CHECK_FALSE(h.on_failure(at(5)));
  CHECK_FALSE(h.on_failure(at(6)));
  CHECK(h.health() == Health::up);
  CHECK(h.on_failure(at(7)));
  CHECK(h.health() == Health::down);
}

TEST_CASE("health: full cycle up, down, up records each change time") {
  HealthState h(2, 2);
  CHECK(h.on_success(at(0)));
  CHECK_FALSE(h.on_failure(at(2)));
  CHECK(h.on_failure(at(4)));
  CHECK(h.last_change() == at(4));
  CHECK_FALSE(h.on_success(at(6)));
  CHECK(h.on_success(at(8)));
  CHECK(h.health() == Health::up);
  CHECK(h.last_change() == at(8));
}

TEST_CASE("health: rise and fall of 0 behave as 1") {
  HealthState h(0, 0);
  CHECK(h.rise() == 1);
  CHECK(h.fall() == 1);
  CHECK(h.on_success(at(1)));
  CHECK(h.on_failure(at(2)));
  CHECK(h.health() == Health::down);
  CHECK(h.on_success(at(3)));
  CHECK(h.health() == Health::up);
}

TEST_CASE("health: rise 1 and fall 1 follow every result") {
  HealthState h(1, 1);
  bool up = false;
  for (int i = 0; i < 20; ++i) {
    bool ok = (i * 7) % 3 != 0;
    bool changed = ok ? h.on_success(at(i)) : h.on_failure(at(i));
    CAPTURE(i);
    CHECK(changed == (i == 0 || ok != up));
    CHECK(h.health() == (ok ? Health::up : Health::down));
    up = ok;
  }
}

TEST_CASE("health: agrees with a reference model over a long pseudo-random run") {
  for (unsigned rise = 1; rise <= 4; ++rise) {
    for (unsigned fall = 1; fall <= 4; ++fall) {
      HealthState h(rise, fall);
      Health model = Health::unknown;
      unsigned run_ok = 0, run_bad = 0;
      HealthState::TimePoint model_change{};
      uint32_t x = 2463534242u + rise * 31 + fall;
      for (int i = 1; i <= 3000; ++i) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Bias towards runs so both thresholds are actually reached.
        bool ok = (x % 100) < ((i / 50) % 2 ? 80u : 25u);
        Health before = model;
        if (ok) {
          ++run_ok;
          run_bad = 0;
          if (model == Health::unknown || (model == Health::down && run_ok >= rise)) model = Health::up;
        } else {
          ++run_bad;
          run_ok = 0;
          if (model == Health::unknown || (model == Health::up && run_bad >= fall)) model = Health::down;
        }
        if (model != before) model_change = at(i);
        bool changed = ok ? h.on_success(at(i)) : h.on_failure(at(i));
        CAPTURE(rise);
        CAPTURE(fall);
        CAPTURE(i);
        REQUIRE(changed == (model != before));
        REQUIRE(h.health() == model);
        REQUIRE(h.last_change() == model_change);
        REQUIRE(h.consecutive_successes() == run_ok);
        REQUIRE(h.consecutive_failures() == run_bad);
      }
    }
  }
}

TEST_CASE("health: to_string") {
  CHECK(std::string(smtplb::to_string(Health::up)) == "UP");
  CHECK(std::string(smtplb::to_string(Health::down)) == "DOWN");
  CHECK(std::string(smtplb::to_string(Health::unknown)) == "UNKNOWN");
}

TEST_CASE("health: passive ejection forces DOWN at once, checks bring it back after rise") {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point t0{};
  smtplb::HealthState h(2, 3);
  REQUIRE(h.on_success(t0));
  REQUIRE(h.health() == smtplb::Health::up);
  CHECK(h.force_down(t0 + std::chrono::seconds(1)));
  CHECK(h.health() == smtplb::Health::down);
  CHECK(h.last_change() == t0 + std::chrono::seconds(1));
  CHECK_FALSE(h.force_down(t0 + std::chrono::seconds(2)));  // already down: no transition
  CHECK(h.last_change() == t0 + std::chrono::seconds(1));
  CHECK_FALSE(h.on_success(t0 + std::chrono::seconds(3)));
  CHECK(h.on_success(t0 + std::chrono::seconds(4)));
  CHECK(h.health() == smtplb::Health::up);
  // An unknown server can be forced down too.
  smtplb::HealthState u(2, 3);
  CHECK(u.force_down(t0));
  CHECK(u.health() == smtplb::Health::down);
}
