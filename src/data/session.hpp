#pragma once
// One client session: accept -> pick a server -> connect -> greeting gate -> relay ->
// close. An explicit state machine; finish() is the one place a session ends, sets its
// termination code, updates counters and writes the access line.
#include <uv.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "runtime/server_pool.hpp"
#include "smtplb/log/access_log.hpp"

namespace smtplb {

class Worker;
class Session;

// Bytes a receiver could not take at once, in arrival order; allocated only under
// backpressure.
struct OutChunk {
  OutChunk* next;
  size_t off;
  size_t len;
  char data[1];
};

// One socket of a session (the client's, or one backend attempt's), registered once in
// its worker's edge-triggered epoll set and removed by close(). See Worker::dispatch.
struct Conn {
  int fd = -1;
  bool reading = false;       // events lead to reads; false while paused (backpressure,
                              // hold limit), before the connect completes, and after EOF
  bool shut_pending = false;  // shutdown(SHUT_WR) once the output queue is flushed
  Session* owner = nullptr;   // cleared when the session lets go of it
  OutChunk* out_head = nullptr;
  OutChunk* out_tail = nullptr;
  bool blocked() const { return out_head != nullptr; }
};

// A backend attempt. Retired through the worker (freed after the current event batch),
// so an event already collected for it finds `owner` cleared.
struct Upstream {
  Conn conn;
  std::shared_ptr<ServerRuntime> server;
};

class Session {
 public:
  Session(Worker& worker, std::shared_ptr<const Snapshot> snapshot, ListenerRuntime& listener);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Called once the client socket is accepted; `peer` is the address accept4 reported.
  // Takes ownership of `fd`.
  void start(int fd, const SocketAddress& peer);
  // Events of one of this session's sockets, from the worker's epoll set.
  void io(Conn& c, uint32_t events);
  // Ends the session from outside (immediate stop).
  void kill();
  // Graceful stop: a session not handed off yet gets 421 4.3.2; a relaying one goes on.
  void drain();
  // Called by the worker for the head of its queue; false while all servers are still full.
  bool retry_from_queue();

  Session* next_ = nullptr;  // worker's intrusive list of sessions
  Session* prev_ = nullptr;
  Session* q_next_ = nullptr;  // worker's queue for the pool, while queued
  Session* q_prev_ = nullptr;

 private:
  enum class State : uint8_t {
    proxy_header,  // waiting for the PROXY header of an upstream balancer
    queued,        // every usable server is at max_connections: waiting for a slot
    connecting,    // TCP connect to a server in progress
    greeting,      // connected, waiting for the server's first line
    relaying,      // handed off: bytes flow both ways
    replying,      // smtplb itself answers (421) and closes
    closing,       // handles are closing
  };
  static void on_timer(uv_timer_t* t);
  static void on_closed(uv_handle_t* h);

  // Reads what `c` has; `events` are the epoll flags that announced it.
  void read_from(Conn& c, uint32_t events);
  // Sends what is queued for `c`; once empty, resumes the other side.
  void flush(Conn& c);
  // `eof_follows`: the sender has already closed after these bytes (epoll said so).
  void client_data(const char* data, size_t len, bool eof_follows);
  void client_end(ssize_t status);
  void upstream_data(const char* data, size_t len, bool eof_follows);
  void upstream_end(ssize_t status);
  void connected(int status);
  void timer_fired();

  // Starts the next attempt, queues, or answers 421 when no server is left to try.
  void next_attempt();
  void connect_to(size_t index);
  void leave_queue();
  void release_server(const std::shared_ptr<ServerRuntime>& server);
  void attempt_failed(TermCode term, ConnError kind, const std::string& why);
  void abandon_upstream();
  // The server greeted with 220 (or handoff = connect): forward and start relaying.
  void handoff(const char* data, size_t len);
  // "421 4.3.2 ... try again later", FIN, then close once the client closes.
  void reply_unavailable(TermCode term);
  // Counts a 421 by reason and logs it, at most once a second per listener.
  void note_refusal(TermCode term);
  // PROXY header received from an upstream balancer.
  void proxy_header_data();
  // Closes a session whose PROXY header (or its sender) is not acceptable.
  void refuse_proxy(const std::string& why, TermCode term);

  // Sends to the other side; on a short write queues the rest and pauses the sender.
  // `more`: a FIN follows at once, so the kernel may send both in one segment.
  bool forward(bool to_client, const char* data, size_t len, bool more = false);
  // A send to one side failed with `err` (not EAGAIN).
  void write_failed(bool to_client, int err);
  void close_conn(Conn& c);
  void pause_client();
  void resume_client();
  void pause_upstream();
  void resume_upstream();
  void half_close(bool to_client);
  void maybe_done();
  // Both sides have closed and nothing is left to send: maybe_done() ends the session.
  bool done_when_flushed() const;
  void arm_timer(uint64_t ms);
  void arm_idle_timer();

  void finish(TermCode term);
  void closed_one();
  void log_access();

  Worker& worker_;
  std::shared_ptr<const Snapshot> snap_;
  ListenerRuntime& listener_;
  const PoolConfig& pool_;
  size_t pool_index_;

  Conn client_{};
  uv_timer_t timer_{};
  Upstream* up_ = nullptr;

  State state_ = State::connecting;
  TermCode term_;           // what ends the session if nothing better happens
  int pending_closes_ = 0;  // handles still closing; the last one deletes us
  bool counted_ = false;    // counted in listener/process connection totals
  bool in_queue_ = false;
  bool proxy_local_ = false;  // the inbound PROXY header carried no client address
  bool client_gone_ = false;  // the client left while a PROXY backend was connecting
  bool client_eof_ = false;
  bool upstream_eof_ = false;
  bool client_shut_ = false;            // FIN sent to the client
  bool upstream_shut_ = false;          // FIN sent to the server
  bool upstream_acks_delayed_ = false;  // TCP_QUICKACK 0 set on the server's socket

  std::string held_;          // client bytes received before the handoff
  std::string greeting_;      // partial first greeting line
  std::string last_failure_;  // why the latest backend attempt failed
  // Server indexes attempted, in order (retries are capped at 16 by the config).
  std::array<uint32_t, 17> tried_{};
  uint8_t tries_ = 0;

  SocketAddress peer_;                        // the client (from the PROXY header when there is one)
  SocketAddress local_;                       // the address the client connected to
  const std::string* server_name_ = nullptr;  // server of the latest attempt (owned by snap_)
  ServerRuntime* relayed_ = nullptr;          // server the session was handed to (owned by snap_)
  uint64_t t_accept_ = 0;                     // loop time (ms) at accept
  uint64_t t_attempt_ = 0;                    // start of the current connect
  uint64_t t_queued_ = 0;                     // when the session entered the queue
  int64_t tw_ = 0;                            // total time queued
  int64_t tc_ = -1;                           // connect time of the current attempt
  int64_t tb_ = -1;                           // connect -> accepted greeting
  uint64_t last_activity_ = 0;                // loop time of the latest bytes in either direction
  bool client_turn_ = false;                  // the latest bytes forwarded went to the client
  uint64_t bytes_in_ = 0;
  uint64_t bytes_out_ = 0;
};

}  // namespace smtplb
