#include <doctest/doctest.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "smtplb/log/log_queue.hpp"

using namespace smtplb;

TEST_CASE("SpscRing keeps order, wraps around and refuses when full") {
  SpscRing<int, 4> ring;
  int v = 0;
  CHECK_FALSE(ring.try_pop(v));
  // Several laps, so the slot index wraps while the counts keep growing.
  int next_in = 0, next_out = 0;
  for (int lap = 0; lap < 5; ++lap) {
    for (int i = 0; i < 3; ++i) {
      int item = next_in++;
      REQUIRE(ring.try_push(item));
    }
    for (int i = 0; i < 3; ++i) {
      REQUIRE(ring.try_pop(v));
      CHECK(v == next_out++);
    }
  }
  CHECK_FALSE(ring.try_pop(v));
  while (next_in - next_out < 4) {
    int item = next_in++;
    REQUIRE(ring.try_push(item));
  }
  int extra = 99;
  CHECK_FALSE(ring.try_push(extra));
  CHECK(extra == 99);
  while (ring.try_pop(v)) CHECK(v == next_out++);
  CHECK(next_out == next_in);
}

TEST_CASE("SpscRing hands buffers back and forth instead of copying") {
  SpscRing<std::string, 2> ring;
  std::string producer = "first";
  REQUIRE(ring.try_push(producer));
  CHECK(producer.empty());  // the slot's initial, empty value
  std::string consumer;
  consumer.reserve(1000);
  const char* spare = consumer.data();
  REQUIRE(ring.try_pop(consumer));
  CHECK(consumer == "first");
  // The consumer's spare buffer is what the producer gets back two pushes later (N = 2).
  std::string p2 = "second";
  REQUIRE(ring.try_push(p2));
  std::string p3 = "third";
  REQUIRE(ring.try_push(p3));
  CHECK(p3.capacity() >= 1000);
  CHECK(p3.data() == spare);
}

TEST_CASE("LogBatch keeps lines with their time and level") {
  LogBatch b;
  CHECK(b.empty());
  b.append(10, 2, "one");
  b.append(20, 3, "");
  b.append(30, 4, "three");
  CHECK(b.lines() == 3);
  CHECK(b.bytes() == 8);
  std::vector<std::string> seen;
  b.for_each([&](int64_t t, uint8_t level, std::string_view text) {
    seen.push_back(std::to_string(t) + "/" + std::to_string(level) + "/" + std::string(text));
  });
  CHECK(seen == std::vector<std::string>{"10/2/one", "20/3/", "30/4/three"});
  b.clear();
  CHECK(b.empty());
  CHECK(b.bytes() == 0);
}

TEST_CASE("LogQueue batches, hands over large batches early, and drops only when full") {
  LogQueue q;
  LogBatch out;
  const std::string line(200, 'x');
  q.append(1, 2, line);
  q.append(2, 2, line);
  CHECK(q.pending());
  CHECK_FALSE(q.take(out));  // nothing handed over before publish()
  CHECK(q.empty());
  CHECK(q.handed_over() == 0);
  REQUIRE(q.publish());
  CHECK_FALSE(q.pending());
  CHECK(q.handed_over() == 1);
  CHECK_FALSE(q.empty());
  REQUIRE(q.take(out));
  CHECK(q.empty());
  CHECK(out.lines() == 2);
  out.clear();

  // Past kHandoffBytes the batch goes at once, without waiting for publish().
  size_t n = 0;
  while (!q.take(out)) {
    q.append(int64_t(n), 2, line);
    ++n;
  }
  CHECK(out.lines() == n);
  CHECK(q.handed_over() == 2);  // by append() itself
  CHECK(out.bytes() >= LogQueue::kHandoffBytes);
  CHECK(out.bytes() < LogQueue::kHandoffBytes + line.size());
  out.clear();
  CHECK_FALSE(q.pending());

  // Nobody takes: the ring fills, then the pending batch grows to its limit, then lines
  // are dropped and counted.
  uint64_t appended = 0;
  while (q.dropped() == 0) {
    q.append(0, 2, line);
    ++appended;
  }
  for (int i = 0; i < 9; ++i) q.append(0, 2, line);
  CHECK(q.dropped() == 10);
  CHECK_FALSE(q.publish());
  CHECK(q.pending());
  // Everything not dropped comes out, in order, once the writer catches up.
  uint64_t taken = 0;
  for (;;) {
    while (q.take(out)) {
      taken += out.lines();
      out.clear();
    }
    if (!q.pending()) break;
    REQUIRE(q.publish());
  }
  CHECK(taken == appended - 1);
  CHECK(taken * line.size() >= LogQueue::kSlots * LogQueue::kHandoffBytes + LogQueue::kMaxPendingBytes - line.size());
}

// Two threads, as in the process: a worker appending and publishing, the writer taking.
// Run under TSan (-DSMTPLB_SANITIZE=thread) this checks the ring's memory ordering.
TEST_CASE("LogQueue: one producer and one consumer thread lose nothing and keep order") {
  LogQueue q;
  constexpr uint64_t kLines = 200000;
  std::thread producer([&] {
    char text[32];
    for (uint64_t i = 0; i < kLines; ++i) {
      const int len = std::snprintf(text, sizeof text, "line %llu", (unsigned long long)i);
      q.append(int64_t(i), 2, std::string_view(text, size_t(len)));
      if (i % 7 == 0) q.publish();  // a loop turn every few lines
    }
    while (!q.publish()) std::this_thread::yield();
  });
  uint64_t delivered = 0;
  int64_t last = -1;
  bool ordered = true;
  LogBatch out;
  while (delivered + q.dropped() < kLines) {
    if (!q.take(out)) {
      std::this_thread::yield();
      continue;
    }
    out.for_each([&](int64_t t, uint8_t, std::string_view text) {
      // Drops may leave gaps, but nothing comes twice or out of order.
      if (t <= last || text != "line " + std::to_string(t)) ordered = false;
      last = t;
    });
    delivered += out.lines();
    out.clear();
  }
  producer.join();
  while (q.take(out)) {
    delivered += out.lines();
    out.clear();
  }
  CHECK(ordered);
  CHECK(delivered + q.dropped() == kLines);
}
