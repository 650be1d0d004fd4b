#include "smtplb/lb/select.hpp"

namespace smtplb {

std::optional<size_t> PoolBalancer::run_source(std::span<const ServerView> servers) {
  const SourceChoice& src = *source_;
  // hash_balance_factor, as HAProxy's hash-balance-factor: the session being placed counts,
  // and each usable server of the tier may hold ceil((total + 1) * factor / 100) sessions
  // in proportion to its weight; one at its bound passes the key to its next preference.
  uint64_t total = 0, weights = 0;
  if (src.balance_factor) {
    for (const ServerView& s : servers)
      if (s.usable && s.backup == backup_tier_) {
        total += s.active;
        weights += s.weight;
      }
  }
  auto within_bound = [&](size_t i) {
    if (!src.balance_factor || weights == 0) return true;
    const uint64_t slots = ((total + 1) * src.balance_factor * servers[i].weight + 100 * weights - 1) / (100 * weights);
    return uint64_t(servers[i].active) + 1 <= slots;
  };
  std::optional<size_t> first;  // the first eligible preference, bound or not
  auto walk = [&](std::span<const uint32_t> prefs) -> std::optional<size_t> {
    for (uint32_t i : prefs) {
      if (i >= candidates_.size() || !candidates_[i].eligible) continue;
      if (within_bound(i)) {
        detoured_ = first.has_value();
        return i;
      }
      if (!first) first = i;
    }
    return std::nullopt;
  };
  if (auto i = walk(src.table->cached(src.bucket, backup_tier_))) return i;
  // Every cached preference is unusable, tried or over the bound: the whole list.
  if (!ranked_) {
    src.table->rank(src.bucket, backup_tier_, rank_scratch_, rank_);
    ranked_ = true;
  }
  first.reset();
  if (auto i = walk(rank_)) return i;
  // No server is within the bound (few sessions, small weights): the key's own choice.
  detoured_ = false;
  return first;
}

}  // namespace smtplb
