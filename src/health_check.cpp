#include "health_check.hpp"

#include <spdlog/spdlog.h>

#include "uv_util.hpp"

namespace smtplb {

HealthChecker::HealthChecker(uv_loop_t* loop, size_t pool_index, std::shared_ptr<ServerRuntime> server,
                             const HealthCheckConfig& cfg, OnTransition on_transition)
    : loop_(loop),
      pool_index_(pool_index),
      server_(std::move(server)),
      cfg_(cfg),
      on_transition_(std::move(on_transition)),
      state_(cfg.rise, cfg.fall),
      rng_(std::random_device{}()) {
  uv_timer_init(loop_, &timer_);
  timer_.data = this;
}

HealthChecker::~HealthChecker() {
  if (probe_) probe_->owner = nullptr;
}

const char* HealthChecker::step_name(Step s) {
  switch (s) {
    case Step::connect: return "connect";
    case Step::greeting: return "greeting";
    case Step::ehlo: return "ehlo";
    case Step::quit: return "quit";
    case Step::idle: break;
  }
  return "idle";
}

void HealthChecker::start(uint64_t first_delay_ms) { schedule(first_delay_ms); }

void HealthChecker::schedule(uint64_t ms) {
  uv_timer_start(&timer_, [](uv_timer_t* t) {
    auto* self = static_cast<HealthChecker*>(t->data);
    if (self->step_ == Step::idle) self->begin();
    else self->done(false, "timeout after " + format_duration(self->cfg_.timeout) + " waiting for " +
                               step_name(self->step_));
  }, ms, 0);
}

void HealthChecker::stop() {
  if (probe_) {
    probe_->owner = nullptr;
    uv_close(as_handle(&probe_->tcp), [](uv_handle_t* h) { delete static_cast<Probe*>(h->data); });
    probe_ = nullptr;
  }
  step_ = Step::idle;
  if (!timer_closed_) {
    timer_closed_ = true;
    uv_close(as_handle(&timer_), nullptr);
  }
}

void HealthChecker::force_down(const std::string& reason) {
  const Health before = state_.health();
  if (!state_.force_down(std::chrono::steady_clock::now())) return;
  server_->health.store(Health::down, std::memory_order_relaxed);
  on_transition_(*this, before, Health::down, CheckResult{false, reason, {}, true});
}

void HealthChecker::begin() {
  started_ = uv_now(loop_);
  parser_.reset();
  probe_ = new Probe;
  probe_->owner = this;
  probe_->tcp.data = probe_;
  uv_tcp_init(loop_, &probe_->tcp);
  step_ = Step::connect;
  schedule(uint64_t(cfg_.timeout.count()));  // one deadline for the whole dialogue
  int rc = uv_tcp_connect(&probe_->connect_req, &probe_->tcp, server_->cfg.addr.sa(), [](uv_connect_t* req, int st) {
    auto* p = static_cast<Probe*>(req->handle->data);
    if (p->owner) p->owner->connected(st);
  });
  if (rc < 0) done(false, std::string("connect: ") + uv_strerror(rc));
}

void HealthChecker::connected(int status) {
  if (status < 0) {
    done(false, std::string("connect: ") + uv_strerror(status));
    return;
  }
  step_ = Step::greeting;
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
        if (n > 0) {
          self->received(b->base, size_t(n));
        } else if (n < 0) {
          self->done(false, n == UV_EOF ? std::string("connection closed during ") + step_name(self->step_)
                                        : std::string(step_name(self->step_)) + ": " + uv_strerror(int(n)));
        }
      });
}

void HealthChecker::received(const char* data, size_t len) {
  size_t consumed = 0;
  auto status = parser_.feed(std::string_view(data, len), consumed);
  if (status == SmtpReplyParser::Status::need_more) return;
  if (status == SmtpReplyParser::Status::error) {
    done(false, std::string(step_name(step_)) + ": " + parser_.error());
    return;
  }
  const int code = parser_.code();
  const std::string what = std::string(step_name(step_)) + " " + std::to_string(code) +
                           (parser_.text().empty() ? "" : " " + printable(parser_.text()));
  // Bytes after a complete reply were sent before we spoke; a well-behaved server sends
  // none, and acting on them would mean pipelining.
  parser_.reset();
  switch (step_) {
    case Step::greeting:
      if (code != 220) return done(false, what);
      step_ = Step::ehlo;
      send("EHLO " + cfg_.ehlo_name + "\r\n");
      break;
    case Step::ehlo:
      if (code != 250) return done(false, what);
      step_ = Step::quit;
      send("QUIT\r\n");
      break;
    case Step::quit:
      if (code != 221) return done(false, what);
      done(true, "");
      break;
    default:
      break;
  }
}

void HealthChecker::send(std::string text) {
  probe_->out = std::move(text);
  uv_buf_t b = uv_buf_init(probe_->out.data(), unsigned(probe_->out.size()));
  int rc = uv_write(&probe_->write_req, as_stream(&probe_->tcp), &b, 1, [](uv_write_t* req, int st) {
    auto* p = static_cast<Probe*>(req->handle->data);
    if (st < 0 && st != UV_ECANCELED && p->owner)
      p->owner->done(false, std::string("write: ") + uv_strerror(st));
  });
  if (rc < 0) done(false, std::string("write: ") + uv_strerror(rc));
}

void HealthChecker::done(bool ok, std::string reason) {
  if (step_ == Step::idle) return;
  CheckResult r{ok, std::move(reason), std::chrono::milliseconds(uv_now(loop_) - started_)};
  if (probe_) {
    probe_->owner = nullptr;
    uv_close(as_handle(&probe_->tcp), [](uv_handle_t* h) { delete static_cast<Probe*>(h->data); });
    probe_ = nullptr;
  }
  step_ = Step::idle;

  const auto now = std::chrono::steady_clock::now();
  const Health before = state_.health();
  const bool changed = ok ? state_.on_success(now) : state_.on_failure(now);
  if (changed) {
    server_->health.store(state_.health(), std::memory_order_relaxed);
    on_transition_(*this, before, state_.health(), r);
  } else if (!ok && state_.health() == Health::up) {
    spdlog::warn("server {} check failed ({}), {} of {} failures before DOWN", server_->label, r.reason,
                 state_.consecutive_failures(), state_.fall());
  } else if (ok && state_.health() == Health::down) {
    spdlog::info("server {} check passed, {} of {} successes before UP", server_->label,
                 state_.consecutive_successes(), state_.rise());
  } else {
    spdlog::debug("server {} check {} ({}) in {} ms", server_->label, ok ? "passed" : "failed", r.reason,
                  r.duration.count());
  }

  // Up to 10% jitter below the interval keeps many servers' checks from lining up.
  const uint64_t interval = uint64_t(cfg_.interval.count());
  const uint64_t jitter = interval / 10 ? rng_() % (interval / 10) : 0;
  if (!timer_closed_) schedule(interval - jitter);
}

}  // namespace smtplb
