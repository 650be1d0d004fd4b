#include "log/log_writer.hpp"

#include <pthread.h>

#include <linux/futex.h>
#include <spdlog/spdlog.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <ctime>

namespace smtplb {

namespace {
// A batch that grew past this in a burst gives its memory back once written.
constexpr size_t kKeepBytes = 4 * LogQueue::kHandoffBytes;
constexpr auto kDropReportInterval = std::chrono::seconds(1);
}  // namespace

LogWriter::LogWriter(unsigned queues) : count_(queues), queues_(new LogQueue[queues]) {
  thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "smtplb-log");
    run();
  });
}

LogWriter::~LogWriter() {
  stop();
}

uint64_t LogWriter::dropped() const {
  uint64_t total = 0;
  for (unsigned i = 0; i < count_; ++i) total += queues_[i].dropped();
  return total;
}

void LogWriter::stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  ring();
  if (thread_.joinable()) thread_.join();
}

void LogWriter::sync(std::chrono::milliseconds limit) {
  std::unique_lock<std::mutex> lock(mu_);
  if (stopping_) return;
  const uint64_t want = ++sync_requested_;
  ring();
  synced_.wait_for(lock, limit, [&] { return sync_done_ >= want || stopping_; });
}

void LogWriter::ring() {
  bell_.fetch_add(1, std::memory_order_release);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&bell_), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
}

void LogWriter::wait(uint32_t seen, std::chrono::milliseconds limit) {
  const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(limit).count();
  timespec ts{time_t(ns / 1000000000), long(ns % 1000000000)};
  // Returns at once when the bell rang since `seen` was read (the word differs).
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&bell_), FUTEX_WAIT_PRIVATE, seen, &ts, nullptr, 0);
}

bool LogWriter::all_empty() const {
  for (unsigned i = 0; i < count_; ++i)
    if (!queues_[i].empty()) return false;
  return true;
}

void LogWriter::run() {
  unsigned idle = 0;
  for (;;) {
    // Read before the checks below, so a ring after them cuts the wait short.
    const uint32_t seen = bell_.load(std::memory_order_acquire);
    uint64_t serving;
    {
      std::lock_guard<std::mutex> lock(mu_);
      serving = sync_requested_;
    }
    const size_t written = drain();
    report_drops(false);
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (serving != sync_done_) {
        sync_done_ = serving;
        synced_.notify_all();
      }
      if (stopping_) {
        lock.unlock();
        // The workers have ended: what they published last is in the queues now.
        while (drain() > 0) {
        }
        report_drops(true);
        lock.lock();
        sync_done_ = sync_requested_;
        synced_.notify_all();
        break;
      }
      if (sync_requested_ != sync_done_) continue;
    }
    // Lines keep coming: look again at once, letting the batches grow meanwhile.
    if (written > 0) {
      idle = 0;
      continue;
    }
    if (++idle < kParkAfter) {
      wait(seen, kPollInterval);
      continue;
    }
    // A read-modify-write, like nudge()'s: one of the two comes second and sees the
    // other (the batch, or the parked flag). Fences would do too, but ThreadSanitizer
    // cannot check them.
    parked_.exchange(true, std::memory_order_acq_rel);
    if (all_empty()) wait(seen, kParkedTimeout);
    parked_.store(false, std::memory_order_relaxed);
  }
  spdlog::default_logger_raw()->flush();
}

size_t LogWriter::drain() {
  spdlog::logger* logger = spdlog::default_logger_raw();
  size_t written = 0;
  for (unsigned i = 0; i < count_; ++i) {
    while (queues_[i].take(batch_)) {
      batch_.for_each([&](int64_t time_ns, uint8_t level, std::string_view text) {
        const spdlog::log_clock::time_point t{
            std::chrono::duration_cast<spdlog::log_clock::duration>(std::chrono::nanoseconds(time_ns))};
        logger->log(t, spdlog::source_loc{}, spdlog::level::level_enum(level), text);
      });
      written += batch_.lines();
      batch_.clear(kKeepBytes);
    }
  }
  return written;
}

void LogWriter::report_drops(bool now_or_never) {
  const uint64_t total = dropped();
  if (total == reported_dropped_) return;
  const auto now = std::chrono::steady_clock::now();
  if (!now_or_never && now - last_report_ < kDropReportInterval) return;
  spdlog::warn(
      "log: {} lines dropped since the last report, {} in all: the log destination does not keep up "
      "(smtplb_access_log_dropped_total)",
      total - reported_dropped_, total);
  reported_dropped_ = total;
  last_report_ = now;
}

}  // namespace smtplb
