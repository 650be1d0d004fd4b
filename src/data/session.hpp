#pragma once
// One client session on the data path: the session core's decisions
// (smtplb/session/session_core.hpp) wired to the worker's sockets, timer, balancing,
// queue, counters and logs. Nothing here decides what a client or server is answered.
#include <uv.h>

#include <cstdint>
#include <memory>
#include <string>

#include "data/relay.hpp"
#include "runtime/server_pool.hpp"
#include "smtplb/session/session_core.hpp"

namespace smtplb {

class Worker;

// A backend attempt. Retired through the worker (freed after the current event batch),
// so an event already collected for it finds `owner` cleared.
struct Upstream {
  Conn conn;
  std::shared_ptr<ServerRuntime> server;
};

class Session final : public SessionCore {
 public:
  Session(Worker& worker, std::shared_ptr<const Snapshot> snapshot, ListenerRuntime& listener);
  ~Session() override;

  // Called once the client socket is accepted; `peer` is the address accept4 reported.
  // Takes ownership of `fd`.
  // `pin`: the client's hold on its key in the client table (the worker applied the
  // address rules at accept), released when the session ends.
  void accept(int fd, const SocketAddress& peer, ClientTable::Entry* pin = nullptr);
  // Events of one of this session's sockets, from the worker's epoll set.
  void io(Conn& c, uint32_t events);
  // Ends the session from outside (immediate stop).
  void stop();
  // Graceful stop: a session not handed off yet gets 421 4.3.2; a relaying one goes on.
  void stop_gracefully();
  Session* next_ = nullptr;  // worker's intrusive list of sessions
  Session* prev_ = nullptr;

 private:
  struct Reader;  // relay::read_burst's sink
  static void on_timer(uv_timer_t* t);
  static void on_closed(uv_handle_t* h);
  uint64_t now() const;
  void read_from(Conn& c, uint32_t events);
  Conn* conn(Side side) { return side == Side::client ? &client_ : up_ ? &up_->conn : nullptr; }
  const PoolRuntime& pool() const { return snap_->pools[pool_index_]; }
  // The pool's server at `index`, if this snapshot has it.
  ServerRuntime* server_at(uint32_t index) const;
  void log_access();

  // ---- SessionCore's effects ----
  Selection pick(std::span<const uint32_t> tried) override;
  void enqueue() override;
  void dequeue() override;
  int connect(uint32_t server) override;
  void close_server() override;
  int send(Side to, std::string_view bytes, bool more) override;
  void shutdown(Side to) override;
  void read(Side from, bool on, bool look) override;
  void delay_acks(Side side) override;
  void arm_timer(uint64_t ms) override;
  SocketAddress local_address() override;
  void refresh() override;
  Admission admit() override;
  std::string_view hostname() const override;
  void attempt_failed(uint32_t server, ConnError kind, const std::string& why, bool count) override;
  void handed_off(uint32_t server) override;
  void refused(TermCode term) override;
  void proxy_refused(const std::string& why) override;
  void finished() override;

  Worker& worker_;
  std::shared_ptr<const Snapshot> snap_;
  const ListenerRuntime* listener_;
  size_t pool_index_;

  Conn client_{};
  uv_timer_t timer_{};
  Upstream* up_ = nullptr;
  ClientTable::Entry* pin_ = nullptr;  // held in snap_->clients while the session lives
  int pending_closes_ = 0;             // handles still closing; the last one deletes us
  bool counted_ = false;               // counted in listener/process connection totals
};

}  // namespace smtplb
