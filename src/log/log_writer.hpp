#pragma once
// The log writer thread: takes the workers' batches of log lines (access lines above
// all) from their queues and writes them through the process logger with the time each
// line was logged at, so a worker never waits for the log destination or its lock.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "smtplb/log/log_queue.hpp"

namespace smtplb {

class LogWriter {
 public:
  // One queue per worker; the thread starts at once.
  explicit LogWriter(unsigned queues);
  ~LogWriter();
  LogWriter(const LogWriter&) = delete;
  LogWriter& operator=(const LogWriter&) = delete;

  LogQueue& queue(unsigned i) { return queues_[i]; }
  // Worker thread, after it handed a batch over: wakes the writer if it is parked. While
  // lines keep coming the writer polls and this is one atomic exchange; only the first
  // batch after a quiet spell costs a system call.
  void nudge() {
    // The mirror image of the writer's: either the writer sees the batch before it
    // parks, or this sees it parked. Both read-modify-write `parked_` (acquire and
    // release), so whichever comes second sees what the other did before it.
    if (parked_.exchange(false, std::memory_order_acq_rel)) ring();
  }
  // Lines dropped by all workers because their queue was full.
  uint64_t dropped() const;
  // Control thread: waits (at most `limit`) until every batch published before the call
  // is written, so a line logged next comes after them. The control loop calls it before
  // logging what a worker reported (a DOWN after the failures that caused it).
  void sync(std::chrono::milliseconds limit = std::chrono::milliseconds(1000));
  // Writes everything published so far, then ends the thread. Call it once the workers
  // have ended (they publish their last batch as they end). Idempotent.
  void stop();

  // How long the thread sleeps when it found nothing: the delay before a line appears.
  // Workers do not wake it while it polls, so their side costs no system call.
  static constexpr auto kPollInterval = std::chrono::milliseconds(10);
  // After this many empty polls (100 ms of silence) it parks until a worker nudges it,
  // so an idle process does not wake 100 times a second (docs/logging.md).
  static constexpr unsigned kParkAfter = 10;
  static constexpr auto kParkedTimeout = std::chrono::seconds(1);

 private:
  void run();
  void ring();                                                // wakes the thread from wait()
  void wait(uint32_t seen, std::chrono::milliseconds limit);  // unless the bell rang since `seen`
  bool all_empty() const;
  size_t drain();  // lines written
  // At most once a second, unless `now_or_never` (the last chance, at stop).
  void report_drops(bool now_or_never);

  unsigned count_;
  std::unique_ptr<LogQueue[]> queues_;
  LogBatch batch_;                 // the writer's spare, swapped with published ones
  uint64_t reported_dropped_ = 0;  // writer thread only
  std::chrono::steady_clock::time_point last_report_{};
  std::mutex mu_;  // the control thread and the writer only
  std::atomic<bool> parked_{false};
  std::atomic<uint32_t> bell_{0};   // a futex word: rung by nudge(), sync() and stop()
  std::condition_variable synced_;  // a sync() request was served
  bool stopping_ = false;           // guarded by mu_, like the two below
  uint64_t sync_requested_ = 0;
  uint64_t sync_done_ = 0;
  std::thread thread_;
};

}  // namespace smtplb
