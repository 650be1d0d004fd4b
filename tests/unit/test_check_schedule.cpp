#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "smtplb/lb/check_schedule.hpp"

using namespace smtplb;

TEST_CASE("check slots divide the interval evenly") {
  CHECK(check_slot_offset(0, 4, 2000) == 0);
  CHECK(check_slot_offset(1, 4, 2000) == 500);
  CHECK(check_slot_offset(3, 4, 2000) == 1500);
  CHECK(check_slot_offset(0, 0, 2000) == 0);
  CHECK(check_slot_offset(5, 10, 0) == 0);
  // 1 000 servers every 2 s: one every 2 ms, all inside the interval.
  for (size_t i = 0; i < 1000; ++i) CHECK(check_slot_offset(i, 1000, 2000) == 2 * i);
  // Large intervals do not overflow.
  CHECK(check_slot_offset(999'999, 1'000'000, 86'400'000ull * 365) == 86'400'000ull * 365 / 1'000'000 * 999'999);
}

TEST_CASE("the next slot is on the grid, at or after the earliest time") {
  // epoch 1000, offset 300, interval 2000: slots at 1300, 3300, 5300, ...
  CHECK(next_check_slot(1000, 300, 2000, 0) == 1300);
  CHECK(next_check_slot(1000, 300, 2000, 1300) == 1300);
  CHECK(next_check_slot(1000, 300, 2000, 1301) == 3300);
  CHECK(next_check_slot(1000, 300, 2000, 3300) == 3300);
  CHECK(next_check_slot(1000, 300, 2000, 10'000) == 11'300);
  CHECK(next_check_slot(1000, 300, 0, 5000) == 5000);
}

TEST_CASE("after a check the next one starts one interval later, whatever the dialogue took") {
  // A check that started on its slot at 1300 and took 5 ms or 900 ms: the next at 3300.
  CHECK(after_check_slot(1000, 300, 2000, 1300, 1305) == 3300);
  CHECK(after_check_slot(1000, 300, 2000, 1300, 2200) == 3300);
  // A timer that fired 3 ms late does not drift: still 3300, then 5300.
  CHECK(after_check_slot(1000, 300, 2000, 1303, 1310) == 3300);
  // A dialogue longer than the interval (timeout 10 s, interval 2 s): the next slot after now.
  CHECK(after_check_slot(1000, 300, 2000, 1300, 11'400) == 13'300);
  // A checker moved to a new slot by a reload: one gap between half and one and a half intervals.
  for (uint64_t offset = 0; offset < 2000; offset += 50) {
    const uint64_t next = after_check_slot(1000, offset, 2000, 1700, 1710);
    CHECK(next >= 1700 + 1000);
    CHECK(next < 1700 + 3000);
    CHECK((next - 1000) % 2000 == offset);
  }
}

TEST_CASE("1000 checkers on the grid: the busiest 100 ms holds the average, in every round") {
  const uint64_t interval = 2000, epoch = 12'345;
  const size_t n = 1000;
  // As the process places them (on the 10 ms tick: 5 checks per tick here), and on the
  // bare grid.
  for (bool tick : {true, false}) {
    auto place = [tick](uint64_t ms) { return tick ? on_check_tick(ms) : ms; };
    std::vector<uint64_t> next(n);
    for (size_t i = 0; i < n; ++i) next[i] = epoch + place(first_check_delay(i, n, interval));
    std::map<uint64_t, size_t> per_window;  // 100 ms windows after the epoch
    std::map<uint64_t, size_t> per_start;   // checks starting at one loop millisecond
    // Simulate 10 rounds; each dialogue takes 1..40 ms.
    for (int round = 0; round < 10; ++round)
      for (size_t i = 0; i < n; ++i) {
        const uint64_t start = next[i] + (i % 3);  // a timer fires up to 2 ms late
        ++per_window[(start - epoch) / 100];
        ++per_start[next[i]];
        next[i] =
            after_check_slot(epoch, place(check_slot_offset(i, n, interval)), interval, start, start + 1 + i % 40);
      }
    size_t busiest = 0, together = 0;
    for (const auto& [w, count] : per_window) busiest = std::max(busiest, count);
    for (const auto& [t, count] : per_start) together = std::max(together, count);
    const std::string what = tick ? "on the tick" : "bare grid";
    MESSAGE(what << ": busiest 100 ms window: " << busiest << " checks (average " << n * 100 / interval << "), at most "
                 << together << " due at one millisecond");
    // The tick moves a check by less than 10 ms: at most one tick's checks more.
    CHECK(busiest <= (tick ? 52u + n * kCheckTickMs / interval : 52u));
    CHECK(together == (tick ? n * kCheckTickMs / interval : 1u));
  }
}

TEST_CASE("the check tick rounds down to 10 ms") {
  CHECK(on_check_tick(0) == 0);
  CHECK(on_check_tick(9) == 0);
  CHECK(on_check_tick(10) == 10);
  CHECK(on_check_tick(1998) == 1990);
}

TEST_CASE("the first round ramps 2 ms apart, never past the interval") {
  CHECK(first_check_delay(0, 5, 2000) == 0);
  CHECK(first_check_delay(4, 5, 2000) == 8);
  CHECK(first_check_delay(999, 1000, 2000) == 1998);
  // 5 000 servers every 2 s: the first round fits in the interval, 0.4 ms apart.
  CHECK(first_check_delay(4999, 5000, 2000) < 2000);
  CHECK(first_check_delay(2500, 5000, 2000) == 1000);
}
