#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "smtplb/lb/balancer.hpp"

using smtplb::Candidate;
using smtplb::LeastConnections;
using smtplb::SmoothRoundRobin;

namespace {

std::vector<Candidate> with_weights(const std::vector<uint32_t>& weights) {
  std::vector<Candidate> c;
  for (uint32_t w : weights) c.push_back({w, 0, true});
  return c;
}

uint64_t total_weight(const std::vector<Candidate>& c) {
  uint64_t sum = 0;
  for (const auto& x : c)
    if (x.eligible) sum += x.weight;
  return sum;
}

std::vector<size_t> picks(SmoothRoundRobin& rr, const std::vector<Candidate>& c, size_t n) {
  std::vector<size_t> out;
  for (size_t i = 0; i < n; ++i) {
    auto p = rr.pick(c);
    REQUIRE(p.has_value());
    out.push_back(*p);
  }
  return out;
}

std::string as_string(const std::vector<size_t>& seq) {
  std::string s;
  for (size_t i : seq) s += char('0' + i);
  return s;
}

// Longest run of consecutive picks of the same server, per server.
std::map<size_t, size_t> max_runs(const std::vector<size_t>& seq) {
  std::map<size_t, size_t> best;
  size_t run = 0;
  for (size_t i = 0; i < seq.size(); ++i) {
    run = (i > 0 && seq[i] == seq[i - 1]) ? run + 1 : 1;
    best[seq[i]] = std::max(best[seq[i]], run);
  }
  return best;
}

// nginx's ngx_http_upstream_get_peer(), written out independently as the reference.
struct NginxSwrr {
  std::vector<int64_t> current;
  std::optional<size_t> pick(const std::vector<Candidate>& c) {
    current.resize(c.size(), 0);
    int64_t total = 0;
    std::optional<size_t> best;
    for (size_t i = 0; i < c.size(); ++i) {
      if (!c[i].eligible || c[i].weight == 0) continue;
      current[i] += c[i].weight;
      total += c[i].weight;
      if (!best || current[i] > current[*best]) best = i;
    }
    if (best) current[*best] -= total;
    return best;
  }
};

struct Lcg {
  uint64_t s;
  uint32_t next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return uint32_t(s >> 33);
  }
};

}  // namespace

TEST_CASE("roundrobin: nothing to pick") {
  SmoothRoundRobin rr;
  CHECK_FALSE(rr.pick({}).has_value());
  std::vector<Candidate> c = {{1, 0, false}, {0, 0, true}, {5, 0, false}};
  for (int i = 0; i < 10; ++i) CHECK_FALSE(rr.pick(c).has_value());
}

TEST_CASE("roundrobin: the nginx sequences") {
  struct Case {
    std::vector<uint32_t> weights;
    std::string period;
  };
  const std::vector<Case> cases = {
      {{1}, "0"},
      {{1, 1, 1}, "012"},
      {{5, 1, 1}, "0010200"},  // nginx's documented example: a a b a c a a
      {{3, 2, 1}, "010210"},
      {{4, 4}, "01010101"},
      {{1, 2}, "101"},
      {{7, 3}, "0100010010"},
      {{2, 3, 5, 7}, "32130231323203123"},
  };
  for (const auto& tc : cases) {
    CAPTURE(tc.period);
    SmoothRoundRobin rr;
    auto c = with_weights(tc.weights);
    // The sequence repeats with period sum(weights).
    for (int round = 0; round < 5; ++round) CHECK(as_string(picks(rr, c, tc.period.size())) == tc.period);
  }
}

TEST_CASE("roundrobin: exact counts over every window of sum(weights)") {
  const std::vector<std::vector<uint32_t>> sets = {
      {1},
      {1, 1},
      {5, 1, 1},
      {3, 2, 1},
      {2, 3, 5, 7},
      {100, 50, 1},
      {256, 1},
      {10, 1},
      {7, 3},
      {256, 256, 256},
      {1, 2, 4, 8, 16, 32, 64, 128},
      {13, 0, 7},
      {97, 89, 83, 79},
      {255, 254, 1, 1},
  };
  for (const auto& w : sets) {
    auto c = with_weights(w);
    const uint64_t W = total_weight(c);
    const size_t rounds = 50;
    SmoothRoundRobin rr;
    auto seq = picks(rr, c, W * rounds);
    std::vector<uint64_t> window(w.size(), 0);
    for (size_t i = 0; i < seq.size(); ++i) {
      ++window[seq[i]];
      if (i >= W) --window[seq[i - W]];
      if (i + 1 >= W) {
        for (size_t s = 0; s < w.size(); ++s) {
          CAPTURE(as_string(std::vector<size_t>(seq.begin(), seq.begin() + std::min<size_t>(seq.size(), 40))));
          CAPTURE(i);
          CAPTURE(s);
          REQUIRE(window[s] == w[s]);
        }
      }
    }
    // Totals over the whole run.
    for (size_t s = 0; s < w.size(); ++s) CHECK(std::count(seq.begin(), seq.end(), s) == int64_t(w[s] * rounds));
  }
}

TEST_CASE("roundrobin: longest run of one server") {
  struct Case {
    std::vector<uint32_t> weights;
    std::map<size_t, size_t> runs;  // server -> longest run seen over many rounds
  };
  const std::vector<Case> cases = {
      {{1, 1, 1}, {{0, 1}, {1, 1}, {2, 1}}},
      // a a b a c a a | a a b ...: the period wraps into a run of 4, never 5.
      {{5, 1, 1}, {{0, 4}, {1, 1}, {2, 1}}},
      {{3, 2, 1}, {{0, 2}, {1, 1}, {2, 1}}},
      {{7, 3}, {{0, 3}, {1, 1}}},
      {{2, 3, 5, 7}, {{0, 1}, {1, 1}, {2, 1}, {3, 2}}},
      {{100, 50, 1}, {{0, 2}, {1, 1}, {2, 1}}},
      {{10, 1}, {{0, 10}, {1, 1}}},
  };
  for (const auto& tc : cases) {
    auto c = with_weights(tc.weights);
    SmoothRoundRobin rr;
    auto runs = max_runs(picks(rr, c, total_weight(c) * 20));
    CAPTURE(tc.weights.size());
    CHECK(runs == tc.runs);
  }
}

TEST_CASE("roundrobin: same choices as the nginx reference on random pools") {
  Lcg rng{42};
  for (int t = 0; t < 300; ++t) {
    std::vector<Candidate> c(1 + rng.next() % 9);
    for (auto& x : c) {
      x.weight = rng.next() % 4 == 0 ? 0 : 1 + rng.next() % (rng.next() % 2 ? 10 : 256);
      x.eligible = rng.next() % 6 != 0;
    }
    SmoothRoundRobin rr;
    NginxSwrr ref;
    for (int i = 0; i < 1000; ++i) {
      // Now and then a server changes eligibility or weight, as health checks and slow start do.
      if (rng.next() % 50 == 0) {
        auto& x = c[rng.next() % c.size()];
        if (rng.next() % 2)
          x.eligible = !x.eligible;
        else
          x.weight = rng.next() % 257;
      }
      auto got = rr.pick(c);
      auto want = ref.pick(c);
      CAPTURE(t);
      CAPTURE(i);
      REQUIRE(got == want);
      if (got) {
        REQUIRE(c[*got].eligible);
        REQUIRE(c[*got].weight > 0);
      }
    }
  }
}

TEST_CASE("roundrobin: ineligible and zero-weight servers are never picked") {
  SmoothRoundRobin rr;
  std::vector<Candidate> c = {{3, 0, true}, {5, 0, false}, {0, 0, true}, {1, 0, true}};
  auto seq = picks(rr, c, 400);
  CHECK(std::count(seq.begin(), seq.end(), 1u) == 0);
  CHECK(std::count(seq.begin(), seq.end(), 2u) == 0);
  CHECK(std::count(seq.begin(), seq.end(), 0u) == 300);
  CHECK(std::count(seq.begin(), seq.end(), 3u) == 100);
}

TEST_CASE("roundrobin: a server leaving and coming back") {
  SmoothRoundRobin rr;
  std::vector<Candidate> c = with_weights({1, 1, 1});
  CHECK(as_string(picks(rr, c, 3)) == "012");
  c[1].eligible = false;
  CHECK(as_string(picks(rr, c, 6)) == "020202");
  c[1].eligible = true;
  // Back in rotation at once, and the three share evenly again.
  auto seq = picks(rr, c, 300);
  for (size_t s = 0; s < 3; ++s) CHECK(std::count(seq.begin(), seq.end(), s) == 100);
  for (const auto& [server, run] : max_runs(seq)) CHECK(run <= 2);
}

TEST_CASE("roundrobin: a different number of servers starts afresh") {
  SmoothRoundRobin rr;
  auto three = with_weights({5, 1, 1});
  CHECK(as_string(picks(rr, three, 2)) == "00");
  auto two = with_weights({1, 1});
  CHECK(as_string(picks(rr, two, 4)) == "0101");
  CHECK(as_string(picks(rr, three, 7)) == "0010200");
}

TEST_CASE("leastconn: nothing to pick") {
  LeastConnections lc;
  CHECK_FALSE(lc.pick({}).has_value());
  std::vector<Candidate> c = {{1, 0, false}, {0, 0, true}};
  CHECK_FALSE(lc.pick(c).has_value());
}

TEST_CASE("leastconn: fewest connections wins with equal weights") {
  LeastConnections lc;
  std::vector<Candidate> c = {{1, 5, true}, {1, 2, true}, {1, 7, true}};
  for (int i = 0; i < 5; ++i) CHECK(lc.pick(c) == 1u);
  c[1].active = 9;
  CHECK(lc.pick(c) == 0u);
}

TEST_CASE("leastconn: weights scale the connection count") {
  LeastConnections lc;
  // (active + 1) / weight: 9/10 < 1/1.
  std::vector<Candidate> c = {{10, 8, true}, {1, 0, true}};
  CHECK(lc.pick(c) == 0u);
  // 11/10 > 1/1.
  c[0].active = 10;
  CHECK(lc.pick(c) == 1u);
  // 3/3 vs 2/2 vs 5/4: the first two tie below the third.
  std::vector<Candidate> d = {{3, 2, true}, {2, 1, true}, {4, 4, true}};
  for (int i = 0; i < 6; ++i) {
    auto p = lc.pick(d);
    REQUIRE(p.has_value());
    CHECK(*p != 2u);
  }
  // Large counts and weights do not overflow the comparison.
  std::vector<Candidate> e = {{256, UINT32_MAX - 1, true}, {1, (1u << 24) + 1, true}};
  CHECK(lc.pick(e) == 0u);
  e[1].active = (1u << 24) - 2;
  CHECK(lc.pick(e) == 1u);
}

TEST_CASE("leastconn: ties go round-robin") {
  LeastConnections lc;
  std::vector<Candidate> c = with_weights({1, 1, 1});
  std::string seq;
  for (int i = 0; i < 9; ++i) seq += char('0' + *lc.pick(c));
  CHECK(seq == "012012012");
}

TEST_CASE("leastconn: tie rotation skips servers that do not tie") {
  LeastConnections lc;
  std::vector<Candidate> c = {{1, 0, true}, {1, 0, false}, {1, 3, true}, {1, 0, true}, {0, 0, true}};
  std::string seq;
  for (int i = 0; i < 8; ++i) seq += char('0' + *lc.pick(c));
  CHECK(seq == "03030303");
}

TEST_CASE("leastconn: weighted ties rotate too") {
  LeastConnections lc;
  // 3/3 == 1/1.
  std::vector<Candidate> c = {{3, 2, true}, {1, 0, true}};
  CHECK(lc.pick(c) == 0u);
  CHECK(lc.pick(c) == 1u);
  CHECK(lc.pick(c) == 0u);
}

TEST_CASE("leastconn: a filling pool spreads in proportion to weight") {
  struct Case {
    std::vector<uint32_t> weights;
    std::string first;  // the first picks, counting each pick as a new connection
  };
  const std::vector<Case> cases = {
      {{1, 1, 1}, "012012"}, {{3, 1}, "00100010001"}, {{5, 2, 1}, ""}, {{1, 2, 4, 8}, ""}, {{256, 1, 7}, ""},
  };
  for (const auto& tc : cases) {
    auto c = with_weights(tc.weights);
    const uint64_t W = total_weight(c);
    LeastConnections lc;
    std::string seq;
    for (uint64_t i = 0; i < W * 100; ++i) {
      auto p = lc.pick(c);
      REQUIRE(p.has_value());
      ++c[*p].active;
      if (seq.size() < tc.first.size()) seq += char('0' + *p);
    }
    CHECK(seq == tc.first);
    for (size_t s = 0; s < c.size(); ++s) {
      CAPTURE(s);
      CHECK(c[s].active == tc.weights[s] * 100);
    }
  }
}

TEST_CASE("leastconn: a released connection is taken again by its server") {
  LeastConnections lc;
  std::vector<Candidate> c = with_weights({1, 1, 1});
  for (auto& x : c) x.active = 10;
  c[2].active = 9;  // one session just ended there
  CHECK(lc.pick(c) == 2u);
  c[2].active = 10;
  c[0].active = 9;
  CHECK(lc.pick(c) == 0u);
}

TEST_CASE("balancer: slow start ramps the effective weight") {
  using smtplb::effective_weight;
  using smtplb::kWeightScale;
  // No ramp configured or none in progress: full weight.
  CHECK(effective_weight(10, 0, 0) == 10 * kWeightScale);
  CHECK(effective_weight(10, -1, 30'000) == 10 * kWeightScale);
  CHECK(effective_weight(0, 5'000, 30'000) == 0);
  // Linear from near 0 to full.
  CHECK(effective_weight(10, 0, 30'000) == 1);
  CHECK(effective_weight(10, 15'000, 30'000) == 5 * kWeightScale);
  CHECK(effective_weight(10, 29'999, 30'000) == 10 * kWeightScale * 29'999 / 30'000);
  CHECK(effective_weight(10, 30'000, 30'000) == 10 * kWeightScale);
  CHECK(effective_weight(10, 90'000, 30'000) == 10 * kWeightScale);
  // Monotonic, and a weight-1 server still ramps in many steps.
  uint32_t prev = 0;
  std::set<uint32_t> steps;
  for (int64_t t = 0; t <= 10'000; t += 100) {
    uint32_t w = effective_weight(1, t, 10'000);
    CHECK(w >= prev);
    CHECK(w >= 1);
    prev = w;
    steps.insert(w);
  }
  CHECK(steps.size() >= 50);
}

TEST_CASE("balancer: a ramping server gets a share in proportion to its effective weight") {
  smtplb::SmoothRoundRobin rr;
  // Server 1 halfway through its ramp: half the weight of server 0.
  std::vector<smtplb::Candidate> c = {{smtplb::effective_weight(2, 0, 0), 0, true},
                                      {smtplb::effective_weight(2, 5'000, 10'000), 0, true}};
  int count[2] = {0, 0};
  for (int i = 0; i < 300; ++i) ++count[*rr.pick(c)];
  CHECK(count[0] == 200);
  CHECK(count[1] == 100);
}
