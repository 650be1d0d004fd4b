// Source affinity's table (weighted rendezvous hashing): evenness, minimal disruption,
// independence from the servers' order, weights, and the cached rows agreeing with the
// full ranking; and the choice around it in PoolBalancer (usable servers, retries down the
// key's preference list, the backup tier, hash_balance_factor).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "smtplb/edge/address.hpp"
#include "smtplb/lb/select.hpp"
#include "smtplb/lb/source_hash.hpp"

using namespace smtplb;

namespace {

std::vector<SourceMember> pool_of(size_t n, const std::string& prefix = "mx") {
  std::vector<SourceMember> m;
  for (size_t i = 0; i < n; ++i) m.push_back({prefix + std::to_string(i), 1, false});
  return m;
}

// 100 000 random client keys: IPv4 /24 keys, as the data path computes them.
std::vector<uint64_t> random_keys(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> keys;
  for (size_t i = 0; i < n; ++i) {
    const Addr128 a{0, 0xffff00000000ull | (rng() & 0xffffffffu)};
    keys.push_back(source_key(a, 24, 64).hash);
  }
  return keys;
}

// Name of the first preference of each key.
std::vector<std::string> first_choices(const SourceTable& t, const std::vector<SourceMember>& m,
                                       const std::vector<uint64_t>& keys) {
  std::vector<std::string> out;
  for (uint64_t k : keys) out.push_back(m[t.cached(SourceTable::bucket_of(k), false)[0]].name);
  return out;
}

double max_over_mean(const std::vector<std::string>& choices, size_t servers) {
  std::map<std::string, size_t> load;
  for (const auto& c : choices) ++load[c];
  REQUIRE(load.size() == servers);
  size_t max = 0;
  for (const auto& [name, n] : load) max = std::max(max, n);
  return double(max) / (double(choices.size()) / double(servers));
}

}  // namespace

TEST_CASE("source hash: the stable hash is the same on every build") {
  // Fixed values: a change here changes every mapping of every deployed pool, and two
  // balancers of different versions would disagree.
  CHECK(stable_hash64("") == stable_hash64(""));
  CHECK(stable_hash64("mx1") != stable_hash64("mx2"));
  CHECK(stable_hash64("mx1", 1) != stable_hash64("mx1", 2));
  CHECK(mix64(1) == 0x5692161d100b05e5ull);  // splitmix64's finalizer, published constants
  CHECK(stable_hash64("mx1.example.net") == 0x83d13931d1c7e7a8ull);
  // And so is the table: these rows were computed once and must never change.
  const auto m = pool_of(5);
  const SourceTable t(m);
  auto row = [&](uint32_t b) {
    std::string out;
    for (uint32_t i : t.cached(b, false)) out += m[i].name + " ";
    return out;
  };
  CHECK(row(0) == "mx1 mx2 mx4 mx3 ");
  CHECK(row(2) == "mx2 mx3 mx4 mx1 ");
  CHECK(row(65536) == "mx0 mx1 mx2 mx4 ");
  const std::string long_name(100, 'a');
  CHECK(stable_hash64(long_name) != stable_hash64(long_name.substr(0, 99)));
}

TEST_CASE("source hash: a source key is the masked address") {
  const Addr128 a{0, 0xffff00000000ull | 0xc0000281u};  // 192.0.2.129
  const Addr128 b{0, 0xffff00000000ull | 0xc00002feu};  // 192.0.2.254
  const Addr128 c{0, 0xffff00000000ull | 0xc0000381u};  // 192.0.3.129
  CHECK(source_key(a, 24, 64).hash == source_key(b, 24, 64).hash);
  CHECK(source_key(a, 24, 64).hash != source_key(c, 24, 64).hash);
  CHECK(source_key(a, 24, 64).to_string() == "192.0.2.0/24");
  CHECK(source_key(a, 32, 64).hash != source_key(b, 32, 64).hash);
  CHECK(source_key(a, 32, 64).to_string() == "192.0.2.129/32");
  const Addr128 v6a{0x20010db800010002ull, 0x1}, v6b{0x20010db800010002ull, 0xffff}, v6c{0x20010db800010003ull, 1};
  CHECK(source_key(v6a, 24, 64).hash == source_key(v6b, 24, 64).hash);
  CHECK(source_key(v6a, 24, 64).hash != source_key(v6c, 24, 64).hash);
  CHECK(source_key(v6a, 24, 64).to_string() == "2001:db8:1:2::/64");
  CHECK(source_key(v6a, 24, 48).hash == source_key(v6c, 24, 48).hash);
  CHECK(source_key(a, 0, 0).hash == source_key(c, 0, 0).hash);  // all of IPv4 is one key
  CHECK(source_key(v6a, 0, 0).hash == source_key(v6c, 0, 0).hash);
  CHECK(source_key(a, 0, 0).hash != source_key(v6a, 0, 0).hash);
}

TEST_CASE("source hash: 100 000 random keys spread evenly over 5, 10 and 50 servers") {
  const auto keys = random_keys(100'000, 1);
  // max/mean is about 1 + 2.5 standard deviations: the larger the pool, the fewer keys
  // and buckets each server has, the wider the spread.
  for (const auto& [n, bound] : std::vector<std::pair<size_t, double>>{{5, 1.03}, {10, 1.05}, {50, 1.12}}) {
    const auto m = pool_of(n);
    const SourceTable t(m);
    const double r = max_over_mean(first_choices(t, m, keys), n);
    MESSAGE("source hash evenness: " << n << " servers, 100000 keys: max/mean " << r);
    CHECK(r < bound);
    CHECK(r >= 1.0);
  }
}

TEST_CASE("source hash: removing a server moves only its keys, re-adding brings exactly those back") {
  const auto keys = random_keys(100'000, 2);
  for (size_t n : {5u, 10u, 50u}) {
    const auto all = pool_of(n);
    const SourceTable full(all);
    const auto before = first_choices(full, all, keys);
    const std::string gone = all[n / 2].name;
    auto rest = all;
    rest.erase(rest.begin() + long(n / 2));
    const SourceTable smaller(rest);
    const auto during = first_choices(smaller, rest, keys);
    size_t moved = 0, moved_others = 0, wrong_next = 0;
    for (size_t i = 0; i < keys.size(); ++i) {
      if (before[i] == during[i]) continue;
      ++moved;
      if (before[i] != gone) ++moved_others;
      // It went to its own second preference.
      const auto row = full.cached(SourceTable::bucket_of(keys[i]), false);
      if (all[row[1]].name != during[i]) ++wrong_next;
    }
    const size_t on_gone = size_t(std::count(before.begin(), before.end(), gone));
    MESSAGE("source hash disruption: " << n << " servers, one removed: moved " << moved << " of " << keys.size()
                                       << " keys (" << on_gone << " were on it), others moved: " << moved_others);
    CHECK(moved == on_gone);
    CHECK(moved_others == 0);
    CHECK(wrong_next == 0);
    // Back again (in another position): the same table, so exactly those keys return.
    auto again = rest;
    again.insert(again.begin(), all[n / 2]);
    const SourceTable back(again);
    CHECK(first_choices(back, again, keys) == before);
  }
}

TEST_CASE("source hash: the table depends on names and weights, not on the servers' order") {
  auto m = pool_of(17);
  for (size_t i = 0; i < m.size(); ++i) m[i].weight = uint32_t(1 + i % 3);
  m[3].backup = m[11].backup = true;
  const SourceTable t(m);
  std::mt19937 rng(3);
  for (int round = 0; round < 3; ++round) {
    auto shuffled = m;
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    const SourceTable s(shuffled);
    size_t differ = 0;
    for (uint32_t b = 0; b < SourceTable::kBuckets; ++b)
      for (bool backup : {false, true}) {
        const auto x = t.cached(b, backup), y = s.cached(b, backup);
        REQUIRE(x.size() == y.size());
        for (size_t j = 0; j < x.size(); ++j) differ += m[x[j]].name != shuffled[y[j]].name;
      }
    CHECK(differ == 0);
  }
  CHECK(t.cached(0, false).size() == SourceTable::kDepth);
  CHECK(t.cached(0, true).size() == 2);
}

TEST_CASE("source hash: weights are honoured within 3%") {
  std::vector<SourceMember> m{{"a", 1, false}, {"b", 2, false}, {"c", 3, false}, {"d", 4, false}, {"z", 0, false}};
  const SourceTable t(m);
  CHECK(t.size() == 4);  // weight 0: never a preference
  std::vector<size_t> share(m.size());
  for (uint32_t b = 0; b < SourceTable::kBuckets; ++b) ++share[t.cached(b, false)[0]];
  CHECK(share[4] == 0);
  for (size_t i = 0; i < 4; ++i) {
    const double expected = double(SourceTable::kBuckets) * m[i].weight / 10.0;
    MESSAGE("source hash weights: " << m[i].name << " weight " << m[i].weight << ": " << share[i]
                                    << " buckets, expected " << expected);
    CHECK(double(share[i]) == doctest::Approx(expected).epsilon(0.03));
  }
}

TEST_CASE("source hash: the cached rows are the start of the full ranking") {
  for (bool weighted : {false, true}) {
    auto m = pool_of(40);
    if (weighted)
      for (size_t i = 0; i < m.size(); ++i) m[i].weight = uint32_t(1 + (i * 7) % 5);
    m[5].backup = true;
    const SourceTable t(m);
    std::vector<SourceTable::Ranked> scratch;
    std::vector<uint32_t> full;
    size_t differ = 0;
    for (uint32_t b = 0; b < SourceTable::kBuckets; b += 7) {
      t.rank(b, false, scratch, full);
      REQUIRE(full.size() == 39);
      const auto row = t.cached(b, false);
      for (size_t j = 0; j < row.size(); ++j) differ += row[j] != full[j];
      CHECK(std::find(full.begin(), full.end(), 5u) == full.end());
      t.rank(b, true, scratch, full);
      REQUIRE(full == std::vector<uint32_t>{5});
    }
    CHECK(differ == 0);
  }
}

TEST_CASE("source hash: every scan path (AVX-512, AVX2, plain) builds the same table") {
  // The build uses the widest vector unit the CPU has; a machine without it takes the next
  // path, and every path must give every balancer the same table. Where the CPU lacks a
  // unit its path falls back to the next one, so the comparison still holds.
  for (bool weighted : {false, true}) {
    auto m = pool_of(37);
    if (weighted)
      for (size_t i = 0; i < m.size(); ++i) m[i].weight = uint32_t(1 + (i * 5) % 4);
    m[3].backup = true;
    m[11].backup = true;
    std::vector<std::vector<uint32_t>> tables;
    for (SourceTable::Scan s : {SourceTable::Scan::best, SourceTable::Scan::avx2, SourceTable::Scan::scalar}) {
      SourceTable::set_scan_for_tests(s);
      const SourceTable t(m);
      std::vector<uint32_t> all;
      for (uint32_t b = 0; b < SourceTable::kBuckets; ++b)
        for (bool backup : {false, true})
          for (uint32_t i : t.cached(b, backup)) all.push_back(i);
      tables.push_back(std::move(all));
    }
    SourceTable::set_scan_for_tests(SourceTable::Scan::best);
    CHECK(tables[0].size() == size_t(SourceTable::kBuckets) * (SourceTable::kDepth + 2));
    CHECK(tables[0] == tables[1]);
    CHECK(tables[0] == tables[2]);
  }
}

TEST_CASE("source hash: a pool smaller than the cached depth, and an empty one") {
  const auto one = pool_of(1);
  const SourceTable t1(one);
  CHECK(t1.cached(123, false).size() == 1);
  CHECK(t1.cached(123, true).empty());
  const SourceTable t0{std::vector<SourceMember>{}};
  CHECK(t0.cached(0, false).empty());
  CHECK(t0.size() == 0);
}

namespace {

// A pool as PoolBalancer sees it, with the table of its configured servers.
struct SourcePool {
  std::vector<SourceMember> members;
  SourceTable table;
  std::vector<ServerView> views;
  PoolBalancer balancer;
  explicit SourcePool(std::vector<SourceMember> m) : members(std::move(m)), table(members) {
    for (const auto& x : members) views.push_back({true, x.backup, false, x.weight, -1, 0});
  }
  Selection pick(uint32_t bucket, std::vector<uint32_t> tried = {}, unsigned factor = 0) {
    const SourceChoice c{&table, bucket, factor};
    return balancer.pick(
        Algorithm::source, views, tried, 0,
        [&](size_t i) {
          ++views[i].active;
          return true;
        },
        &c);
  }
  // Picks without keeping the session.
  std::optional<size_t> peek(uint32_t bucket, std::vector<uint32_t> tried = {}) {
    const Selection s = pick(bucket, std::move(tried));
    if (s.index) --views[*s.index].active;
    return s.index;
  }
};

}  // namespace

TEST_CASE("source pick: a key goes to its first preference, a down server's keys to their next") {
  SourcePool p(pool_of(5));
  std::vector<size_t> first(SourceTable::kBuckets);
  for (uint32_t b = 0; b < SourceTable::kBuckets; ++b) {
    const auto s = p.peek(b);
    REQUIRE(s);
    first[b] = *s;
    CHECK(*s == p.table.cached(b, false)[0]);
  }
  p.views[2].usable = false;  // DOWN, drain, maint or weight 0 alike
  size_t moved_others = 0, wrong_next = 0, moved = 0;
  for (uint32_t b = 0; b < SourceTable::kBuckets; ++b) {
    const size_t now = *p.peek(b);
    if (now == first[b]) continue;
    ++moved;
    moved_others += first[b] != 2;
    wrong_next += now != p.table.cached(b, false)[1];
  }
  CHECK(moved > 0);
  CHECK(moved == size_t(std::count(first.begin(), first.end(), 2)));
  CHECK(moved_others == 0);
  CHECK(wrong_next == 0);
  p.views[2].usable = true;
  size_t differ = 0;
  for (uint32_t b = 0; b < SourceTable::kBuckets; ++b) differ += *p.peek(b) != first[b];
  CHECK(differ == 0);
}

TEST_CASE("source pick: retries go down the key's preference list, never back to a tried server") {
  SourcePool p(pool_of(6));
  for (uint32_t b : {0u, 1u, 777u, 65536u}) {
    std::vector<uint32_t> full, tried;
    std::vector<SourceTable::Ranked> scratch;
    p.table.rank(b, false, scratch, full);
    REQUIRE(full.size() == 6);
    for (size_t attempt = 0; attempt < 6; ++attempt) {
      const auto s = p.peek(b, tried);
      REQUIRE(s);
      CHECK(*s == full[attempt]);  // past the cached depth (4) too
      tried.push_back(uint32_t(*s));
    }
    const Selection none = p.pick(b, tried);
    CHECK(!none.index);
    CHECK(!none.all_full);  // nothing to wait for: the session fails rather than queues
  }
  // A full server passes its keys on (untried, but no slot): the next preference.
  const uint32_t b = 4242;
  const auto row = p.table.cached(b, false);
  p.views[row[0]].full = true;
  CHECK(p.peek(b) == row[1]);
}

TEST_CASE("source pick: backup servers serve only when no regular server is usable, by their own ranking") {
  auto m = pool_of(6);
  m[4].backup = m[5].backup = true;
  SourcePool p(m);
  for (uint32_t b = 0; b < 1000; ++b) CHECK(!p.members[*p.peek(b)].backup);
  p.views[0].usable = p.views[1].usable = p.views[2].usable = false;
  for (uint32_t b = 0; b < 1000; ++b) CHECK(p.peek(b) == 3u);
  p.views[3].usable = false;
  size_t on4 = 0;
  for (uint32_t b = 0; b < 1000; ++b) {
    const auto s = p.peek(b);
    REQUIRE(s);
    CHECK(*s == p.table.cached(b, true)[0]);
    on4 += *s == 4;
  }
  CHECK(on4 > 400);  // both backups share the keys
  CHECK(on4 < 600);
  p.views[4].usable = false;  // its keys move to the other backup only
  for (uint32_t b = 0; b < 1000; ++b) CHECK(p.peek(b) == 5u);
}

TEST_CASE("source pick: hash_balance_factor bounds every server's load") {
  SourcePool p(pool_of(5));
  // Half the sessions come from one key: without a factor its server takes them all.
  std::mt19937 rng(4);
  const uint32_t hot = 12345;
  size_t detours = 0;
  for (size_t n = 1; n <= 1000; ++n) {
    const uint32_t b = n % 2 ? hot : uint32_t(rng() % SourceTable::kBuckets);
    const Selection s = p.pick(b, {}, 125);
    REQUIRE(s.index);
    detours += s.detoured;
    // After placing session n: no server above ceil(n * 1.25 / 5).
    for (const auto& v : p.views) CHECK(v.active <= (n * 125 + 499) / 500);
  }
  uint32_t max = 0;
  for (const auto& v : p.views) max = std::max(max, v.active);
  MESSAGE("source pick: factor 125, 1000 sessions, half from one key: max load " << max << " (mean 200), " << detours
                                                                                 << " detours");
  CHECK(max <= 250);
  CHECK(detours > 0);
  // Without the factor the hot key's server takes its 500 and its share of the rest.
  SourcePool q(pool_of(5));
  for (size_t n = 1; n <= 1000; ++n) q.pick(n % 2 ? hot : uint32_t(rng() % SourceTable::kBuckets));
  uint32_t qmax = 0;
  for (const auto& v : q.views) qmax = std::max(qmax, v.active);
  CHECK(qmax > 500);
  // A key whose server is within the bound is not moved.
  SourcePool r(pool_of(5));
  const Selection s = r.pick(hot, {}, 125);
  CHECK(s.index == r.table.cached(hot, false)[0]);
  CHECK(!s.detoured);
}

TEST_CASE("source pick: the O(1) path chooses what the full choice chooses, or leaves it to it") {
  auto m = pool_of(12);
  m[10].backup = m[11].backup = true;
  SourcePool p(m);
  std::mt19937 rng(5);
  size_t fast = 0, left = 0;
  for (int round = 0; round < 20000; ++round) {
    for (auto& v : p.views) {
      v.usable = rng() % 4 != 0;
      v.full = rng() % 6 == 0;
      v.active = 0;
    }
    if (round % 10 == 0)  // now and then no regular server is usable: the backup tier
      for (size_t i = 0; i < 10; ++i) p.views[i].usable = false;
    std::vector<uint32_t> tried;
    for (uint32_t i = 0; i < 12; ++i)
      if (rng() % 8 == 0) tried.push_back(i);
    const uint32_t b = uint32_t(rng() % SourceTable::kBuckets);
    const SourceChoice c{&p.table, b, 0};
    const auto quick = PoolBalancer::pick_source_cached(
        c, [&](size_t i) { return p.views[i]; }, tried, [](size_t) { return true; });
    const Selection full = p.pick(b, tried);
    if (full.index) --p.views[*full.index].active;
    if (quick) {
      ++fast;
      CHECK(quick == full.index);
    } else {
      ++left;
      // Nothing in the cached regular row could take the session: the full choice goes
      // further down the list, to the backups, or finds nothing.
      if (full.index) {
        const auto row = p.table.cached(b, false);
        const bool in_row = std::find(row.begin(), row.end(), uint32_t(*full.index)) != row.end();
        CHECK((!in_row || p.views[*full.index].backup));
      }
    }
  }
  MESSAGE("source pick: O(1) path decided " << fast << " of " << fast + left << " random states");
  CHECK(fast > 10000);
  CHECK(left > 1000);
  // With a balance factor it always leaves the choice to pick() (it needs the pool's load).
  const SourceChoice with_factor{&p.table, 1, 150};
  for (auto& v : p.views) v = {true, v.backup, false, 1, -1, 0};
  CHECK(!PoolBalancer::pick_source_cached(
      with_factor, [&](size_t i) { return p.views[i]; }, {}, [](size_t) { return true; }));
}

TEST_CASE("source pick: hash_balance_factor bounds each server in proportion to its weight") {
  // Weights 1, 1, 2, 2, 4 (total 10); the hot key's first preference is a weight-1 server.
  const std::vector<SourceMember> m{
      {"mx-a", 1, false}, {"mx-b", 1, false}, {"mx-c", 2, false}, {"mx-d", 2, false}, {"mx-e", 4, false}};
  constexpr uint64_t kTotalWeight = 10, kFactor = 125;
  SourcePool p(m);
  uint32_t hot = 0;
  while (p.table.cached(hot, false)[0] != 0) ++hot;
  std::mt19937 rng(6);
  size_t detours = 0;
  for (uint64_t n = 1; n <= 2000; ++n) {
    const uint32_t b = n % 2 ? hot : uint32_t(rng() % SourceTable::kBuckets);
    const Selection s = p.pick(b, {}, unsigned(kFactor));
    REQUIRE(s.index);
    detours += s.detoured;
    // After placing session n: no server above ceil(n * 125% * weight / total weight).
    for (size_t i = 0; i < m.size(); ++i)
      CHECK(p.views[i].active <= (n * kFactor * m[i].weight + 100 * kTotalWeight - 1) / (100 * kTotalWeight));
  }
  std::string loads;
  for (size_t i = 0; i < m.size(); ++i)
    loads += " " + m[i].name + "(w" + std::to_string(m[i].weight) + ")=" + std::to_string(p.views[i].active);
  MESSAGE("source pick: factor 125, weights 1 1 2 2 4, 2000 sessions, half from one key of mx-a:"
          << loads << ", " << detours << " detours");
  // The hot key alone keeps its server at the bound: ceil(2000 x 125% x 1/10) = 250 at the
  // end, so at least 1000 - 250 of its sessions were passed on.
  const uint64_t bound_a = (2000 * kFactor * 1 + 100 * kTotalWeight - 1) / (100 * kTotalWeight);
  CHECK(p.views[0].active == bound_a);
  CHECK(detours >= 1000 - bound_a);
}

TEST_CASE("source pick: a key whose server is over hash_balance_factor goes to its next preference") {
  // A model of the rule, checked against PoolBalancer::pick on random pool states: in the
  // tier in use, with T the open sessions of its usable servers and W their weight, a
  // server may take the key while active + 1 <= ceil((T + 1) x factor/100 x weight/W),
  // that is while active < (T + 1) x factor/100 x weight/W; the key goes to its first
  // such preference that this session may use (usable, not full, not tried), or, when
  // there is none, to its first preference it may use.
  auto m = pool_of(9);
  for (size_t i = 0; i < m.size(); ++i) m[i].weight = uint32_t(1 + (i * 5) % 4);
  m[7].backup = m[8].backup = true;
  SourcePool p(m);
  std::mt19937 rng(7);
  std::vector<SourceTable::Ranked> scratch;
  std::vector<uint32_t> ranking;
  size_t detoured = 0, first = 0, none = 0;
  for (int round = 0; round < 20000; ++round) {
    for (auto& v : p.views) {
      v.usable = rng() % 5 != 0;
      v.full = rng() % 10 == 0;
      v.active = uint32_t(rng() % 30);
    }
    if (round % 8 == 0)  // now and then only the backups are usable
      for (size_t i = 0; i < 7; ++i) p.views[i].usable = false;
    std::vector<uint32_t> tried;
    for (uint32_t i = 0; i < m.size(); ++i)
      if (rng() % 6 == 0) tried.push_back(i);
    const uint32_t b = uint32_t(rng() % SourceTable::kBuckets);
    const unsigned factor = 101 + unsigned(rng() % 100);

    bool regular = false;
    for (const auto& v : p.views) regular |= v.usable && !v.backup;
    uint64_t total = 0, weights = 0;
    for (const auto& v : p.views)
      if (v.usable && v.backup != regular) {
        total += v.active;
        weights += v.weight;
      }
    p.table.rank(b, !regular, scratch, ranking);
    std::optional<size_t> expect, fallback;
    for (uint32_t i : ranking) {
      const ServerView& v = p.views[i];
      if (!v.usable || v.full || std::find(tried.begin(), tried.end(), i) != tried.end()) continue;
      if (!fallback) fallback = i;
      if (v.active * 100 * weights < (total + 1) * factor * v.weight) {
        expect = i;
        break;
      }
    }
    if (!expect) expect = fallback;

    const Selection s = p.pick(b, tried, factor);
    if (s.index) --p.views[*s.index].active;
    REQUIRE(s.index == expect);
    CHECK(s.detoured == (expect && expect != fallback));
    detoured += s.detoured;
    first += expect && expect == fallback;
    none += !expect;
  }
  MESSAGE("source pick: balance factor model, 20000 random states: "
          << first << " first usable preference, " << detoured << " passed on, " << none << " no server");
  CHECK(detoured > 1000);
  CHECK(first > 1000);
  CHECK(none > 100);
}
