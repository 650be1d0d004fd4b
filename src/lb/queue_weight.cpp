#include "smtplb/lb/queue_weight.hpp"

namespace smtplb {

uint32_t queue_weight_percent(const QueueThresholds& t, uint64_t total) {
  if (total <= t.low) return 100;
  if (total >= t.high || t.high <= t.low) return t.floor;
  // Linear between (low, 100%) and (high, floor), rounded to the nearest percent.
  const uint64_t span = t.high - t.low;
  const uint64_t drop = uint64_t(100 - t.floor) * (total - t.low);
  return uint32_t(100 - (drop + span / 2) / span);
}

std::string queue_agent_answer(const QueueThresholds& t, const QueueCounts& c) {
  const uint64_t total = c.total();
  const bool drain = t.drain != 0 && total >= t.drain;
  return std::string(drain ? "drain " : "ready up ") + std::to_string(queue_weight_percent(t, total)) +
         "% #incoming=" + std::to_string(c.incoming) + " active=" + std::to_string(c.active) +
         " deferred=" + std::to_string(c.deferred);
}

}  // namespace smtplb
