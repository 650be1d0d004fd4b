#pragma once
// Active SMTP health check of one server, on the control loop: connect, read the whole
// greeting, EHLO, read the whole reply, [STARTTLS, 220, TLS handshake, EHLO again, whole
// reply,] QUIT, wait for 221. With implicit TLS (port 465) the handshake comes right after
// the connect (and the PROXY header), and the whole dialogue runs inside TLS. Never writes before the server finished
// its reply (postscreen's pregreet test), never pipelines.
#include <uv.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "control/tls.hpp"
#include "runtime/server_pool.hpp"
#include "smtplb/lb/check_failure.hpp"
#include "smtplb/lb/health_state.hpp"
#include "smtplb/proto/smtp_reply.hpp"

namespace smtplb {

struct CheckResult {
  bool ok = false;
  CheckFailure failure = CheckFailure::connect;  // what failed, when !ok
  std::string reason;                            // why, in words: e.g. "greeting 421 4.3.2 All server ports are busy"
  std::chrono::milliseconds duration{0};
  bool passive = false;  // from the data path (failed sessions), not from a check
};

class HealthChecker {
 public:
  // Called after each check whose result changed the server's health.
  using OnTransition = std::function<void(HealthChecker&, Health from, Health to, const CheckResult&)>;

  // `proxy`: the pool's proxy_protocol; checks send a header too (v2 LOCAL, or v1 with
  // the check connection's own addresses), as a PROXY-expecting Postfix requires.
  HealthChecker(uv_loop_t* loop, ProxyOut proxy, std::shared_ptr<ServerRuntime> server, const HealthCheckConfig& cfg,
                OnTransition on_transition);
  ~HealthChecker();
  HealthChecker(const HealthChecker&) = delete;
  HealthChecker& operator=(const HealthChecker&) = delete;

  void start(uint64_t first_delay_ms);
  // This checker's slot on the process's check grid (lb/check_schedule.hpp): after each
  // check the next one starts at loop time epoch + offset + k * interval. Set before
  // start(); a reload may move it (the checker moves at its next check).
  void set_slot(uint64_t epoch_ms, uint64_t offset_ms) {
    epoch_ms_ = epoch_ms;
    offset_ms_ = offset_ms;
  }
  // Aborts any check in progress and closes the handles; the loop must run once more
  // before the object is destroyed (see dispose()).
  void stop();
  // Stops the checker and frees it once libuv has let go of its handles: in the timer's
  // close callback, or now if that already ran. Never free a checker any other way while
  // its loop runs (a reload may retire one whose close is still pending).
  static void dispose(std::unique_ptr<HealthChecker> checker);

  // Passive ejection reported by the workers: DOWN at once; checks bring it back.
  void force_down(const std::string& reason);
  // A reload changed the pool's check settings: used from the next check on; health
  // state and history are kept.
  void reconfigure(const HealthCheckConfig& cfg, ProxyOut proxy);

  ServerRuntime& server() { return *server_; }
  const HealthState& state() const { return state_; }

 private:
  struct Probe {
    uv_tcp_t tcp{};
    uv_connect_t connect_req{};
    HealthChecker* owner = nullptr;
  };
  // One write in flight; several can be, e.g. a TLS alert after a handshake flight.
  struct Write {
    uv_write_t req{};
    std::string data;
    CheckStep step;  // the step whose command (or PROXY header) it carries
  };
  using Step = CheckStep;

  static std::string step_name(Step s) { return std::string(to_string(s)); }
  // The step in progress fails the way a server that does not expect the PROXY header
  // would (the pool sends one, and the greeting or EHLO step failed).
  bool looks_like_proxy_mismatch() const;
  std::string mismatch_hint() const;
  // Closes the check connection in progress (if any) and forgets the dialogue.
  void abort_dialogue();
  // Fails the step in progress (a bad reply, the server leaving, a read or write error).
  void fail_step(std::string reason);
  void apply_config(const HealthCheckConfig& cfg);
  void begin();
  // Where nothing goes before the greeting (no PROXY header, no implicit TLS): a socket
  // connected here and given to libuv, so the check waits only for the greeting (the
  // connect's own wake-up, SO_ERROR and an epoll change are saved). Returns a libuv
  // error code or 0.
  int connect_for_greeting();
  // The check's socket has completed its handshake (TCP_INFO), for a connect that was
  // never reported on its own.
  bool established() const;
  void connected(int status);
  void received(const char* data, size_t len);
  void closed_by_peer();
  void reply_bytes(std::string_view data);
  void start_tls();
  void tls_established();
  void warn_expiry(int64_t not_after);
  // The failure a TLS error of the handshake counts as (tls, tls_name, tls_expired).
  CheckFailure tls_failure() const;
  void send(std::string_view text);
  void write_raw(std::string data);
  void flush_tls();
  void fail(CheckFailure kind, std::string reason) { done(false, kind, std::move(reason)); }
  void done(bool ok, CheckFailure kind, std::string reason);
  void schedule(uint64_t ms);

  uv_loop_t* loop_;
  ProxyOut proxy_;
  bool skip_ = false;  // the check in progress could not run for local reasons
  std::shared_ptr<ServerRuntime> server_;
  HealthCheckConfig cfg_;
  std::optional<HealthCheckConfig> pending_cfg_;  // from a reload during a check
  OnTransition on_transition_;
  uv_timer_t timer_{};
  bool timer_closed_ = false;  // uv_close called on timer_
  bool timer_gone_ = false;    // its close callback ran: libuv no longer refers to us
  bool disposed_ = false;      // dispose() was called: the close callback frees us
  Probe* probe_ = nullptr;
  Step step_ = Step::idle;
  SmtpReplyParser parser_;
  // STARTTLS checks: the shared context (null until it could be built), the engine of
  // the check in progress (null before STARTTLS was accepted) and the names to present.
  std::shared_ptr<TlsContext> tls_ctx_;
  std::unique_ptr<TlsClient> tls_;
  std::string tls_name_;  // certificate name to verify: tls_server_name or the address
  bool expiry_warned_ = false;
  uint64_t expiry_warned_at_ = 0;  // uv_now() of the last expiry warning (one per hour)
  HealthState state_;
  uint64_t started_ = 0;
  uint64_t epoch_ms_ = 0;  // the check grid (set_slot)
  uint64_t offset_ms_ = 0;
  char buf_[4096];
};

}  // namespace smtplb
