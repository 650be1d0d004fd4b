// Source affinity benchmark: how long the control loop takes to build a pool's table
// (the rebuild target is under 50 ms for 1000 servers) and what a choice costs on the
// data path: `lookup` is the key's hash, bucket and first preference; `pick` the choice
// a session makes as Worker::pick does (masking the address, the cached preferences'
// views, the first usable one; the full PoolBalancer::pick only when none is). Run by `scripts/bench.sh --affinity`.
//   source_hash_bench [SERVERS...]   (default: 5 50 1000)
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <string>
#include <vector>

#include "smtplb/edge/address.hpp"
#include "smtplb/lb/select.hpp"
#include "smtplb/lb/source_hash.hpp"

using namespace smtplb;
using Clock = std::chrono::steady_clock;

// CPU time of this thread: on a shared machine the wall clock also counts the time other
// processes had the core.
double thread_cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) * 1e3 + double(ts.tv_nsec) / 1e6;
}

int main(int argc, char** argv) {
  std::vector<size_t> sizes;
  for (int i = 1; i < argc; ++i) sizes.push_back(size_t(std::strtoul(argv[i], nullptr, 10)));
  if (sizes.empty()) sizes = {5, 50, 1000};
  std::printf("%8s %8s %12s %12s %12s %12s %12s %10s %10s\n", "servers", "weights", "build_min_ms", "build_med_ms",
              "build_max_ms", "first_ms", "cpu_med_ms", "lookup_ns", "pick_ns");
  for (size_t n : sizes) {
    for (bool weighted : {false, true}) {
      std::vector<SourceMember> members;
      for (size_t i = 0; i < n; ++i)
        members.push_back({"mx" + std::to_string(i) + ".example.net", weighted ? uint32_t(1 + i % 4) : 1u, false});
      std::vector<double> ms, cpu;
      SourceTable table;
      for (int r = 0; r < 7; ++r) {
        const auto t0 = Clock::now();
        const double c0 = thread_cpu_ms();
        table = SourceTable(members);
        cpu.push_back(thread_cpu_ms() - c0);
        ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      }
      // The row's first build: scratch memory of a size not built before is new to the
      // process and is faulted in (later builds reuse it).
      const double first = ms[0];
      std::sort(ms.begin(), ms.end());
      std::sort(cpu.begin(), cpu.end());
      // A lookup as the data path does it: hash the key, read the bucket's first preference.
      constexpr size_t kLookups = 10'000'000;
      uint64_t sink = 0, key = 0x0a000000;
      const auto t0 = Clock::now();
      for (size_t i = 0; i < kLookups; ++i) {
        key += 0x100;  // one /24 after the other
        const uint64_t h = mix64(key ^ 0x5bd1e995ull);
        sink += table.cached(SourceTable::bucket_of(h), false)[0];
      }
      const double ns = std::chrono::duration<double, std::nano>(Clock::now() - t0).count() / kLookups;
      // The choice as Worker::pick makes it.
      std::vector<ServerView> views;
      for (const auto& m : members) views.push_back({true, false, false, m.weight, -1, 0});
      PoolBalancer balancer;
      constexpr size_t kPicks = 1'000'000;
      const auto t1 = Clock::now();
      for (size_t i = 0; i < kPicks; ++i) {
        const Addr128 a{0, 0xffff00000000ull | uint64_t(0x0a000000 + i * 0x100 + 7)};
        const SourceChoice c{&table, SourceTable::bucket_of(source_key(a, 24, 64).hash), 0};
        if (const auto k = PoolBalancer::pick_source_cached(
                c, [&](size_t j) { return views[j]; }, {}, [](size_t) { return true; })) {
          sink += *k;
          continue;
        }
        const Selection sel = balancer.pick(
            Algorithm::source, views, {}, 0, [](size_t) { return true; }, &c);
        sink += *sel.index;
      }
      const double pick_ns = std::chrono::duration<double, std::nano>(Clock::now() - t1).count() / kPicks;
      std::printf("%8zu %8s %12.2f %12.2f %12.2f %12.2f %12.2f %10.1f %10.1f\n", n, weighted ? "1..4" : "equal",
                  ms.front(), ms[ms.size() / 2], ms.back(), first, cpu[cpu.size() / 2], ns, pick_ns);
      if (sink == 1) std::puts("");  // keeps the loop
    }
  }
  return 0;
}
