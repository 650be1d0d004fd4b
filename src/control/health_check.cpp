#include "control/health_check.hpp"

#include <utility>

#include "smtplb/proto/proxy_protocol.hpp"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/x509_vfy.h>

#include <ctime>
#include <map>
#include <tuple>

#include "runtime/uv_util.hpp"
#include "smtplb/lb/check_schedule.hpp"

namespace smtplb {

namespace {

constexpr int64_t kDay = 86400;
constexpr int64_t kExpiryWarningDays = 14;
constexpr uint64_t kExpiryWarningEveryMs = 3600 * 1000;

// Checkers with the same TLS settings share one SSL_CTX: with verification it holds the
// parsed CA store (the whole system bundle by default), which is too big to keep per
// server. The CA file's identity is part of the key, so a changed file is read again by
// checkers built after the change. Only the control loop builds checkers.
std::shared_ptr<TlsContext> shared_tls_context(const HealthCheckConfig& cfg, std::string& error) {
  using Key = std::tuple<bool, std::string, int64_t, int64_t, int64_t>;
  static std::map<Key, std::weak_ptr<TlsContext>> cache;
  Key key{cfg.tls_verify, cfg.tls_verify ? cfg.tls_ca_file : std::string(), 0, 0, 0};
  struct stat st {};
  if (cfg.tls_verify && !cfg.tls_ca_file.empty() && ::stat(cfg.tls_ca_file.c_str(), &st) == 0)
    key = Key{true, cfg.tls_ca_file, int64_t(st.st_ino), int64_t(st.st_size),
              int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec};
  std::erase_if(cache, [](const auto& e) { return e.second.expired(); });
  if (auto it = cache.find(key); it != cache.end())
    if (auto ctx = it->second.lock()) return ctx;
  auto ctx = TlsContext::create(TlsContextOptions{cfg.tls_verify, cfg.tls_ca_file}, error);
  if (ctx) cache[key] = ctx;
  return ctx;
}

std::string utc_time(int64_t unix_seconds) {
  const std::time_t t = std::time_t(unix_seconds);
  std::tm tm{};
  char buf[32];
  if (gmtime_r(&t, &tm) == nullptr || std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
    return std::to_string(unix_seconds);
  return buf;
}

}  // namespace

HealthChecker::HealthChecker(uv_loop_t* loop, ProxyOut proxy, std::shared_ptr<ServerRuntime> server,
                             const HealthCheckConfig& cfg, OnTransition on_transition)
    : loop_(loop),
      proxy_(proxy),
      server_(std::move(server)),
      cfg_(cfg),
      on_transition_(std::move(on_transition)),
      state_(cfg.rise, cfg.fall) {
  uv_timer_init(loop_, &timer_);
  timer_.data = this;
  apply_config(cfg);
}

HealthChecker::~HealthChecker() {
  if (probe_) probe_->owner = nullptr;
}

void HealthChecker::start(uint64_t first_delay_ms) {
  schedule(first_delay_ms);
}

void HealthChecker::schedule(uint64_t ms) {
  uv_timer_start(
      &timer_,
      [](uv_timer_t* t) {
        auto* self = static_cast<HealthChecker*>(t->data);
        if (self->step_ == Step::idle) return self->begin();
        // A connect that was not reported on its own (connect_for_greeting) may have
        // completed: then it is the greeting that did not come.
        if (self->step_ == Step::connect && self->established()) self->step_ = Step::greeting;
        self->fail(CheckFailure::timeout,
                   "timeout after " + format_duration(self->cfg_.timeout) + " waiting for " + step_name(self->step_));
      },
      ms, 0);
}

void HealthChecker::abort_dialogue() {
  if (probe_) {
    probe_->owner = nullptr;  // a callback still queued for it finds nobody
    uv_close(as_handle(&probe_->tcp), [](uv_handle_t* h) { delete static_cast<Probe*>(h->data); });
    probe_ = nullptr;
  }
  tls_.reset();
  step_ = Step::idle;
}

void HealthChecker::stop() {
  abort_dialogue();
  if (!timer_closed_) {
    timer_closed_ = true;
    uv_close(as_handle(&timer_), [](uv_handle_t* h) {
      auto* self = static_cast<HealthChecker*>(h->data);
      self->timer_gone_ = true;
      if (self->disposed_) delete self;
    });
  }
}

void HealthChecker::dispose(std::unique_ptr<HealthChecker> checker) {
  HealthChecker* self = checker.release();
  self->stop();
  if (self->timer_gone_)
    delete self;
  else
    self->disposed_ = true;
}

void HealthChecker::reconfigure(const HealthCheckConfig& cfg, ProxyOut proxy) {
  state_.set_thresholds(cfg.rise, cfg.fall);
  proxy_ = proxy;  // read only when a check connects
  // A check in flight ends with the settings it started with (a STARTTLS dialogue must
  // not change course half-way); done() applies the new ones.
  if (step_ != Step::idle) {
    pending_cfg_ = cfg;
    return;
  }
  const bool sooner = cfg.interval < cfg_.interval;
  apply_config(cfg);
  // A shorter interval should not wait out the old, longer one.
  if (sooner && !timer_closed_) {
    const uint64_t now = uv_now(loop_);
    schedule(next_check_slot(epoch_ms_, offset_ms_, uint64_t(cfg_.interval.count()), now) - now);
  }
}

void HealthChecker::apply_config(const HealthCheckConfig& cfg) {
  cfg_ = cfg;
  tls_ctx_.reset();  // the next check takes the context of the (possibly new) TLS settings
  tls_name_.clear();
  if (cfg_.tls != CheckTls::none) {
    tls_name_ = cfg_.tls_server_name.empty() ? server_->cfg.address : cfg_.tls_server_name;
    if (tls_name_.size() > 2 && tls_name_.front() == '[' && tls_name_.back() == ']')
      tls_name_ = tls_name_.substr(1, tls_name_.size() - 2);
  }
}

void HealthChecker::force_down(const std::string& reason) {
  const Health before = state_.health();
  if (!state_.force_down(std::chrono::steady_clock::now())) return;
  server_->health.store(Health::down, std::memory_order_relaxed);
  on_transition_(*this, before, Health::down, CheckResult{false, CheckFailure::connect, reason, {}, true});
}

void HealthChecker::begin() {
  started_ = uv_now(loop_);
  parser_.reset();
  if (cfg_.tls != CheckTls::none && !tls_ctx_) {
    // Built here rather than in the constructor so a CA file fixed later is picked up.
    std::string error;
    tls_ctx_ = shared_tls_context(cfg_, error);
    if (!tls_ctx_) {
      step_ = Step::connect;
      return fail(CheckFailure::tls, error);
    }
  }
  probe_ = new Probe;
  probe_->owner = this;
  probe_->tcp.data = probe_;
  uv_tcp_init(loop_, &probe_->tcp);
  step_ = Step::connect;
  schedule(uint64_t(cfg_.timeout.count()));  // one deadline for the whole dialogue
  int rc = 0;
  if (proxy_ == ProxyOut::none && cfg_.tls != CheckTls::implicit) {
    rc = connect_for_greeting();
  } else {
    // Each step sends one short command and waits for the answer: Nagle only adds delay.
    uv_tcp_nodelay(&probe_->tcp, 1);
    rc = uv_tcp_connect(&probe_->connect_req, &probe_->tcp, server_->cfg.addr.sa(), [](uv_connect_t* req, int st) {
      auto* p = static_cast<Probe*>(req->handle->data);
      if (p->owner) p->owner->connected(st);
    });
  }
  if (rc == UV_EMFILE || rc == UV_ENFILE || rc == UV_ENOBUFS || rc == UV_ENOMEM || rc == UV_EADDRNOTAVAIL) {
    // Out of descriptors or ports here: says nothing about the server, so the check is
    // skipped rather than counted as a failure.
    spdlog::warn("server {} check skipped: connect: {} (local resources)", server_->label, uv_strerror(rc));
    skip_ = true;
    fail(CheckFailure::connect, "");
    return;
  }
  if (rc < 0) return fail(CheckFailure::connect, std::string("connect: ") + uv_strerror(rc));
  // Reading is started with the connect, so that libuv registers the socket once for both
  // (nothing can arrive before the connection is up, and libuv reports the connect first):
  // started in the connect callback, it costs a failing EPOLL_CTL_ADD and a MOD per check.
  uv_read_start(
      as_stream(&probe_->tcp),
      [](uv_handle_t* h, size_t, uv_buf_t* b) {
        auto* p = static_cast<Probe*>(h->data);
        *b = p->owner ? uv_buf_init(p->owner->buf_, sizeof p->owner->buf_) : uv_buf_init(nullptr, 0);
      },
      [](uv_stream_t* s, ssize_t n, const uv_buf_t* b) {
        auto* p = static_cast<Probe*>(s->data);
        if (!p->owner) return;
        HealthChecker* self = p->owner;
        if (self->step_ == Step::connect) {
          // connect_for_greeting: the first event says how the connect went. Refused,
          // unreachable or timed out is the connect's failure; anything else (bytes, a
          // close, a reset) means the connection was up.
          if (n == UV_ECONNREFUSED || n == UV_ENETUNREACH || n == UV_EHOSTUNREACH || n == UV_ETIMEDOUT ||
              n == UV_EHOSTDOWN || n == UV_ENETDOWN)
            return self->fail(CheckFailure::connect, std::string("connect: ") + uv_strerror(int(n)));
          if (n != 0) self->step_ = Step::greeting;
        }
        if (n > 0) {
          self->received(b->base, size_t(n));
        } else if (n == UV_EOF) {
          self->closed_by_peer();
        } else if (n < 0) {
          self->fail_step(step_name(self->step_) + ": " + uv_strerror(int(n)));
        }
      });
}

int HealthChecker::connect_for_greeting() {
  const SocketAddress& to = server_->cfg.addr;
  const int fd = ::socket(to.sa()->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return uv_translate_sys_error(errno);
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // as uv_tcp_nodelay
  if (::connect(fd, to.sa(), to.len) < 0 && errno != EINPROGRESS) {
    const int err = uv_translate_sys_error(errno);
    ::close(fd);
    return err;
  }
  const int rc = uv_tcp_open(&probe_->tcp, fd);
  if (rc < 0) ::close(fd);
  return rc;
}

bool HealthChecker::established() const {
  uv_os_fd_t fd;
  if (!probe_ || uv_fileno(reinterpret_cast<const uv_handle_t*>(&probe_->tcp), &fd) != 0) return false;
  tcp_info info{};
  socklen_t len = sizeof info;
  return ::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) == 0 && info.tcpi_state == TCP_ESTABLISHED;
}

void HealthChecker::connected(int status) {
  if (status < 0) {
    fail(CheckFailure::connect, std::string("connect: ") + uv_strerror(status));
    return;
  }
  if (proxy_ != ProxyOut::none) {
    // Written at once: a PROXY-aware server reads the header before it greets, and
    // Postfix treats a connection without one as broken (it may even exit).
    proxy::Header h;
    if (proxy_ == ProxyOut::v1) {
      int len = sizeof h.source.storage;
      if (uv_tcp_getsockname(&probe_->tcp, reinterpret_cast<sockaddr*>(&h.source.storage), &len) == 0)
        h.source.len = socklen_t(len);
      len = sizeof h.destination.storage;
      if (uv_tcp_getpeername(&probe_->tcp, reinterpret_cast<sockaddr*>(&h.destination.storage), &len) == 0)
        h.destination.len = socklen_t(len);
    } else {
      h.local = true;  // v2 LOCAL: the balancer's own connection
    }
    // Still the connect step: a header that cannot be written fails the connection.
    write_raw(proxy::encode(proxy_ == ProxyOut::v1 ? proxy::Version::v1 : proxy::Version::v2, h));
    if (step_ != Step::connect) return;  // the write failed
  }
  step_ = Step::greeting;
  // Port 465: the handshake comes first (after the PROXY header), the greeting inside TLS.
  if (cfg_.tls == CheckTls::implicit) start_tls();
}

void HealthChecker::received(const char* data, size_t len) {
  if (!tls_) return reply_bytes(std::string_view(data, len));
  tls_->feed(std::string_view(data, len));
  if (step_ == Step::tls_handshake) {
    const TlsClient::Status st = tls_->handshake();
    // Once established, the last flight (Finished) goes out together with the EHLO: two
    // small writes in a row would wait for a delayed ACK (Nagle).
    if (st == TlsClient::Status::ok) return tls_established();
    flush_tls();  // the next flight, or an alert
    if (st != TlsClient::Status::want_read) fail(tls_failure(), tls_->error());
    return;
  }
  std::string plain;
  const TlsClient::Status st = tls_->read(plain);
  flush_tls();
  if (st == TlsClient::Status::error) return fail(CheckFailure::tls, tls_->error());
  if (st == TlsClient::Status::closed)
    return fail(CheckFailure::tls, "tls: close_notify from the server during " + step_name(step_));
  if (!plain.empty()) reply_bytes(plain);
}

void HealthChecker::closed_by_peer() {
  if (tls_ && step_ == Step::tls_handshake) {
    // Let OpenSSL name it ("unexpected eof while reading"), like any other handshake failure.
    tls_->feed_eof();
    if (tls_->handshake() == TlsClient::Status::error) return fail(tls_failure(), tls_->error());
  }
  fail_step("connection closed during " + step_name(step_));
}

bool HealthChecker::looks_like_proxy_mismatch() const {
  // A backend that does not expect the header greets, then answers it as a command (500)
  // or hangs up; one that does expect it fails differently than a broken server.
  return proxy_ != ProxyOut::none && (step_ == Step::greeting || step_ == Step::ehlo);
}

std::string HealthChecker::mismatch_hint() const {
  return looks_like_proxy_mismatch() ? " (PROXY protocol mismatch?)" : "";
}

void HealthChecker::fail_step(std::string reason) {
  const CheckFailure kind = failure_of(step_, looks_like_proxy_mismatch());
  fail(kind, std::move(reason) + mismatch_hint());
}

void HealthChecker::reply_bytes(std::string_view data) {
  size_t consumed = 0;
  auto status = parser_.feed(data, consumed);
  if (status == SmtpReplyParser::Status::need_more) return;
  if (status == SmtpReplyParser::Status::error) {
    fail_step(step_name(step_) + ": " + parser_.error());
    return;
  }
  const int code = parser_.code();
  const std::string what =
      step_name(step_) + " " + std::to_string(code) + (parser_.text().empty() ? "" : " " + printable(parser_.text()));
  // Bytes after a complete reply were sent before we spoke: a well-behaved server sends
  // none. A server that does not expect the PROXY header answers it as a command right
  // after its greeting, so this is also how a mismatch shows. After the 220 to STARTTLS
  // such bytes are plaintext injected ahead of the handshake: dropped, never read as
  // protected (start_tls() begins with an empty engine).
  parser_.reset();
  if (consumed < data.size() && step_ != Step::quit && step_ != Step::starttls)
    return fail_step(step_name(step_) + " " + std::to_string(code) + " followed by unsolicited data \"" +
                     printable(data.substr(consumed), 60) + "\"");
  switch (step_) {
    case Step::greeting:
      if (code != 220) return fail_step(what);
      step_ = Step::ehlo;
      send("EHLO " + cfg_.ehlo_name + "\r\n");
      break;
    case Step::ehlo:
      if (code != 250) return fail_step(what);
      step_ = cfg_.tls == CheckTls::starttls ? Step::starttls : Step::quit;
      send(cfg_.tls == CheckTls::starttls ? "STARTTLS\r\n" : "QUIT\r\n");
      break;
    case Step::starttls:
      if (code != 220) return fail_step(what);
      start_tls();
      break;
    case Step::ehlo_tls:
      if (code != 250) return fail_step(what);
      step_ = Step::quit;
      send("QUIT\r\n");
      break;
    case Step::quit:
      if (code != 221) return fail_step(what);
      if (tls_) {
        // close_notify, best effort: the socket is closed right after, which would
        // cancel a queued write.
        tls_->shutdown();
        std::string bye = tls_->take_output();
        uv_buf_t b = uv_buf_init(bye.data(), unsigned(bye.size()));
        if (!bye.empty()) uv_try_write(as_stream(&probe_->tcp), &b, 1);
      }
      done(true, CheckFailure::connect, "");
      break;
    default:
      break;
  }
}

void HealthChecker::start_tls() {
  std::string error;
  if (!tls_ctx_ && !(tls_ctx_ = shared_tls_context(cfg_, error))) return fail(CheckFailure::tls, error);
  tls_ = TlsClient::create(tls_ctx_, tls_name_, cfg_.tls_server_name, error);
  if (!tls_) return fail(CheckFailure::tls, error);
  step_ = Step::tls_handshake;
  const TlsClient::Status st = tls_->handshake();  // the ClientHello
  flush_tls();
  if (st == TlsClient::Status::error) fail(tls_failure(), tls_->error());
}

CheckFailure HealthChecker::tls_failure() const {
  // A handshake failed by verification says why in the verify result: the two an
  // operator acts on differently (fix the name, renew the certificate) count apart.
  if (!tls_ || !tls_ctx_ || !tls_ctx_->verify()) return CheckFailure::tls;
  const long v = tls_->verify_result();
  if (v == X509_V_ERR_HOSTNAME_MISMATCH || v == X509_V_ERR_IP_ADDRESS_MISMATCH) return CheckFailure::tls_name;
  if (v == X509_V_ERR_CERT_HAS_EXPIRED) return CheckFailure::tls_expired;
  return CheckFailure::tls;
}

void HealthChecker::tls_established() {
  const int64_t not_after = tls_->peer_not_after();
  server_->tls_not_after.store(not_after, std::memory_order_relaxed);
  spdlog::debug("server {} TLS: {}, certificate notAfter {}", server_->label, tls_->description(),
                not_after ? utc_time(not_after) : std::string("unknown"));
  warn_expiry(not_after);
  // Plaintext that came with the server's last flight was sent before our EHLO: dropped,
  // as after any reply.
  std::string early;
  if (tls_->read(early) == TlsClient::Status::error) return fail(CheckFailure::tls, tls_->error());
  if (cfg_.tls == CheckTls::implicit) {
    // Implicit TLS: the server speaks first, once it has our Finished; anything that
    // came with its last flight is the start of the greeting.
    flush_tls();
    step_ = Step::greeting;
    if (!early.empty()) reply_bytes(early);
    return;
  }
  step_ = Step::ehlo_tls;
  send("EHLO " + cfg_.ehlo_name + "\r\n");
}

void HealthChecker::warn_expiry(int64_t not_after) {
  if (not_after == 0) return;
  // notAfter is calendar time, so the wall clock, not the loop's monotonic one.
  const int64_t left = not_after - int64_t(std::time(nullptr));
  if (left >= kExpiryWarningDays * kDay) return;
  const uint64_t now = uv_now(loop_);
  if (expiry_warned_ && now - expiry_warned_at_ < kExpiryWarningEveryMs) return;
  expiry_warned_ = true;
  expiry_warned_at_ = now;
  if (left >= 0)
    spdlog::warn("server {} certificate expires in {} days (notAfter {})", server_->label, left / kDay,
                 utc_time(not_after));
  else
    spdlog::warn("server {} certificate expired {} days ago (notAfter {})", server_->label, -left / kDay,
                 utc_time(not_after));
}

void HealthChecker::send(std::string_view text) {
  if (!tls_) return write_raw(std::string(text));
  if (tls_->write(text) != TlsClient::Status::ok) return fail(CheckFailure::tls, tls_->error());
  flush_tls();
}

void HealthChecker::flush_tls() {
  if (tls_ && tls_->has_output()) write_raw(tls_->take_output());
}

void HealthChecker::write_raw(std::string data) {
  if (!probe_) return;
  // A command is a few bytes on a connection with nothing in flight: it goes out at once.
  // uv_write would also queue a callback and re-arm the socket in epoll (one
  // EPOLL_CTL_MOD per command); only what the kernel did not take is queued.
  {
    uv_buf_t b = uv_buf_init(data.data(), unsigned(data.size()));
    const int n = uv_try_write(as_stream(&probe_->tcp), &b, 1);
    if (n == int(data.size())) return;
    if (n < 0 && n != UV_EAGAIN) return fail(failure_of(step_, false), std::string("write: ") + uv_strerror(n));
    if (n > 0) data.erase(0, size_t(n));
  }
  auto* w = new Write;
  w->data = std::move(data);
  w->req.data = w;
  w->step = step_;
  uv_buf_t b = uv_buf_init(w->data.data(), unsigned(w->data.size()));
  int rc = uv_write(&w->req, as_stream(&probe_->tcp), &b, 1, [](uv_write_t* req, int st) {
    // Runs before the handle's close callback, so the probe is still there.
    auto* p = static_cast<Probe*>(req->handle->data);
    auto* wr = static_cast<Write*>(req->data);
    const CheckStep step = wr->step;
    delete wr;
    // A failed write fails the step whose command (or PROXY header) it carried, even
    // when libuv reports it after the dialogue moved on (a header write fails as the
    // connect it follows, not as the greeting the checker waits for by then).
    if (st < 0 && st != UV_ECANCELED && p->owner)
      p->owner->fail(failure_of(step, false), std::string("write: ") + uv_strerror(st));
  });
  if (rc < 0) {
    delete w;
    fail(failure_of(step_, false), std::string("write: ") + uv_strerror(rc));
  }
}

void HealthChecker::done(bool ok, CheckFailure kind, std::string reason) {
  if (step_ == Step::idle) return;
  CheckResult r{ok, kind, std::move(reason), std::chrono::milliseconds(uv_now(loop_) - started_)};
  abort_dialogue();
  if (pending_cfg_) {
    apply_config(*pending_cfg_);
    pending_cfg_.reset();
  }

  const auto now = std::chrono::steady_clock::now();
  const Health before = state_.health();
  const bool skipped = std::exchange(skip_, false);
  if (!skipped) {
    server_->check_duration.observe(kLatencyBounds, double(r.duration.count()) / 1000.0);
    if (!ok) bump(server_->check_failures[size_t(r.failure)]);
    server_->last_check_ms.store(
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
            .count());
    server_->last_check_duration_ms.store(uint32_t(r.duration.count()));
    server_->last_check_ok.store(ok);
    server_->last_check_reason = ok ? "" : r.reason;
  }
  const bool changed = !skipped && (ok ? state_.on_success(now) : state_.on_failure(now));
  if (skipped) {
    // Already logged where the check could not start; the state is untouched.
  } else if (changed) {
    server_->health.store(state_.health(), std::memory_order_relaxed);
    on_transition_(*this, before, state_.health(), r);
  } else if (!ok && state_.health() == Health::up) {
    spdlog::warn("server {} check failed ({}), {} of {} failures before DOWN", server_->label, r.reason,
                 state_.consecutive_failures(), state_.fall());
  } else if (ok && state_.health() == Health::down) {
    spdlog::info("server {} check passed, {} of {} successes before UP", server_->label, state_.consecutive_successes(),
                 state_.rise());
  } else {
    spdlog::debug("server {} check {} ({}) in {} ms", server_->label, ok ? "passed" : "failed", r.reason,
                  r.duration.count());
  }

  // The next check at this checker's slot: evenly spread with the others, whatever this
  // dialogue took.
  const uint64_t now_ms = uv_now(loop_);
  const uint64_t due = after_check_slot(epoch_ms_, offset_ms_, uint64_t(cfg_.interval.count()), started_, now_ms);
  if (!timer_closed_) schedule(due - now_ms);
}

}  // namespace smtplb
