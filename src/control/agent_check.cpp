#include "control/agent_check.hpp"

#include "runtime/uv_util.hpp"

namespace smtplb {

namespace {
// An agent says one short line; more than this is not an agent.
constexpr size_t kMaxReply = 512;
}  // namespace

AgentChecker::AgentChecker(uv_loop_t* loop, std::shared_ptr<ServerRuntime> server, const HealthCheckConfig& cfg,
                           OnResult on_result)
    : loop_(loop),
      server_(std::move(server)),
      cfg_(cfg),
      on_result_(std::move(on_result)),
      rng_(std::random_device{}()) {
  uv_timer_init(loop_, &timer_);
  timer_.data = this;
}

AgentChecker::~AgentChecker() {
  if (probe_) probe_->owner = nullptr;
}

std::string AgentChecker::target() const {
  SocketAddress a = server_->cfg.addr;
  a.set_port(cfg_.agent_port);
  return a.to_string();
}

void AgentChecker::start(uint64_t first_delay_ms) {
  schedule(first_delay_ms);
}

void AgentChecker::schedule(uint64_t ms) {
  if (timer_closed_) return;
  uv_timer_start(
      &timer_,
      [](uv_timer_t* t) {
        auto* self = static_cast<AgentChecker*>(t->data);
        if (!self->probe_)
          self->begin();
        else
          self->finish(false, "no reply within agent_timeout " + format_duration(self->cfg_.agent_timeout));
      },
      ms, 0);
}

void AgentChecker::abort_query() {
  if (!probe_) return;
  probe_->owner = nullptr;
  uv_close(as_handle(&probe_->tcp), [](uv_handle_t* h) { delete static_cast<Probe*>(h->data); });
  probe_ = nullptr;
}

void AgentChecker::stop() {
  abort_query();
  if (!timer_closed_) {
    timer_closed_ = true;
    uv_close(as_handle(&timer_), [](uv_handle_t* h) {
      auto* self = static_cast<AgentChecker*>(h->data);
      self->timer_gone_ = true;
      if (self->disposed_) delete self;
    });
  }
}

void AgentChecker::dispose(std::unique_ptr<AgentChecker> checker) {
  AgentChecker* self = checker.release();
  self->stop();
  if (self->timer_gone_)
    delete self;
  else
    self->disposed_ = true;
}

void AgentChecker::begin() {
  line_.clear();
  SocketAddress a = server_->cfg.addr;
  a.set_port(cfg_.agent_port);
  probe_ = new Probe;
  probe_->owner = this;
  probe_->tcp.data = probe_;
  uv_tcp_init(loop_, &probe_->tcp);
  schedule(uint64_t(cfg_.agent_timeout.count()));
  const int rc = uv_tcp_connect(&probe_->connect_req, &probe_->tcp, a.sa(), [](uv_connect_t* req, int st) {
    auto* p = static_cast<Probe*>(req->handle->data);
    AgentChecker* self = p->owner;
    if (!self) return;
    if (st < 0) return self->finish(false, std::string("connect: ") + uv_strerror(st));
    uv_read_start(
        as_stream(&p->tcp),
        [](uv_handle_t* h, size_t, uv_buf_t* b) {
          auto* pr = static_cast<Probe*>(h->data);
          *b = pr->owner ? uv_buf_init(pr->owner->buf_, sizeof pr->owner->buf_) : uv_buf_init(nullptr, 0);
        },
        [](uv_stream_t* s, ssize_t n, const uv_buf_t* b) {
          auto* pr = static_cast<Probe*>(s->data);
          AgentChecker* owner = pr->owner;
          if (!owner) return;
          if (n > 0) {
            owner->line_.append(b->base, size_t(n));
            if (owner->line_.find('\n') != std::string::npos || owner->line_.size() >= kMaxReply)
              owner->finish(false, "");
          } else if (n == UV_EOF) {
            owner->finish(true, "");
          } else if (n < 0) {
            owner->finish(false, std::string("read: ") + uv_strerror(int(n)));
          }
        });
  });
  if (rc < 0) finish(false, std::string("connect: ") + uv_strerror(rc));
}

void AgentChecker::finish(bool eof, std::string error) {
  (void)eof;
  abort_query();
  AgentReply reply;
  std::string line = line_.substr(0, std::min(line_.find('\n'), kMaxReply));
  if (!line.empty() && line.back() == '\r') line.pop_back();
  if (error.empty() && line_.empty()) error = "closed without a reply";
  if (error.empty() && !parse_agent_reply(line, reply, error)) error = "reply not understood: " + error;
  line_.clear();
  // Up to 10% jitter below the interval, as for health checks.
  const uint64_t interval = uint64_t(cfg_.agent_every().count());
  const uint64_t jitter = interval / 10 ? rng_() % (interval / 10) : 0;
  schedule(interval - jitter);
  on_result_(*this, error.empty(), reply, line, error);
}

}  // namespace smtplb
