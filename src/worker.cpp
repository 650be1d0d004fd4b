#include "worker.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "session.hpp"
#include "uv_util.hpp"

namespace smtplb {

namespace {
constexpr int kBacklog = 4096;  // the kernel caps it at net.core.somaxconn
}

Worker::Worker(unsigned index, std::shared_ptr<const Snapshot> snapshot, ProcessLimits& limits)
    : index_(index), limits_(limits), snapshot_(std::move(snapshot)), scratch_(new char[kScratchSize]) {
  uv_loop_init(&loop_);
  loop_.data = this;
  uv_async_init(&loop_, &wake_, [](uv_async_t* a) { static_cast<Worker*>(a->data)->on_wake(); });
  wake_.data = this;
  access_log_ = snapshot_->config->log.access_log;
  balancers_.resize(snapshot_->pools.size());
}

bool Worker::open_listeners(std::string& error) {
  for (const auto& lr : snapshot_->listeners) {
    auto l = std::make_unique<Listener>();
    l->worker = this;
    l->runtime = lr;
    uv_tcp_init(&loop_, &l->tcp);
    l->tcp.data = l.get();
    int rc = uv_tcp_open(&l->tcp, lr->fds.at(index_));
    if (rc == 0) lr->fds[index_] = -1;  // the handle owns it now
    if (rc == 0)
      rc = uv_listen(as_stream(&l->tcp), kBacklog, [](uv_stream_t* s, int status) {
        auto* self = static_cast<Listener*>(s->data);
        self->worker->on_connection(*self, status);
      });
    listeners_.push_back(std::move(l));
    if (rc != 0) {
      error = "listener " + lr->cfg->name + ": cannot listen on " + lr->bound.to_string() + ": " + uv_strerror(rc);
      return false;
    }
  }
  return true;
}

Worker::~Worker() {
  join();
  if (!thread_started_) {
    // Never ran: close what the constructor opened so the loop can be closed cleanly.
    stop_now();
    uv_run(&loop_, UV_RUN_DEFAULT);
  }
  uv_loop_close(&loop_);
}

void Worker::start() {
  thread_started_ = true;
  thread_ = std::thread([this] { run(); });
}

void Worker::request_stop() {
  stop_requested_.store(true);
  uv_async_send(&wake_);
}

void Worker::join() {
  if (thread_.joinable()) thread_.join();
}

void Worker::run() {
  uv_run(&loop_, UV_RUN_DEFAULT);
}

void Worker::on_wake() {
  if (stop_requested_.load()) stop_now();
}

void Worker::stop_now() {
  for (auto& l : listeners_)
    if (!uv_is_closing(as_handle(&l->tcp))) uv_close(as_handle(&l->tcp), nullptr);
  for (Session* s = sessions_; s;) {
    Session* next = s->next_;
    s->kill();
    s = next;
  }
  if (!uv_is_closing(as_handle(&wake_))) uv_close(as_handle(&wake_), nullptr);
}

void Worker::on_connection(Listener& l, int status) {
  if (status < 0) {
    spdlog::warn("listener {}: accept failed: {}", l.runtime->cfg->name, uv_strerror(status));
    return;
  }
  auto* s = new Session(*this, snapshot_, *l.runtime);
  if (uv_accept(as_stream(&l.tcp), as_stream(s->client())) != 0) {
    s->kill();
    return;
  }
  s->start();
}

std::optional<size_t> Worker::pick(const Snapshot& snap, size_t pool, std::span<const uint32_t> exclude) {
  const auto& servers = snap.pools[pool].servers;
  candidates_.resize(servers.size());
  bool any_usable = false;
  for (size_t i = 0; i < servers.size(); ++i) {
    const ServerRuntime& s = *servers[i];
    const bool usable = s.usable();
    any_usable |= usable;
    candidates_[i] = {s.cfg.weight, s.active.load(std::memory_order_relaxed),
                      usable && std::find(exclude.begin(), exclude.end(), i) == exclude.end()};
  }
  PoolBalancer& b = balancers_[pool];
  const bool lc = snap.pools[pool].cfg->algorithm == Algorithm::leastconn;
  auto choose = [&] { return lc ? b.lc.pick(candidates_) : b.rr.pick(candidates_); };
  auto picked = choose();
  if (!picked && any_usable && !exclude.empty()) {
    // Every usable server was tried already: a retry may go back to one of them.
    for (size_t i = 0; i < servers.size(); ++i) candidates_[i].eligible = servers[i]->usable();
    picked = choose();
  }
  return picked;
}

void Worker::link(Session* s) {
  s->next_ = sessions_;
  s->prev_ = nullptr;
  if (sessions_) sessions_->prev_ = s;
  sessions_ = s;
}

void Worker::unlink(Session* s) {
  if (s->prev_) s->prev_->next_ = s->next_;
  else sessions_ = s->next_;
  if (s->next_) s->next_->prev_ = s->prev_;
  s->next_ = s->prev_ = nullptr;
}

}  // namespace smtplb
