#pragma once
// When health checks run: every checker owns a fixed slot on a grid that all checkers of
// the process share, so N servers checked every I ms are probed one every I/N ms, evenly,
// whatever each dialogue's duration (a check's next start does not drift with how long
// the last one took). Pure arithmetic on loop milliseconds; unit-tested.
#include <cstddef>
#include <cstdint>

namespace smtplb {

// The slot of checker `index` of `count`: index * interval / count, in [0, interval).
inline uint64_t check_slot_offset(size_t index, size_t count, uint64_t interval_ms) {
  if (count == 0 || interval_ms == 0) return 0;
  const uint64_t i = index % count;  // floor(i * interval / count) without overflowing
  return i * (interval_ms / count) + i * (interval_ms % count) / count;
}

// Check starts are grouped on a 10 ms tick: the checks whose slots fall in one tick start
// on one wake-up of the control loop (and their replies tend to come together), instead
// of one wake-up each. At 10 ms the spread over any 100 ms stays even.
constexpr uint64_t kCheckTickMs = 10;
inline uint64_t on_check_tick(uint64_t offset_ms) {
  return offset_ms / kCheckTickMs * kCheckTickMs;
}

// The first time at or after `earliest` of the grid epoch + offset + k * interval.
inline uint64_t next_check_slot(uint64_t epoch_ms, uint64_t offset_ms, uint64_t interval_ms, uint64_t earliest_ms) {
  const uint64_t first = epoch_ms + offset_ms;
  if (earliest_ms <= first) return first;
  if (interval_ms == 0) return earliest_ms;
  const uint64_t k = (earliest_ms - first + interval_ms - 1) / interval_ms;
  return first + k * interval_ms;
}

// After a check that started at `started`, the next one starts at the checker's first
// slot at least half an interval later (never in the past): one check per slot in the
// steady state, and a checker that was given a new slot (a reload changed the fleet)
// moves to it with one gap between half an interval and one and a half.
inline uint64_t after_check_slot(uint64_t epoch_ms, uint64_t offset_ms, uint64_t interval_ms, uint64_t started_ms,
                                 uint64_t now_ms) {
  uint64_t earliest = started_ms + interval_ms / 2;
  if (earliest < now_ms) earliest = now_ms;
  return next_check_slot(epoch_ms, offset_ms, interval_ms, earliest);
}

// The first check of `count` new checkers (a start, or servers added by a reload): index
// `index` waits index * 2 ms, at most the interval, so a restarted balancer learns its
// fleet within one dialogue plus 2 ms per server and never probes it in one burst.
inline uint64_t first_check_delay(size_t index, size_t count, uint64_t interval_ms) {
  const uint64_t ramp = count * 2 < interval_ms ? uint64_t(count) * 2 : interval_ms;
  return check_slot_offset(index, count, ramp);
}

}  // namespace smtplb
