#pragma once
// A data-path thread: its own uv loop, its own SO_REUSEPORT listening sockets and the
// sessions they accept. Shares nothing with other workers but atomics in ServerRuntime.
#include <uv.h>

#include <atomic>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "server_pool.hpp"
#include "smtplb/balancer.hpp"

namespace smtplb {

class Session;
struct ProcessLimits;

class Worker {
 public:
  Worker(unsigned index, std::shared_ptr<const Snapshot> snapshot, ProcessLimits& limits);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Adopts this worker's share of the listening sockets (one per listener).
  bool open_listeners(std::string& error);
  void start();
  // Asks the loop to end all sessions and exit; join() waits for it.
  void request_stop();
  void join();

  uv_loop_t* loop() { return &loop_; }
  unsigned index() const { return index_; }
  ProcessLimits& limits() { return limits_; }
  bool access_log() const { return access_log_; }

  // Picks a server of pool `pool` that is usable and not in `exclude` (falls back to any
  // usable one when all were tried). Returns the index into the pool's servers.
  std::optional<size_t> pick(const Snapshot& snap, size_t pool, std::span<const uint32_t> exclude);

  // Read buffer shared by all sessions of this worker: data is forwarded straight from it
  // and copied out only when the receiver cannot take it at once.
  uv_buf_t scratch() { return uv_buf_init(scratch_.get(), kScratchSize); }

  void link(Session* s);
  void unlink(Session* s);

  static constexpr size_t kScratchSize = 64 * 1024;

 private:
  struct Listener {
    uv_tcp_t tcp;
    Worker* worker;
    std::shared_ptr<ListenerRuntime> runtime;
  };
  struct PoolBalancer {
    SmoothRoundRobin rr;
    LeastConnections lc;
  };

  void run();
  void on_wake();
  void stop_now();
  void on_connection(Listener& l, int status);

  unsigned index_;
  ProcessLimits& limits_;
  uv_loop_t loop_{};
  uv_async_t wake_{};
  std::thread thread_;
  bool thread_started_ = false;
  std::atomic<bool> stop_requested_{false};
  std::shared_ptr<const Snapshot> snapshot_;
  bool access_log_ = true;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::vector<PoolBalancer> balancers_;   // parallel to snapshot_->pools
  std::vector<Candidate> candidates_;      // reused by pick()
  std::unique_ptr<char[]> scratch_;
  Session* sessions_ = nullptr;            // intrusive list of live sessions
};

// Process-wide connection accounting (global.max_connections), shared by all workers.
struct ProcessLimits {
  std::atomic<uint32_t> connections{0};
};

}  // namespace smtplb
