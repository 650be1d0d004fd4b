#include "smtplb/lb/balancer.hpp"

namespace smtplb {

std::optional<size_t> SmoothRoundRobin::pick(std::span<const Candidate> servers) {
  if (current_.size() != servers.size()) current_.assign(servers.size(), 0);
  int64_t total = 0;
  std::optional<size_t> best;
  for (size_t i = 0; i < servers.size(); ++i) {
    const Candidate& c = servers[i];
    if (!c.eligible || c.weight == 0) continue;
    current_[i] += c.weight;
    total += c.weight;
    if (!best || current_[i] > current_[*best]) best = i;
  }
  if (best) current_[*best] -= total;
  return best;
}

std::optional<size_t> LeastConnections::pick(std::span<const Candidate> servers) {
  const size_t n = servers.size();
  if (n == 0) return std::nullopt;
  if (next_ >= n) next_ = 0;
  std::optional<size_t> best;
  // Scan starting at the rotating index so ties fall to the next server in turn.
  for (size_t k = 0; k < n; ++k) {
    size_t i = (next_ + k) % n;
    const Candidate& c = servers[i];
    if (!c.eligible || c.weight == 0) continue;
    if (!best) {
      best = i;
      continue;
    }
    const Candidate& b = servers[*best];
    // (c.active + 1) / c.weight < (b.active + 1) / b.weight, without division.
    if ((uint64_t{c.active} + 1) * b.weight < (uint64_t{b.active} + 1) * c.weight) best = i;
  }
  if (best) next_ = (*best + 1) % n;
  return best;
}

uint32_t effective_weight(uint32_t weight, int64_t elapsed_ms, int64_t ramp_ms) {
  const uint64_t full = uint64_t{weight} * kWeightScale;
  if (weight == 0 || ramp_ms <= 0 || elapsed_ms < 0 || elapsed_ms >= ramp_ms) return uint32_t(full);
  const uint64_t w = full * uint64_t(elapsed_ms) / uint64_t(ramp_ms);
  return uint32_t(w < 1 ? 1 : w);
}

}  // namespace smtplb
