#pragma once
// The whole choice of a server for one session attempt, pure: health and admin state
// (folded into `usable`), the backup tier, slow start, servers this session already
// tried, max_connections, then the pool's algorithm. The data path reads the shared
// runtime state into ServerView rows and passes a function that takes a connection slot
// (exact across workers); unit tests pass plain values.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "smtplb/config/config.hpp"
#include "smtplb/lb/balancer.hpp"

namespace smtplb {

// One server as the chooser sees it at this instant.
struct ServerView {
  bool usable = false;  // health UP, admin state ready, weight > 0
  bool backup = false;
  bool full = false;             // at its max_connections
  uint32_t weight = 0;           // configured (or admin-set) weight, unscaled
  int64_t ramp_elapsed_ms = -1;  // since it came back UP (slow start); -1: no ramp
  uint32_t active = 0;           // open sessions, all workers (leastconn)
};

struct Selection {
  std::optional<size_t> index;  // the chosen server; its slot is already taken
  bool all_full = false;        // usable servers exist but every one is at max_connections
};

// Per worker and pool: the algorithms' state and scratch space, reused across picks.
class PoolBalancer {
 public:
  // `exclude`: servers this session tried already. A retry goes to an untried usable
  // server; only when every usable one was tried may it go back to one of them. Backup
  // servers are candidates only while no regular server is usable (full ones count as
  // usable: their clients queue rather than spill over to the backups).
  // `acquire(i)` takes a slot on server i and may fail (another worker took the last).
  template <class Acquire>
  Selection pick(Algorithm algorithm, std::span<const ServerView> servers, std::span<const uint32_t> exclude,
                 int64_t slow_start_ms, Acquire&& acquire);

 private:
  std::optional<size_t> run(Algorithm algorithm) {
    return algorithm == Algorithm::leastconn ? lc_.pick(candidates_) : rr_.pick(candidates_);
  }

  SmoothRoundRobin rr_;
  LeastConnections lc_;
  std::vector<Candidate> candidates_;
};

template <class Acquire>
Selection PoolBalancer::pick(Algorithm algorithm, std::span<const ServerView> servers,
                             std::span<const uint32_t> exclude, int64_t slow_start_ms, Acquire&& acquire) {
  const size_t n = servers.size();
  candidates_.resize(n);
  bool regular_usable = false;
  for (const ServerView& s : servers) regular_usable |= !s.backup && s.usable;
  auto in_tier = [&](const ServerView& s) { return s.usable && s.backup != regular_usable; };
  bool any_usable = false, any_free = false, untried_usable = false;
  for (size_t i = 0; i < n; ++i) {
    const ServerView& s = servers[i];
    const bool usable = in_tier(s);
    const bool free = usable && !s.full;
    const bool untried = std::find(exclude.begin(), exclude.end(), uint32_t(i)) == exclude.end();
    any_usable |= usable;
    any_free |= free;
    untried_usable |= usable && untried;
    candidates_[i] = {effective_weight(s.weight, s.ramp_elapsed_ms, slow_start_ms), s.active, free && untried};
  }
  Selection result;
  if (!any_free) {
    result.all_full = any_usable;
    return result;
  }
  bool widened = false;
  for (size_t round = 0; round <= n; ++round) {
    const auto picked = run(algorithm);
    if (!picked) {
      // An untried server that is only full is worth waiting for rather than going back
      // to one that just failed.
      if (widened || untried_usable) break;
      // Every usable server was tried already: a retry may go back to one of them.
      widened = true;
      for (size_t i = 0; i < n; ++i) candidates_[i].eligible = in_tier(servers[i]) && !servers[i].full;
      continue;
    }
    if (acquire(*picked)) {
      result.index = picked;
      return result;
    }
    // Another worker took the last slot in the meantime.
    candidates_[*picked].eligible = false;
  }
  result.all_full = true;
  return result;
}

}  // namespace smtplb
