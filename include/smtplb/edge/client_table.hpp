#pragma once
// The per-client table shared by all workers: for each client key, its open sessions and
// its rate state. Sharded (a small mutex per shard, taken once per accepted session and
// once at its end: no global lock), bounded by global.max_tracked_clients plus the keys
// pinned right now: when a shard is full, its least recently seen key is evicted, except a
// key that is pinned (it has open sessions) or over its rate right now, so an eviction
// never lifts a limit that is holding. Kept across reloads.
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "smtplb/edge/address.hpp"
#include "smtplb/edge/rate_limit.hpp"

namespace smtplb {

struct ClientLimits {
  uint32_t max_concurrent = 0;  // 0 = off
  RateSpec rate;                // count 0 = off
  bool on() const { return max_concurrent > 0 || rate.on(); }
};

class ClientTable {
 public:
  struct Entry;
  enum class Verdict : uint8_t { ok, over_concurrent, over_rate };
  struct Admission {
    Verdict verdict = Verdict::ok;
    Entry* pin = nullptr;  // set when admitted: release() it when the session ends
  };
  struct Stat {
    ClientKey key;
    uint32_t sessions;
    double recent;  // sessions the rate limiter still counts (up to COUNT; 0 without one)
  };

  static constexpr size_t kShards = 64;

  explicit ClientTable(size_t capacity);
  ~ClientTable();
  ClientTable(const ClientTable&) = delete;
  ClientTable& operator=(const ClientTable&) = delete;

  // A reload may change global.max_tracked_clients; entries over a smaller bound go as
  // new keys arrive.
  void set_capacity(size_t capacity);
  // A new session of `key` at `now_ms`. Over a limit: refused (nothing changes) unless
  // `dry_run`, where the verdict says what would have happened and the session is
  // admitted and counted anyway.
  Admission admit(const ClientKey& key, const ClientLimits& limits, int64_t now_ms, bool dry_run);
  void release(Entry* pin);

  size_t size() const { return size_.load(std::memory_order_relaxed); }
  uint64_t evictions() const { return evictions_.load(std::memory_order_relaxed); }
  // The `n` keys with the most open sessions (then the most sessions the rate limiter
  // still counts), for ctl clients.
  std::vector<Stat> top(size_t n, int64_t now_ms) const;

 private:
  struct Shard;
  Shard& shard_of(const ClientKey& key);
  bool evict_one(Shard& s, int64_t now_us);

  std::unique_ptr<Shard[]> shards_;
  std::atomic<size_t> per_shard_;
  std::atomic<size_t> size_{0};
  std::atomic<uint64_t> evictions_{0};
};

}  // namespace smtplb
