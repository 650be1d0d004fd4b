#include "smtplb/lb/source_hash.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace smtplb {

namespace {

// Bucket b's contribution to its pairs' u, computed once for the process.
const std::vector<uint32_t>& bucket_hashes() {
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> h(SourceTable::kBuckets);
    for (uint32_t b = 0; b < SourceTable::kBuckets; ++b)
      h[b] = uint32_t(mix64(uint64_t(b) * 0x9e3779b97f4a7c15ull + 1) >> 32);
    return h;
  }();
  return table;
}

// The pair's pseudo-random number: MurmurHash3's 32-bit finalizer of the server's seed and
// the bucket's hash; never 0 (the build's thresholds rely on it). 32 bits, so the build
// can compute eight at a time.
inline uint32_t pair_u(uint32_t seed, uint32_t bucket_hash) {
  uint32_t x = seed ^ bucket_hash;
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x | 1;
}

// -weight / ln(u) with u mapped to (0,1): the weighted rendezvous score.
inline double score_of(uint64_t u, uint32_t weight) {
  const double x = (double(u) + 0.5) * 0x1p-32;
  return -double(weight) / std::log(x);
}

// Calls hit(b, u) for every bucket b whose pair u with `seed` exceeds thr[b]. hit may
// raise thr[b] (only b's own entry).
template <class Hit>
inline void scan_scalar(uint32_t seed, const uint32_t* bh, const uint32_t* thr, uint32_t from, Hit&& hit) {
  for (uint32_t b = from; b < SourceTable::kBuckets; ++b) {
    const uint32_t u = pair_u(seed, bh[b]);
    if (u > thr[b]) hit(b, u);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same numbers as pair_u, eight buckets at a time (AVX2, when the CPU has it).
template <class Hit>
__attribute__((target("avx2"))) void scan_avx2(uint32_t seed, const uint32_t* bh, const uint32_t* thr, Hit& hit) {
  const __m256i vseed = _mm256_set1_epi32(int(seed));
  const __m256i c1 = _mm256_set1_epi32(int(0x85ebca6bu)), c2 = _mm256_set1_epi32(int(0xc2b2ae35u));
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(int(0x80000000u));
  constexpr uint32_t kVec = SourceTable::kBuckets / 8 * 8;
  alignas(32) uint32_t lane[8];
  for (uint32_t b = 0; b < kVec; b += 8) {
    __m256i x = _mm256_xor_si256(vseed, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bh + b)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, c1);
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
    x = _mm256_mullo_epi32(x, c2);
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_or_si256(x, one);
    // Unsigned u > thr as a signed compare of both shifted by 2^31.
    const __m256i t = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(thr + b));
    const __m256i gt = _mm256_cmpgt_epi32(_mm256_xor_si256(x, bias), _mm256_xor_si256(t, bias));
    unsigned mask = unsigned(_mm256_movemask_ps(_mm256_castsi256_ps(gt)));
    if (!mask) continue;
    _mm256_store_si256(reinterpret_cast<__m256i*>(lane), x);
    while (mask) {
      const unsigned j = unsigned(__builtin_ctz(mask));
      mask &= mask - 1;
      hit(b + j, lane[j]);
    }
  }
  scan_scalar(seed, bh, thr, kVec, hit);
}

// The same again, sixteen buckets at a time (AVX-512F, which also compares unsigned).
// GCC 12 warns inside its own avx512fintrin.h (the shifts start from an undefined
// vector on purpose): not ours to fix.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <class Hit>
__attribute__((target("avx512f"))) void scan_avx512(uint32_t seed, const uint32_t* bh, const uint32_t* thr, Hit& hit) {
  const __m512i vseed = _mm512_set1_epi32(int(seed));
  const __m512i c1 = _mm512_set1_epi32(int(0x85ebca6bu)), c2 = _mm512_set1_epi32(int(0xc2b2ae35u));
  const __m512i one = _mm512_set1_epi32(1);
  constexpr uint32_t kVec = SourceTable::kBuckets / 16 * 16;
  alignas(64) uint32_t lane[16];
  for (uint32_t b = 0; b < kVec; b += 16) {
    __m512i x = _mm512_xor_si512(vseed, _mm512_loadu_si512(bh + b));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, c1);
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
    x = _mm512_mullo_epi32(x, c2);
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_or_si512(x, one);
    unsigned mask = _mm512_cmpgt_epu32_mask(x, _mm512_loadu_si512(thr + b));
    if (!mask) continue;
    _mm512_store_si512(lane, x);
    while (mask) {
      const unsigned j = unsigned(__builtin_ctz(mask));
      mask &= mask - 1;
      hit(b + j, lane[j]);
    }
  }
  scan_scalar(seed, bh, thr, kVec, hit);
}
#pragma GCC diagnostic pop
#endif

std::atomic<SourceTable::Scan> scan_choice{SourceTable::Scan::best};

template <class Hit>
void scan(uint32_t seed, const uint32_t* bh, const uint32_t* thr, Hit&& hit) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2");
  const SourceTable::Scan choice = scan_choice.load(std::memory_order_relaxed);
  if (avx512 && choice == SourceTable::Scan::best) return scan_avx512(seed, bh, thr, hit);
  if (avx2 && choice != SourceTable::Scan::scalar) return scan_avx2(seed, bh, thr, hit);
#endif
  scan_scalar(seed, bh, thr, 0, hit);
}

// The one order of preferences, used by the table build and by rank() alike. Among equal
// weights u decides directly (no logarithm needed while building); a tie goes to the
// name that sorts first.
inline bool better(const SourceTable::Ranked& a, const SourceTable::Ranked& b) {
  if (a.weight == b.weight) return a.u != b.u ? a.u > b.u : a.member < b.member;
  return a.score != b.score ? a.score > b.score : a.member < b.member;
}

}  // namespace

uint64_t stable_hash64(std::string_view bytes, uint64_t seed) {
  uint64_t h = mix64(seed ^ 0x243f6a8885a308d3ull ^ uint64_t(bytes.size()));
  size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    uint64_t w = 0;
    for (size_t k = 0; k < 8; ++k) w |= uint64_t(static_cast<unsigned char>(bytes[i + k])) << (8 * k);
    h = mix64(h ^ w) + 0x9e3779b97f4a7c15ull;
  }
  uint64_t w = 0;
  for (size_t k = 0; i + k < bytes.size(); ++k) w |= uint64_t(static_cast<unsigned char>(bytes[i + k])) << (8 * k);
  return mix64(h ^ w ^ 0x9e3779b97f4a7c15ull);
}

void SourceTable::set_scan_for_tests(Scan s) {
  scan_choice.store(s, std::memory_order_relaxed);
}

SourceTable::SourceTable(std::span<const SourceMember> members) {
  std::vector<uint32_t> order(members.size());
  std::iota(order.begin(), order.end(), 0u);
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return members[a].name < members[b].name; });
  for (uint32_t i : order) {
    const SourceMember& m = members[i];
    if (m.weight == 0) continue;
    Tier& t = m.backup ? backup_ : regular_;
    t.members.push_back(i);
    t.seeds.push_back(uint32_t(stable_hash64(m.name)));
    t.weights.push_back(m.weight);
    ++size_;
  }
  build(regular_);
  build(backup_);
}

void SourceTable::build(Tier& t) {
  const size_t n = t.members.size(), depth = t.depth();
  if (n == 0) return;
  const std::vector<uint32_t>& bh = bucket_hashes();
  constexpr uint32_t B = kBuckets;
  // Servers of one weight rank by u alone, so the build runs weight group by weight group:
  // the pass over a group keeps each bucket's best few u (integer compares), and only
  // those get a logarithm when they are merged into the bucket's best so far.
  // Heaviest first: their scores are the highest, so later groups meet a tighter bound.
  std::map<uint32_t, std::vector<uint32_t>, std::greater<>> groups;  // weight -> members, in name order
  for (uint32_t m = 0; m < n; ++m) groups[t.weights[m]].push_back(m);

  const bool one_group = groups.size() == 1;
  std::vector<Ranked> best(one_group ? 0 : size_t(B) * depth);
  std::vector<uint8_t> best_n(B, 0);
  // A bucket's list in the group pass: one half cache line.
  struct Local {
    uint32_t u[kDepth];
    uint32_t m[kDepth];
  };
  std::vector<Local> local(B);
  std::vector<uint8_t> local_n(B);
  // A pair enters the bucket's group list only when u > thr[b]: when it could still beat
  // the bucket's last kept preference (from earlier groups) and the group's own last.
  std::vector<uint32_t> thr(B);

  std::vector<uint32_t> floor(B);  // per bucket: the bound from earlier groups alone
  // A prefilter: a pair is a candidate only when -ln(u) < kExpected * weight / W (W: the
  // tier's total weight), which about kExpected servers per bucket pass in all, whatever
  // the weights; the others would be dropped later anyway, each after a mispredicted
  // branch. A pair it drops scores at most `dropped_max`; a bucket whose 4th preference
  // does not score above that is ranked again exactly at the end (about 2 in 1000).
  constexpr double kExpected = 12;
  double total_weight = 0;
  for (uint32_t w : t.weights) total_weight += w;
  double dropped_max = 0;
  uint32_t q = 0;
  for (const auto& [weight, ms] : groups) {
    q = uint32_t(std::min(std::exp(-kExpected * weight / total_weight) * 0x1p32, 0x1p32 - 1));
    dropped_max = std::max(dropped_max, score_of(q, weight));
    for (uint32_t b = 0; b < B; ++b) {
      local_n[b] = 0;
      floor[b] = 0;
      if (best_n[b] == depth) {
        // score(u) >= T  <=>  u/2^32 >= exp(-weight / T); two units of margin for
        // rounding, the merge below compares exactly.
        const double t32 = std::exp(-double(weight) / best[size_t(b) * depth + depth - 1].score) * 0x1p32;
        if (t32 >= 3) floor[b] = uint32_t(t32) - 2;
      }
      thr[b] = std::max(floor[b], q);
    }
    Local* const lists = local.data();
    uint8_t* const counts = local_n.data();
    uint32_t* const bounds = thr.data();
    for (uint32_t m : ms) {
      // Insert in descending order; members come in name order, so an equal u stays
      // behind the one already there.
      auto insert = [lists, counts, bounds, depth, m](uint32_t b, uint32_t u) {
        Local& l = lists[b];
        size_t j = counts[b] < depth ? counts[b]++ : depth - 1;
        while (j > 0 && l.u[j - 1] < u) {
          l.u[j] = l.u[j - 1];
          l.m[j] = l.m[j - 1];
          --j;
        }
        l.u[j] = u;
        l.m[j] = m;
        if (counts[b] == depth) bounds[b] = std::max(bounds[b], l.u[depth - 1]);
      };
      scan(t.seeds[m], bh.data(), bounds, insert);
    }
    if (one_group) break;  // u orders the servers exactly as the scores do
    for (uint32_t b = 0; b < B; ++b) {
      Ranked* row = &best[size_t(b) * depth];
      for (size_t k = 0; k < local_n[b]; ++k) {
        const uint32_t u = local[b].u[k];
        const Ranked r{score_of(u, weight), u, weight, local[b].m[k]};
        size_t j = best_n[b] < depth ? best_n[b]++ : depth;
        // The rest of this list has smaller u, so smaller scores: none of them gets in.
        if (j == depth && !better(r, row[depth - 1])) break;
        if (j == depth) j = depth - 1;
        while (j > 0 && better(r, row[j - 1])) {
          row[j] = row[j - 1];
          --j;
        }
        row[j] = r;
      }
    }
  }
  t.prefs.resize(size_t(B) * depth);
  std::vector<Ranked> all;
  for (uint32_t b = 0; b < B; ++b) {
    uint32_t* row = &t.prefs[size_t(b) * depth];
    const bool complete = one_group ? local_n[b] == depth && local[b].u[depth - 1] > q
                                    : best_n[b] == depth && best[size_t(b) * depth + depth - 1].score > dropped_max;
    if (complete) {
      for (size_t k = 0; k < depth; ++k)
        row[k] = t.members[one_group ? local[b].m[k] : best[size_t(b) * depth + k].member];
      continue;
    }
    // The prefilter may have dropped one of its first preferences: rank it exactly.
    all.clear();
    for (uint32_t m = 0; m < n; ++m) {
      const uint32_t u = pair_u(t.seeds[m], bh[b]);
      all.push_back({score_of(u, t.weights[m]), u, t.weights[m], m});
    }
    std::partial_sort(all.begin(), all.begin() + long(depth), all.end(), better);
    for (size_t k = 0; k < depth; ++k) row[k] = t.members[all[k].member];
  }
}

void SourceTable::rank(uint32_t bucket, bool backup, std::vector<Ranked>& scratch, std::vector<uint32_t>& out) const {
  const Tier& t = backup ? backup_ : regular_;
  const uint32_t bh = bucket_hashes()[bucket % kBuckets];
  scratch.clear();
  for (uint32_t m = 0; m < t.members.size(); ++m) {
    const uint32_t u = pair_u(t.seeds[m], bh);
    scratch.push_back({score_of(u, t.weights[m]), u, t.weights[m], m});
  }
  std::sort(scratch.begin(), scratch.end(), better);
  out.clear();
  for (const Ranked& r : scratch) out.push_back(t.members[r.member]);
}

}  // namespace smtplb
