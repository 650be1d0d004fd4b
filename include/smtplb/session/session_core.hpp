#pragma once
// The decisions of one client session, without a socket in sight: accept -> (PROXY
// header) -> pick a server -> connect -> greeting gate -> hand-off -> relay -> close.
//
// Events come in through the public methods, each with the loop time (the injected
// clock, in milliseconds); actions go out through the protected virtual effects, which
// the data path implements over sockets (src/data/session.cpp) and unit tests record
// (tests/unit/test_session_core.cpp). The core never reads the time, a socket or shared
// state by itself; the only things it asks its surroundings are the effects that return
// a result (pick, connect, send, the local address).
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "smtplb/config/config.hpp"
#include "smtplb/lb/select.hpp"
#include "smtplb/log/term_code.hpp"
#include "smtplb/session/conn_error.hpp"

namespace smtplb {

// The two sockets of a session.
enum class Side : uint8_t { client, server };

// Client bytes held before the server has greeted (a client that talks first is
// misbehaving; it gets paused rather than buffered without bound).
inline constexpr size_t kHoldLimit = 4096;
// Longest first greeting line accepted from a server.
inline constexpr size_t kGreetingLineLimit = 2048;
// After smtplb's own 421 and FIN, how long to wait for the client to close, so the reply
// is not destroyed by a reset from unread client bytes.
inline constexpr uint64_t kReplyLingerMs = 5000;
// After the server closed and its last bytes were sent on, how long the client may keep
// its side open.
inline constexpr uint64_t kFinLingerMs = 5000;
// An upstream balancer sends its PROXY header at once; one that does not within this
// time is misconfigured or hostile.
inline constexpr uint64_t kProxyHeaderTimeoutMs = 5000;

class SessionCore {
 public:
  enum class State : uint8_t {
    proxy_header,  // waiting for the PROXY header of an upstream balancer
    queued,        // every usable server is at max_connections: waiting for a slot
    connecting,    // TCP connect to a server in progress
    greeting,      // connected, waiting for the server's first line
    relaying,      // handed off: bytes flow both ways
    replying,      // smtplb itself answers (421) and closes
    closing,       // the session is over
  };

  // The address rules' answer for a client (admit()).
  enum class Admission : uint8_t { pass, deny_reply, deny_close, limit };

  // What send() reports besides an errno.
  static constexpr int kSent = 0;     // all of it went out
  static constexpr int kQueued = -1;  // kept until the receiver takes it (flushed() follows)

  // The session's own numbers, for its access line and counters.
  struct Stats {
    uint64_t t_accept = 0;  // loop time at accept
    int64_t tw = 0;         // total time queued
    int64_t tc = -1;        // connect time of the latest attempt
    int64_t tb = -1;        // connect -> accepted greeting
    uint64_t bytes_in = 0;  // from the client
    uint64_t bytes_out = 0;
  };

  SessionCore(const ListenerConfig& listener, const PoolConfig& pool);
  virtual ~SessionCore() = default;
  SessionCore(const SessionCore&) = delete;
  SessionCore& operator=(const SessionCore&) = delete;

  // ---- events ----
  // The client's connection is accepted from `peer` (its socket is read from the start).
  void start(uint64_t now, const SocketAddress& peer);
  // The connection from `peer` was accepted but cannot be served (`term`): it ends at once.
  void start_failed(uint64_t now, const SocketAddress& peer, TermCode term);
  // Bytes from one side. `eof_follows`: the sender has closed after them (the readiness
  // event said so); its end() follows. `data` need only live for the call.
  void client_data(uint64_t now, const char* data, size_t len, bool eof_follows);
  void server_data(uint64_t now, const char* data, size_t len, bool eof_follows);
  // One side closed (err 0) or failed (errno).
  void client_end(uint64_t now, int err);
  void server_end(uint64_t now, int err);
  // The connect() started by the connect effect completed (0) or failed (errno).
  void connected(uint64_t now, int err);
  // Everything queued for `to` has been written (after send() said kQueued).
  void flushed(uint64_t now, Side to);
  // Writing queued bytes to `to` failed with errno `err`.
  void write_failed(uint64_t now, Side to, int err);
  // The timer armed by arm_timer() went off.
  void timer(uint64_t now);
  // A queued session's turn: a slot may be free. False while it is still queued.
  bool slot_offered(uint64_t now);
  // Graceful stop: a session not handed off yet gets 421 4.3.2; a relaying one goes on.
  void drain(uint64_t now);
  // Ends the session at once (smtplb stops).
  void kill(uint64_t now);

  // The worker's queue of waiting sessions links them through these (while queued()).
  SessionCore* q_next_ = nullptr;
  SessionCore* q_prev_ = nullptr;

  // ---- what the owner reads ----
  State state() const { return state_; }
  bool closing() const { return state_ == State::closing; }
  bool queued() const { return in_queue_; }
  TermCode term() const { return term_; }
  const Stats& stats() const { return stats_; }
  // Servers attempted so far, in order (indexes into the pool's server list).
  std::span<const uint32_t> tried() const { return {tried_.data(), tries_}; }
  // Re-points the attempted servers at another list of the same pool (a newer snapshot):
  // `map(i)` gives the new index of old index i, or -1 when the server is gone (it stays
  // counted as a try, but excludes nothing).
  template <typename Map>
  void remap_tried(Map&& map);
  // A tried server that a newer snapshot no longer has.
  static constexpr uint32_t kGone = UINT32_MAX;
  // The server of the latest attempt (kGone possible); meaningful once tried() is not empty.
  uint32_t server() const { return tried_[tries_ ? tries_ - 1 : 0]; }
  bool was_handed_off() const { return handed_off_; }
  const SocketAddress& peer() const { return peer_; }
  // The reason of a 421 for the log line (built only when it is logged).
  std::string refusal_reason(TermCode term) const;

 protected:
  // Points the session at a newer configuration of its listener and pool.
  void rebind(const ListenerConfig& listener, const PoolConfig& pool) {
    listener_ = &listener;
    pool_ = &pool;
  }

  // ---- effects ----
  // Balancing: a usable server not in `tried`, its slot already taken.
  virtual Selection pick(std::span<const uint32_t> tried) = 0;
  // A queued session is about to look for a slot again: the owner may move it to a newer
  // configuration of the same pool first (rebind(), remap_tried()). Not called otherwise.
  virtual void refresh() {}
  // Joins the pool's queue of waiting sessions; may call slot_offered() at once.
  virtual void enqueue() = 0;
  virtual void dequeue() = 0;
  // Starts a non-blocking connect to `server`: 0, or the errno of a synchronous failure.
  virtual int connect(uint32_t server) = 0;
  // Closes the current backend attempt and gives its slot back.
  virtual void close_server() = 0;
  // kSent, kQueued or an errno. `more`: a FIN follows at once.
  virtual int send(Side to, std::string_view bytes, bool more) = 0;
  // Sends a FIN once everything queued for `to` is written.
  virtual void shutdown(Side to) = 0;
  // Reading one side on or off; `look`: look at the socket again (edge-triggered readiness
  // raised no new event for what arrived while reading was off).
  virtual void read(Side from, bool on, bool look) = 0;
  // Delayed-ACK mode for one side's socket (SMTP answers every read soon).
  virtual void delay_acks(Side side) = 0;
  virtual void arm_timer(uint64_t ms) = 0;
  // The address the client connected to, for an outbound PROXY header.
  virtual SocketAddress local_address() = 0;
  // This host's name, for smtplb's own replies.
  virtual std::string_view hostname() const = 0;
  // The listener's address rules (allow / deny, per-client limits) for the client peer()
  // names, once a PROXY header has said who it is. Asked only of listeners that have
  // some (ListenerConfig::address_features); the owner counts and logs a refusal.
  virtual Admission admit() { return Admission::pass; }
  // The attempt on `server` failed: count it and report it for passive ejection.
  virtual void attempt_failed(uint32_t server, ConnError kind, const std::string& why, bool count) = 0;
  // The session is handed to `server` (its greeting accepted).
  virtual void handed_off(uint32_t server) = 0;
  // smtplb answers this client 421 (`term` says why), or refuses its PROXY header.
  virtual void refused(TermCode term) = 0;
  virtual void proxy_refused(const std::string& why) = 0;
  // The session is over (term()); its backend attempt is closed already. Called once, last.
  virtual void finished() = 0;

 private:
  void proxy_header_data();
  void refuse_proxy(const std::string& why, TermCode term);
  void next_attempt();
  void connect_to(uint32_t index);
  void leave_queue();
  void fail_attempt(TermCode term, ConnError kind, const std::string& why);
  void abandon_server();
  void handoff(const char* data, size_t len);
  void reply_unavailable(TermCode term);
  // smtplb's own reply `text`, FIN, then close once the client closes (or after a linger).
  void reply_and_close(const std::string& text, TermCode term);
  bool forward(Side to, const char* data, size_t len, bool more = false);
  void send_failed(Side to, int err);
  void pause(Side from);
  void resume(Side from);
  void half_close(Side to);
  bool done_when_flushed() const;
  void maybe_done();
  void arm_idle_timer();
  void finish(TermCode term);
  void queue_timed_out();

  const ListenerConfig* listener_;
  const PoolConfig* pool_;
  uint64_t now_ = 0;  // the latest event's time

  State state_ = State::connecting;
  TermCode term_;  // what ends the session if nothing better happens
  bool in_queue_ = false;
  bool has_server_ = false;   // a backend attempt is open
  bool handed_off_ = false;   // relayed_ server is tried_[tries_-1]
  bool proxy_local_ = false;  // the inbound PROXY header carried no client address
  bool client_gone_ = false;  // the client left while a PROXY backend was connecting
  bool client_eof_ = false;
  bool server_eof_ = false;
  bool client_shut_ = false;  // FIN sent to the client
  bool server_shut_ = false;  // FIN sent to the server
  bool server_acks_delayed_ = false;
  bool client_reading_ = false;
  bool server_reading_ = false;
  bool client_blocked_ = false;  // bytes queued for the client
  bool server_blocked_ = false;
  bool client_turn_ = false;  // the latest bytes forwarded went to the client
  uint8_t tries_ = 0;
  // Server indexes attempted, in order (retries are capped at 16 by the config).
  std::array<uint32_t, 17> tried_{};

  std::string held_;          // client bytes received before the handoff
  std::string greeting_;      // partial first greeting line
  std::string last_failure_;  // why the latest backend attempt failed

  SocketAddress peer_;   // the client (from the PROXY header when there is one)
  SocketAddress local_;  // the address the client connected to
  Stats stats_;
  uint64_t t_attempt_ = 0;      // start of the current connect
  uint64_t t_queued_ = 0;       // when the session entered the queue
  uint64_t last_activity_ = 0;  // loop time of the latest bytes in either direction
};

template <typename Map>
void SessionCore::remap_tried(Map&& map) {
  for (uint8_t i = 0; i < tries_; ++i) {
    const long n = map(tried_[i]);
    tried_[i] = n >= 0 ? uint32_t(n) : kGone;
  }
}

}  // namespace smtplb
