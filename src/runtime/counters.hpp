#pragma once
// Counters for /metrics. Data-path counters live in one slot per worker: only that
// worker writes it (a relaxed load and store, never a locked read-modify-write), and a
// scrape sums the slots. Control-loop counters are plain relaxed atomics.
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "smtplb/log/term_code.hpp"
#include "smtplb/session/conn_error.hpp"

namespace smtplb {

inline constexpr size_t kMaxWorkers = 64;  // global.workers is capped at 64 by the config

// Adds to a counter that only the calling thread writes.
inline void bump(std::atomic<uint64_t>& c, uint64_t n = 1) {
  c.store(c.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
}

// Histogram bucket bounds in seconds.
inline constexpr std::array<double, 12> kLatencyBounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                          0.1,   0.25,   0.5,   1,    2.5,   10};
inline constexpr std::array<double, 12> kDurationBounds = {0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800};

struct Histogram {
  std::array<std::atomic<uint64_t>, 13> buckets{};  // one per bound, then +Inf
  std::atomic<uint64_t> sum_us{0};

  // Single writer per instance.
  void observe(const std::array<double, 12>& bounds, double seconds) {
    size_t i = 0;
    while (i < bounds.size() && seconds > bounds[i]) ++i;
    bump(buckets[i]);
    bump(sum_us, uint64_t(seconds * 1e6));
  }
};

struct alignas(64) ServerWorkerCounters {
  std::atomic<uint64_t> sessions{0};   // sessions handed off to this server
  std::atomic<uint64_t> bytes_in{0};   // from the server (relayed to clients)
  std::atomic<uint64_t> bytes_out{0};  // to the server
  std::array<std::atomic<uint64_t>, 4> errors{};
  Histogram connect;  // connect -> accepted greeting
};

struct alignas(64) ListenerWorkerCounters {
  std::atomic<uint64_t> connections{0};
  std::array<std::atomic<uint64_t>, kTermSlots> terms{};
  Histogram duration;  // whole session
};

}  // namespace smtplb
