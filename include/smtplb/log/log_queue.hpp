#pragma once
// The workers' side of logging: each worker collects its log lines (access lines above
// all) in a batch that it alone writes, and hands the batch once per event-loop turn to
// the log writer thread through a bounded single-producer/single-consumer ring. The
// worker takes no lock and makes no system call per line, and never waits for the
// writer: when the ring stays full, lines are dropped and counted. See docs/logging.md,
// "How lines are written".
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace smtplb {

// A bounded ring for exactly one producer thread and one consumer thread. The indices
// only grow (a 64-bit count cannot wrap in practice) and a slot is index % N. Each side
// writes its own index with release and reads the other's with acquire, so a slot's
// content is handed over whole.
//
// Both operations exchange rather than copy: try_push leaves in `item` what the
// consumer last left in that slot, and try_pop leaves its `item` in the slot for the
// producer to get back. Buffers therefore circulate between the two threads and keep
// their capacity, so a steady stream allocates nothing.
template <typename T, size_t N>
class SpscRing {
  static_assert(N > 0 && (N & (N - 1)) == 0, "N must be a power of two");

 public:
  // Producer only. False when full (`item` is then untouched).
  bool try_push(T& item) {
    const uint64_t w = write_.load(std::memory_order_relaxed);
    if (w - read_.load(std::memory_order_acquire) == N) return false;
    using std::swap;
    swap(slots_[w & (N - 1)], item);
    write_.store(w + 1, std::memory_order_release);
    return true;
  }
  // Consumer only. False when empty (`item` is then untouched).
  bool try_pop(T& item) {
    const uint64_t r = read_.load(std::memory_order_relaxed);
    if (r == write_.load(std::memory_order_acquire)) return false;
    using std::swap;
    swap(slots_[r & (N - 1)], item);
    read_.store(r + 1, std::memory_order_release);
    return true;
  }
  // Consumer only: nothing to pop (as far as this thread can see yet).
  bool empty() const { return read_.load(std::memory_order_relaxed) == write_.load(std::memory_order_acquire); }
  static constexpr size_t capacity() { return N; }

 private:
  // Apart, so the producer's and the consumer's stores do not fight over a cache line.
  alignas(64) std::atomic<uint64_t> write_{0};
  alignas(64) std::atomic<uint64_t> read_{0};
  alignas(64) std::array<T, N> slots_{};
};

// Log lines with their time and level, in one text buffer plus an index, so appending
// a line is a copy into memory that is reused batch after batch.
class LogBatch {
 public:
  struct Line {
    int64_t time_ns;  // system clock, since the epoch: when the line was logged
    uint32_t offset;  // into the text buffer
    uint32_t size;
    uint8_t level;  // spdlog::level::level_enum
  };

  void append(int64_t time_ns, uint8_t level, std::string_view text) {
    lines_.push_back({time_ns, uint32_t(text_.size()), uint32_t(text.size()), level});
    text_.append(text);
  }
  template <typename F>
  void for_each(F&& f) const {
    for (const Line& l : lines_) f(l.time_ns, l.level, std::string_view(text_).substr(l.offset, l.size));
  }
  size_t lines() const { return lines_.size(); }
  size_t bytes() const { return text_.size(); }
  bool empty() const { return lines_.empty(); }
  // Keeps the memory for the next batch, unless an unusual burst grew it past
  // `max_bytes` of text: that is given back.
  void clear(size_t max_bytes = SIZE_MAX) {
    if (text_.capacity() > max_bytes) {
      std::string().swap(text_);
      std::vector<Line>().swap(lines_);
    }
    text_.clear();
    lines_.clear();
  }

 private:
  std::string text_;
  std::vector<Line> lines_;
};

// One worker's log queue. The worker appends to its pending batch and publishes it;
// the writer takes published batches. Lines are dropped (and counted) only when the
// ring is full and the pending batch has reached kMaxPendingBytes.
class alignas(64) LogQueue {
 public:
  static constexpr size_t kSlots = 16;
  // A batch this large is handed over at once rather than at the end of the loop turn.
  static constexpr size_t kHandoffBytes = 32 * 1024;
  // While the ring is full the pending batch grows up to this (about 5000 access
  // lines), then further lines are dropped.
  static constexpr size_t kMaxPendingBytes = 1024 * 1024;

  // Producer (the worker thread).
  void append(int64_t time_ns, uint8_t level, std::string_view text) {
    if (pending_.bytes() + text.size() > kMaxPendingBytes && !publish()) {
      // Only this thread writes the counter: a relaxed load and store, no locked add.
      dropped_.store(dropped_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
      return;
    }
    pending_.append(time_ns, level, text);
    if (pending_.bytes() >= kHandoffBytes) publish();
  }
  // Hands the pending batch to the writer. True when nothing is left pending; false
  // when the ring is full and the batch stays here (the worker retries later).
  bool publish() {
    if (pending_.empty()) return true;
    if (!ring_.try_push(pending_)) return false;  // gets back an emptied batch from the writer
    ++handed_over_;
    return true;
  }
  bool pending() const { return !pending_.empty(); }
  // Batches handed over so far (by publish() or by append() past kHandoffBytes).
  uint64_t handed_over() const { return handed_over_; }

  // Consumer (the writer thread). `out` must be empty (cleared); it goes back to the
  // producer as a future batch.
  bool take(LogBatch& out) { return ring_.try_pop(out); }
  bool empty() const { return ring_.empty(); }

  // Any thread.
  uint64_t dropped() const { return dropped_.load(std::memory_order_relaxed); }

 private:
  SpscRing<LogBatch, kSlots> ring_;
  alignas(64) LogBatch pending_;  // the producer's alone, like handed_over_
  uint64_t handed_over_ = 0;
  std::atomic<uint64_t> dropped_{0};  // written by the producer only
};

}  // namespace smtplb
