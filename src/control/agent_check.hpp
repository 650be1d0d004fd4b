#pragma once
// Agent feedback (HAProxy's agent-check) for one server, on the control loop: every
// agent_interval, connect to the server's address at agent_port, read one line (up to
// its LF, the peer's close or agent_timeout), and hand the parsed reply to the owner.
// Nothing is written to the agent.
#include <uv.h>

#include <functional>
#include <memory>
#include <random>
#include <string>

#include "runtime/server_pool.hpp"
#include "smtplb/lb/agent_reply.hpp"

namespace smtplb {

class AgentChecker {
 public:
  // `ok`: the agent answered with a reply understood (`reply`, `line` as sent); otherwise
  // `error` says why (connect refused, timeout, a reply not understood).
  using OnResult = std::function<void(AgentChecker&, bool ok, const AgentReply& reply, const std::string& line,
                                      const std::string& error)>;

  AgentChecker(uv_loop_t* loop, std::shared_ptr<ServerRuntime> server, const HealthCheckConfig& cfg,
               OnResult on_result);
  ~AgentChecker();
  AgentChecker(const AgentChecker&) = delete;
  AgentChecker& operator=(const AgentChecker&) = delete;

  void start(uint64_t first_delay_ms);
  // Frees the checker once libuv has let go of its handles (see HealthChecker::dispose).
  static void dispose(std::unique_ptr<AgentChecker> checker);
  // New settings (a reload): from the next query on.
  void reconfigure(const HealthCheckConfig& cfg) { cfg_ = cfg; }

  ServerRuntime& server() { return *server_; }
  std::string target() const;  // "ADDR:PORT" of the agent
  bool failing = false;        // the last query failed (the owner logs once per streak)

 private:
  struct Probe {
    uv_tcp_t tcp{};
    uv_connect_t connect_req{};
    AgentChecker* owner = nullptr;
  };
  void stop();
  void begin();
  void finish(bool eof, std::string error);
  void schedule(uint64_t ms);
  void abort_query();

  uv_loop_t* loop_;
  std::shared_ptr<ServerRuntime> server_;
  HealthCheckConfig cfg_;
  OnResult on_result_;
  uv_timer_t timer_{};
  bool timer_closed_ = false;
  bool timer_gone_ = false;
  bool disposed_ = false;
  Probe* probe_ = nullptr;  // the query in progress
  std::string line_;
  char buf_[512];
  std::minstd_rand rng_;
};

}  // namespace smtplb
