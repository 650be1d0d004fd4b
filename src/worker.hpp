#pragma once
// A data-path thread: its own uv loop, its own SO_REUSEPORT listening sockets and the
// sessions they accept. Shares nothing with other workers but atomics in the runtime
// structs and the rare messages below.
#include <uv.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "server_pool.hpp"
#include "smtplb/balancer.hpp"

namespace smtplb {

class Session;

// A server that failed `fall` session attempts in a row, reported to the control loop.
struct PassiveDown {
  std::shared_ptr<ServerRuntime> server;
  std::string reason;  // the last failure
};

// What workers share with the control loop: process-wide counts and the channel for
// passive ejections (rare, so a mutex is fine).
struct ControlLink {
  std::atomic<uint32_t> connections{0};  // client sessions, whole process
  std::mutex mu;
  std::vector<PassiveDown> passive;      // guarded by mu
  uv_async_t* wake = nullptr;            // the control loop's; set before workers start

  void report(PassiveDown event);
};

class Worker {
 public:
  Worker(unsigned index, std::shared_ptr<const Snapshot> snapshot, ControlLink& link);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Adopts this worker's share of the listening sockets (one per listener).
  bool open_listeners(std::string& error);
  // All workers, so a slot freed here can wake sessions queued elsewhere.
  void set_peers(std::vector<Worker*> peers) { peers_ = std::move(peers); }
  void start();
  // Asks the loop to end all sessions and exit; join() waits for it.
  void request_stop();
  void join();
  // From any thread: capacity may have appeared (a server came up); retry queued sessions.
  void kick();

  uv_loop_t* loop() { return &loop_; }
  ControlLink& link() { return link_; }
  bool access_log() const { return access_log_; }

  struct Pick {
    std::optional<size_t> index;  // chosen server (its slot is already taken)
    bool all_full = false;        // usable servers exist but all are at max_connections
  };
  // Picks a usable server of pool `pool`, preferring ones not in `exclude` and using
  // backup servers only when no other server is usable, and takes a slot on it.
  Pick pick(const Snapshot& snap, size_t pool, std::span<const uint32_t> exclude);

  // Queue of sessions waiting for a free slot in a pool, first come first served.
  void enqueue(Session* s, size_t pool);
  void dequeue(Session* s, size_t pool);
  // A session released a slot of a server with max_connections in pool `pool`.
  void slot_freed(size_t pool);

  // A session attempt on `server` failed; `fall` in a row eject it (via the control loop).
  void report_failure(const std::shared_ptr<ServerRuntime>& server, unsigned fall, const std::string& reason);

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
  struct Queue {
    Session* head = nullptr;
    Session* tail = nullptr;
  };

  void run();
  void on_wake();
  void stop_now();
  void serve_queue(size_t pool);
  void on_connection(Listener& l, int status);

  unsigned index_;
  ControlLink& link_;
  uv_loop_t loop_{};
  uv_async_t wake_{};
  std::thread thread_;
  bool thread_started_ = false;
  std::atomic<bool> stop_requested_{false};
  std::atomic<bool> kicked_{false};
  std::shared_ptr<const Snapshot> snapshot_;
  bool access_log_ = true;
  std::vector<Worker*> peers_;
  std::vector<std::unique_ptr<Listener>> listeners_;
  std::vector<PoolBalancer> balancers_;   // parallel to snapshot_->pools
  std::vector<Queue> queues_;             // parallel to snapshot_->pools
  std::vector<Candidate> candidates_;     // reused by pick()
  std::unique_ptr<char[]> scratch_;
  Session* sessions_ = nullptr;           // intrusive list of live sessions
};

}  // namespace smtplb
