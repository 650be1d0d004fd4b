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
#include "smtplb/lb/source_hash.hpp"

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
  bool detoured = false;        // source: the balance factor passed the key on
};

// What algorithm = "source" needs for one session: the pool's table and the client
// key's bucket in it.
struct SourceChoice {
  const SourceTable* table = nullptr;
  uint32_t bucket = 0;
  unsigned balance_factor = 0;  // percent of the average load; 0 = off
};

// Per worker and pool: the algorithms' state and scratch space, reused across picks.
class PoolBalancer {
 public:
  // `exclude`: servers this session tried already. A retry goes to an untried usable
  // server; only when every usable one was tried may it go back to one of them. Backup
  // servers are candidates only while no regular server is usable (full ones count as
  // usable: their clients queue rather than spill over to the backups).
  // `acquire(i)` takes a slot on server i and may fail (another worker took the last).
  // Source affinity (`source`, required for that algorithm) goes down the key's own
  // preference list in its tier and never back to a server it tried.
  template <class Acquire>
  Selection pick(Algorithm algorithm, std::span<const ServerView> servers, std::span<const uint32_t> exclude,
                 int64_t slow_start_ms, Acquire&& acquire, const SourceChoice* source = nullptr);

  // Source affinity without a balance factor in O(1) of the pool's size: the first of the
  // key's cached regular preferences that is usable, not full, not tried and takes a slot,
  // reading only those servers' views (`view(i)`). That is the server pick() would choose;
  // nullopt when none of them is (pick() then decides: further preferences, the backup
  // tier, waiting when all are full).
  template <class View, class Acquire>
  static std::optional<size_t> pick_source_cached(const SourceChoice& source, View&& view,
                                                  std::span<const uint32_t> exclude, Acquire&& acquire);

 private:
  std::optional<size_t> run(Algorithm algorithm, std::span<const ServerView> servers) {
    switch (algorithm) {
      case Algorithm::leastconn:
        return lc_.pick(candidates_);
      case Algorithm::source:
        return run_source(servers);
      case Algorithm::roundrobin:
        break;
    }
    return rr_.pick(candidates_);
  }
  // The first eligible server of the key's preference list that the balance factor lets
  // through (or, when none does, the first eligible one).
  std::optional<size_t> run_source(std::span<const ServerView> servers);

  SmoothRoundRobin rr_;
  LeastConnections lc_;
  std::vector<Candidate> candidates_;
  // Source affinity, valid during one pick():
  const SourceChoice* source_ = nullptr;
  bool backup_tier_ = false;
  bool detoured_ = false;
  bool ranked_ = false;  // rank_ holds the bucket's whole list
  std::vector<uint32_t> rank_;
  std::vector<SourceTable::Ranked> rank_scratch_;
};

template <class Acquire>
Selection PoolBalancer::pick(Algorithm algorithm, std::span<const ServerView> servers,
                             std::span<const uint32_t> exclude, int64_t slow_start_ms, Acquire&& acquire,
                             const SourceChoice* source) {
  const size_t n = servers.size();
  if (algorithm == Algorithm::source && (!source || !source->table)) algorithm = Algorithm::roundrobin;
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
  source_ = source;
  backup_tier_ = !regular_usable;
  detoured_ = ranked_ = false;
  bool widened = false;
  for (size_t round = 0; round <= n; ++round) {
    const auto picked = run(algorithm, servers);
    if (!picked) {
      // An untried server that is only full is worth waiting for rather than going back
      // to one that just failed. Source affinity never goes back: its retries follow
      // the key's preference list only.
      if (widened || untried_usable) break;
      if (algorithm == Algorithm::source) return result;
      // Every usable server was tried already: a retry may go back to one of them.
      widened = true;
      for (size_t i = 0; i < n; ++i) candidates_[i].eligible = in_tier(servers[i]) && !servers[i].full;
      continue;
    }
    if (acquire(*picked)) {
      result.index = picked;
      result.detoured = detoured_;
      return result;
    }
    // Another worker took the last slot in the meantime.
    candidates_[*picked].eligible = false;
  }
  result.all_full = true;
  return result;
}

template <class View, class Acquire>
std::optional<size_t> PoolBalancer::pick_source_cached(const SourceChoice& source, View&& view,
                                                       std::span<const uint32_t> exclude, Acquire&& acquire) {
  if (!source.table || source.balance_factor) return std::nullopt;
  for (uint32_t i : source.table->cached(source.bucket, false)) {
    const ServerView s = view(i);
    // A usable regular server means the regular tier is in use, as pick() would find.
    if (!s.usable || s.backup || s.full) continue;
    if (std::find(exclude.begin(), exclude.end(), i) != exclude.end()) continue;
    if (acquire(size_t(i))) return i;
  }
  return std::nullopt;
}

}  // namespace smtplb
