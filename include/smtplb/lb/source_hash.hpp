#pragma once
// Source affinity: weighted rendezvous hashing (highest random weight) of a client key
// over a pool's servers, precomputed into a table for O(1) lookups.
//
// Every (server, bucket) pair gets a pseudo-random u in (0,1) from the server's name and
// the bucket number only; the server's score for that bucket is -weight / ln(u) (the
// weighted HRW score: each server wins a share of buckets proportional to its weight).
// A bucket's preference list is its servers sorted by score. So:
// - the mapping depends on names and weights only, never on the order of the servers or
//   on which process computes it (the hash is our own, stable across builds and hosts);
// - when a server leaves, only the buckets it was first in change their first choice, each
//   to its next preference; when it comes back, exactly those return (exact, unlike a
//   Maglev table, which moves some other keys too).
// A key hashes to one of kBuckets buckets; the table keeps each bucket's first kDepth
// preferences. Lookups read that row; a full ranking is computed only when all of them
// are unusable (SourceTable::rank).
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace smtplb {

// splitmix64's finalizer: a bijection that spreads every input bit over the output.
inline uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A 64-bit hash of bytes, the same on every build and host (std::hash is neither).
uint64_t stable_hash64(std::string_view bytes, uint64_t seed = 0);

struct SourceMember {
  std::string name;     // identity in the hash: unique in the pool
  uint32_t weight = 1;  // configured weight; 0 = never a preference
  bool backup = false;  // ranked only among the backup servers
};

class SourceTable {
 public:
  // 65537 is prime, so `hash % kBuckets` uses every bit of the key hash.
  static constexpr uint32_t kBuckets = 65537;
  static constexpr size_t kDepth = 4;

  SourceTable() = default;
  // Index i of a preference is members[i]; the order of `members` changes nothing else.
  explicit SourceTable(std::span<const SourceMember> members);

  static uint32_t bucket_of(uint64_t key_hash) { return uint32_t(key_hash % kBuckets); }

  // How the build computes its pairs: the widest vector unit the CPU has (AVX-512, AVX2)
  // or plain code. All give the same table; tests pin each one to compare them.
  enum class Scan { best, avx2, scalar };
  static void set_scan_for_tests(Scan s);

  // The first (up to kDepth) preferences of the bucket among the regular or backup
  // servers, best first.
  std::span<const uint32_t> cached(uint32_t bucket, bool backup) const {
    const Tier& t = backup ? backup_ : regular_;
    const size_t depth = t.depth();
    return {t.prefs.data() + size_t(bucket) * depth, depth};
  }
  // One server's standing in one bucket (exposed for rank()'s scratch space).
  struct Ranked {
    double score;
    uint64_t u;
    uint32_t weight;
    uint32_t member;  // rank of its name in the tier: the tie-break
  };
  // The whole preference list of the bucket in that tier, best first (its first entries
  // are cached()); `scratch` and `out` are reused space.
  void rank(uint32_t bucket, bool backup, std::vector<Ranked>& scratch, std::vector<uint32_t>& out) const;
  size_t size() const { return size_; }

 private:
  struct Tier {
    std::vector<uint32_t> members;  // pool indices, sorted by name (the tie-break rank)
    std::vector<uint32_t> seeds;    // per member: hash of its name
    std::vector<uint32_t> weights;  // per member
    std::vector<uint32_t> prefs;    // kBuckets rows of depth() pool indices
    size_t depth() const { return members.size() < kDepth ? members.size() : kDepth; }
  };
  static void build(Tier& t);

  Tier regular_, backup_;
  size_t size_ = 0;
};

}  // namespace smtplb
