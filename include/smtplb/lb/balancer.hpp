#pragma once
// Weighted server selection, pure and single-threaded: each worker keeps its own
// balancer per pool; only the active connection counts are shared (read by the caller).
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace smtplb {

struct Candidate {
  uint32_t weight = 0;    // effective weight; 0 = not selectable
  uint32_t active = 0;    // current connections (leastconn)
  bool eligible = false;  // usable right now and not excluded by the caller
};

// Smooth weighted round-robin (the nginx algorithm): over any window of sum(weights)
// picks each server exactly weight times, interleaved rather than in bursts.
class SmoothRoundRobin {
 public:
  std::optional<size_t> pick(std::span<const Candidate> servers);

 private:
  std::vector<int64_t> current_;
};

// Weighted least connections: lowest (active + 1) / weight wins; ties go round-robin so
// an idle pool still spreads sessions.
class LeastConnections {
 public:
  std::optional<size_t> pick(std::span<const Candidate> servers);

 private:
  size_t next_ = 0;
};

// Weights are scaled so slow start can ramp even a weight-1 server smoothly; both
// algorithms only compare ratios, so scaling changes no choice.
inline constexpr uint32_t kWeightScale = 64;

// Effective (scaled) weight of a server `elapsed_ms` after it came back UP, ramping
// linearly from 1 to weight * kWeightScale over `ramp_ms`. No ramp when ramp_ms <= 0 or
// elapsed_ms < 0 (no ramp in progress); weight 0 stays 0.
uint32_t effective_weight(uint32_t weight, int64_t elapsed_ms, int64_t ramp_ms);

}  // namespace smtplb
