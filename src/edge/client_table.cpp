#include "smtplb/edge/client_table.hpp"

#include <algorithm>
#include <climits>

namespace smtplb {

struct ClientTable::Entry {
  const ClientKey* key = nullptr;  // the map node's own key
  uint32_t active = 0;             // open sessions: pinned while > 0
  Gcra gcra;
  int64_t limited_until_us = INT64_MIN;  // over its rate until then: not evictable
  int64_t interval_us = 0;               // the rate's interval at the last admission
  Entry* newer = nullptr;                // LRU list, most recently seen at the head
  Entry* older = nullptr;
};

struct alignas(64) ClientTable::Shard {
  std::mutex mu;
  std::unordered_map<ClientKey, Entry, ClientKeyHash> map;
  Entry* head = nullptr;  // most recently seen
  Entry* tail = nullptr;  // least recently seen

  void unlink(Entry* e) {
    (e->newer ? e->newer->older : head) = e->older;
    (e->older ? e->older->newer : tail) = e->newer;
    e->newer = e->older = nullptr;
  }
  void push_head(Entry* e) {
    e->older = head;
    e->newer = nullptr;
    if (head) head->newer = e;
    head = e;
    if (!tail) tail = e;
  }
  void touch(Entry* e) {
    if (head == e) return;
    unlink(e);
    push_head(e);
  }
};

ClientTable::ClientTable(size_t capacity) : shards_(new Shard[kShards]), per_shard_(0) {
  set_capacity(capacity);
}

ClientTable::~ClientTable() = default;

void ClientTable::set_capacity(size_t capacity) {
  per_shard_.store(std::max<size_t>(1, (capacity + kShards - 1) / kShards), std::memory_order_relaxed);
}

ClientTable::Shard& ClientTable::shard_of(const ClientKey& key) {
  return shards_[(ClientKeyHash{}(key) >> 7) & (kShards - 1)];
}

// Looks at a few of the least recently seen keys and evicts the first one that neither
// has open sessions nor is over its rate; the others move to the head, so a table full of
// pinned keys costs a bounded look per insertion (and then grows past its bound by them).
bool ClientTable::evict_one(Shard& s, int64_t now_us) {
  for (int looked = 0; looked < 8 && s.tail; ++looked) {
    Entry* e = s.tail;
    if (e->active == 0 && e->limited_until_us <= now_us) {
      s.unlink(e);
      s.map.erase(*e->key);
      size_.fetch_sub(1, std::memory_order_relaxed);
      evictions_.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
    s.touch(e);
  }
  return false;
}

ClientTable::Admission ClientTable::admit(const ClientKey& key, const ClientLimits& limits, int64_t now_ms,
                                          bool dry_run) {
  const int64_t now_us = now_ms * 1000;
  Shard& s = shard_of(key);
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.map.find(key);
  if (it == s.map.end()) {
    // Over the bound (keys pinned by open sessions can push it there): forget up to two,
    // so the table shrinks back as those sessions end.
    const size_t bound = per_shard_.load(std::memory_order_relaxed);
    for (int i = 0; i < 2 && s.map.size() >= bound; ++i)
      if (!evict_one(s, now_us)) break;
    it = s.map.emplace(key, Entry{}).first;
    it->second.key = &it->first;
    s.push_head(&it->second);
    size_.fetch_add(1, std::memory_order_relaxed);
  } else {
    s.touch(&it->second);
  }
  Entry& e = it->second;
  Admission a;
  if (limits.max_concurrent && e.active >= limits.max_concurrent) {
    a.verdict = Verdict::over_concurrent;
  } else if (limits.rate.on()) {
    Gcra next = e.gcra;
    if (next.admit(limits.rate, now_us)) {
      e.gcra = next;
      e.interval_us = limits.rate.interval_us();
    } else {
      a.verdict = Verdict::over_rate;  // not charged: a dry run counts what a real one would refuse
    }
    e.limited_until_us = e.gcra.limited_until_us(limits.rate);
  }
  if (a.verdict != Verdict::ok && !dry_run) return a;
  ++e.active;
  a.pin = &e;
  return a;
}

void ClientTable::release(Entry* pin) {
  Shard& s = shard_of(*pin->key);
  std::lock_guard<std::mutex> lock(s.mu);
  --pin->active;
}

std::vector<ClientTable::Stat> ClientTable::top(size_t n, int64_t now_ms) const {
  std::vector<Stat> all;
  const int64_t now_us = now_ms * 1000;
  for (size_t i = 0; i < kShards; ++i) {
    Shard& s = shards_[i];
    std::lock_guard<std::mutex> lock(s.mu);
    for (const auto& [key, e] : s.map) {
      // The sessions the limiter still counts against the key: how far its schedule runs
      // ahead of now, in intervals (COUNT at most; 0 without a rate limit).
      double recent = 0;
      if (e.interval_us > 0 && e.gcra.tat_us > now_us) recent = double(e.gcra.tat_us - now_us) / double(e.interval_us);
      if (e.active || recent > 0) all.push_back({key, e.active, recent});
    }
  }
  std::sort(all.begin(), all.end(), [](const Stat& a, const Stat& b) {
    return a.sessions != b.sessions ? a.sessions > b.sessions : a.recent > b.recent;
  });
  if (all.size() > n) all.resize(n);
  return all;
}

}  // namespace smtplb
