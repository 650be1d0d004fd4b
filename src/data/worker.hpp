#pragma once
// A data-path thread: its own uv loop, its own SO_REUSEPORT listening sockets and the
// sessions they accept. Shares nothing with other workers but atomics in the runtime
// structs and the rare messages below.
#include <spdlog/spdlog.h>
#include <uv.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "log/log_writer.hpp"
#include "runtime/server_pool.hpp"
#include "smtplb/log/access_log.hpp"
#include "smtplb/log/log_queue.hpp"

namespace smtplb {

class Session;
class SessionCore;
struct Conn;
struct Upstream;
struct EdgeCheck;

// A server that failed `fall` session attempts in a row, reported to the control loop.
struct PassiveDown {
  std::shared_ptr<ServerRuntime> server;
  std::string reason;  // the last failure
};

// What workers share with the control loop: process-wide counts and the channel for
// rare events (passive ejections, a worker that finished). A mutex is fine for those.
struct ControlLink {
  std::atomic<uint32_t> connections{0};  // client sessions, whole process
  std::atomic<unsigned> running{0};      // workers whose loop has not ended yet
  std::mutex mu;
  std::vector<PassiveDown> passive;  // guarded by mu
  uv_async_t* wake = nullptr;        // the control loop's; set before workers start

  void report(PassiveDown event);
  void worker_done();
};

class Worker {
 public:
  // `log` writes this worker's log lines (through its queue `index`); it outlives the worker.
  Worker(unsigned index, std::shared_ptr<const Snapshot> snapshot, ControlLink& link, LogWriter& log);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Adopts this worker's share of the listening sockets (one per listener).
  bool open_listeners(std::string& error);
  // All workers, so a slot freed here can wake sessions queued elsewhere.
  void set_peers(std::vector<Worker*> peers) { peers_ = std::move(peers); }
  void start();
  void join();

  // From the control loop (any thread), applied between events:
  // a new configuration generation (sessions already open keep theirs);
  void publish(std::shared_ptr<const Snapshot> snapshot);
  // stop accepting, answer sessions not yet handed off 421, let relaying ones finish;
  // the loop ends with the last session;
  void request_drain();
  // end every session now;
  void request_stop();
  // capacity may have appeared (a server came up): retry queued sessions.
  void kick();

  uv_loop_t* loop() { return &loop_; }
  // Names of the listeners this worker accepts on, in adoption order.
  std::vector<std::string> listening() const;
  unsigned index() const { return index_; }
  // The newest snapshot this worker has applied.
  const std::shared_ptr<const Snapshot>& snapshot() const { return snapshot_; }
  ControlLink& link() { return link_; }
  bool access_log() const { return access_log_; }
  bool log_json() const { return log_json_; }
  bool draining() const { return draining_; }

  // Logging from the worker thread goes through its log queue, never straight to
  // spdlog (whose sinks lock and write): the line is formatted here, stamped with the
  // current time and written later by the log writer thread.
  static bool logs(spdlog::level::level_enum level) { return spdlog::default_logger_raw()->should_log(level); }
  template <typename... Args>
  void log(spdlog::level::level_enum level, spdlog::format_string_t<Args...> fmt, Args&&... args) {
    if (!logs(level)) return;
    spdlog::memory_buf_t buf;
    fmt::format_to(std::back_inserter(buf), fmt, std::forward<Args>(args)...);
    log_line(level, std::string_view(buf.data(), buf.size()));
  }
  // An already formatted line (the caller checked logs(level) before formatting it).
  void log_line(spdlog::level::level_enum level, std::string_view text) {
    const auto now = std::chrono::system_clock::now().time_since_epoch();
    log_.append(std::chrono::duration_cast<std::chrono::nanoseconds>(now).count(), uint8_t(level), text);
  }

  // Picks a usable server of `pool` for a session that already tried `exclude` and takes
  // a slot on it (the choice itself: smtplb/select.hpp). `client` is the client's real
  // address, the key of algorithm = "source" (null: none known, every such session
  // shares one key).
  Selection pick(const PoolRuntime& pool, std::span<const uint32_t> exclude, const SocketAddress* client = nullptr);

  // The worker's queue of sessions waiting for a free slot in a pool (in the pool's
  // per-worker slot), first come first served. enqueue() then looks once more: a slot
  // freed between the session's pick and its enqueue woke nobody.
  void enqueue(SessionCore* s, const std::shared_ptr<PoolState>& pool);
  void dequeue(SessionCore* s, PoolState& pool);
  // A session released a slot of a server with max_connections in `pool`.
  void slot_freed(PoolState& pool);

  // A session attempt on `server` failed; `fall` in a row eject it (via the control loop).
  void report_failure(const std::shared_ptr<ServerRuntime>& server, unsigned fall, const std::string& reason);

  // Read buffer shared by all sessions of this worker: data is forwarded straight from it
  // and copied out only when the receiver cannot take it at once.
  char* scratch() { return scratch_.get(); }

  // Session sockets live in one edge-triggered epoll set per worker, which the uv loop
  // polls as a single descriptor (see dispatch()). A socket is added once, never modified
  // on the common path, and leaves the set by close().
  bool watch(Conn& c);
  // Asks for an event even without a new edge (after a pause, or a capped read burst).
  void rearm(Conn& c);
  // Frees a backend attempt once no event of the current batch can refer to it.
  void retire(Upstream* up);

  void link(Session* s);
  void unlink(Session* s);

  // Logs a refusal (or a dry run's would-be refusal) by the address rules, at most once
  // a second per listener.
  void note_edge(const ListenerRuntime& lr, const SocketAddress& peer, const EdgeCheck& e);
  // Writes one access line (sessions and refusals alike).
  void log_access(const AccessRecord& r);

  static constexpr size_t kScratchSize = 64 * 1024;

 private:
  // smtplb accepts itself (uv_poll on the listening socket + accept4) rather than through
  // uv_listen, so that running out of descriptors pauses accepting and leaves waiting
  // clients in the kernel's backlog instead of closing them.
  struct Listener {
    uv_poll_t poll;
    uv_timer_t pause;  // resumes polling after a descriptor shortage, or re-checks the limits
    int fd = -1;
    // At global or listener max_connections smtplb stops accepting, and clients wait in
    // the backlog for a slot (see on_readable). `waiting_since`: loop time since which
    // clients may have waited there (0: the backlog was last seen empty). `refusing`:
    // they waited the pool's queue_timeout, so what is in the backlog now is accepted
    // and answered 421 where there is still no room, until the backlog is empty.
    uint64_t waiting_since = 0;
    bool refusing = false;
    int closing = 0;  // handles still closing
    Worker* worker;
    std::shared_ptr<ListenerRuntime> runtime;
  };
  void run();
  void on_wake();
  void apply(std::shared_ptr<const Snapshot> snapshot);
  bool add_listener(const std::shared_ptr<ListenerRuntime>& lr, std::string& error);
  void close_listener(Listener* l);
  void drain_now();
  void stop_now();
  void maybe_finish();
  void send_wake();
  void serve_queue(PoolState& pool);
  void serve_all_queues();
  void on_readable(Listener& l);
  // Polls the listening socket again (after a pause of either kind).
  void resume(Listener& l);
  // The listener or the process is at max_connections: stop accepting and re-check every
  // kLimitRecheckMs until a slot frees or the pool's queue_timeout has passed.
  void wait_for_room(Listener& l);
  bool at_limit(const ListenerRuntime& lr) const;
  // A client over global or listener max_connections: 421, FIN, and the socket kept only
  // for a short linger (so unread client bytes do not turn our close into a reset that
  // destroys the reply). Not a session: no Session object, not counted in the limits.
  // `text` is the reply (none: just close, no linger); `term` goes to the counters and
  // the access line. The caller counts the reason and logs it.
  void refuse(int fd, const SocketAddress& peer, ListenerRuntime& lr, const std::string& text, TermCode term);
  void close_expired_refusals(bool all);
  void close_oldest_refusal();
  void arm_linger_timer(uint64_t now);  // for the oldest lingering refusal
  void dispatch();
  void publish_log();

  unsigned index_;
  ControlLink& link_;
  LogWriter& log_writer_;
  LogQueue& log_;
  uint64_t log_nudged_ = 0;  // log_.handed_over() when the writer was last nudged
  // Hands the log batch over once per loop turn, just before the loop waits; neither
  // handle keeps the loop alive (run() hands over the last batch).
  uv_prepare_t log_turn_{};
  uv_timer_t log_retry_{};  // while the writer's ring is full
  bool log_handles_open_ = true;
  uv_loop_t loop_{};
  uv_async_t wake_{};
  std::mutex wake_mu_;  // guards wake_open_ against a concurrent close
  bool wake_open_ = true;
  std::thread thread_;
  bool thread_started_ = false;
  std::atomic<int> stop_mode_{0};  // 0 run, 1 drain, 2 stop now
  std::atomic<bool> kicked_{false};
  std::mutex pending_mu_;
  // Every published snapshot, applied in order: a listener added by one reload and kept
  // by the next must be adopted from the first (only it carries the sockets).
  std::vector<std::shared_ptr<const Snapshot>> pending_;  // guarded by pending_mu_
  std::shared_ptr<const Snapshot> snapshot_;
  bool access_log_ = true;
  bool log_json_ = false;
  bool draining_ = false;
  uint64_t last_accept_error_ms_ = 0;  // accept errors are logged once per burst
  std::vector<Worker*> peers_;
  std::vector<Listener*> listeners_;  // freed in their close callbacks
  // Pools in which this worker has queued sessions (kept alive while they wait).
  std::vector<std::shared_ptr<PoolState>> waiting_pools_;
  std::vector<ServerView> views_;  // reused by pick()
  std::unique_ptr<char[]> scratch_;
  int epfd_ = -1;        // the sessions' epoll set
  uv_poll_t ep_poll_{};  // the loop's watch on it
  bool ep_open_ = false;
  bool in_dispatch_ = false;
  std::vector<Upstream*> retired_;  // freed at the end of the batch
  Session* sessions_ = nullptr;     // intrusive list of live sessions
  // Refused clients waiting out their linger, oldest first (all lingers are equal).
  struct Lingering {
    int fd;
    uint64_t deadline;  // loop time (ms)
  };
  std::deque<Lingering> lingering_;
  uv_timer_t linger_timer_{};
  bool linger_timer_open_ = false;
};

}  // namespace smtplb
