#include "control/resolver.hpp"

#include <netdb.h>

#include <algorithm>
#include <cstring>

#include "runtime/uv_util.hpp"

namespace smtplb {

// A lookup in flight. libuv needs `req` until its callback has run, and the callback
// runs even after the batch has been abandoned (a running getaddrinfo cannot be
// stopped): the Query is freed there and only there.
struct Resolver::Query {
  uv_getaddrinfo_t req{};
  Batch* batch = nullptr;
  size_t index = 0;
};

// Freed when the last reference goes: one per Query whose callback has not run yet and
// one for the timer until its close callback. So a late answer always finds its batch.
struct Resolver::Batch {
  Resolver* owner = nullptr;  // null once finished or abandoned
  std::vector<HostLookup> results;
  std::vector<Query*> queries;  // null once answered
  size_t missing = 0;           // answers still awaited
  Millis timeout{0};
  Done done;
  std::shared_ptr<Shared> shared;
  uv_timer_t timer{};
  int refs = 1;  // the timer
  bool finished = false;
};

void Resolver::start(std::vector<std::string> hosts, Millis timeout, Done done) {
  auto* b = new Batch;
  b->owner = this;
  b->timeout = timeout;
  b->done = std::move(done);
  b->shared = shared_;
  b->results.resize(hosts.size());
  b->queries.resize(hosts.size(), nullptr);
  uv_timer_init(loop_, &b->timer);
  b->timer.data = b;
  batch_ = b;
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_ADDRCONFIG;
  for (size_t i = 0; i < hosts.size(); ++i) {
    b->results[i].host = std::move(hosts[i]);
    auto* q = new Query;
    q->batch = b;
    q->index = i;
    q->req.data = q;
    const int rc = uv_getaddrinfo(
        loop_, &q->req,
        [](uv_getaddrinfo_t* req, int status, addrinfo* res) {
          auto* query = static_cast<Query*>(req->data);
          Batch* batch = query->batch;
          if (!batch->finished) {
            HostLookup& out = batch->results[query->index];
            for (const addrinfo* ai = status == 0 ? res : nullptr; ai && out.all.size() < HostLookup::kMaxAddresses;
                 ai = ai->ai_next) {
              if (ai->ai_addrlen > sizeof out.addr.storage) continue;
              SocketAddress a;
              std::memcpy(&a.storage, ai->ai_addr, ai->ai_addrlen);
              a.len = ai->ai_addrlen;
              if (std::none_of(out.all.begin(), out.all.end(),
                               [&](const SocketAddress& seen) { return seen.same_as(a); }))
                out.all.push_back(a);
            }
            if (!out.all.empty()) {
              out.addr = out.all.front();
              out.ok = true;
            } else {
              out.error = status == 0 ? "no address" : uv_strerror(status);
            }
            batch->queries[query->index] = nullptr;
            if (--batch->missing == 0) finish(batch);
          }
          if (res) uv_freeaddrinfo(res);
          delete query;
          const std::shared_ptr<Shared> shared = batch->shared;
          unref(batch);
          if (--shared->in_flight == 0 && shared->on_idle) {
            auto idle = std::move(shared->on_idle);
            shared->on_idle = nullptr;
            idle();
          }
        },
        b->results[i].host.c_str(), nullptr, &hints);
    if (rc != 0) {
      b->results[i].error = uv_strerror(rc);
      delete q;
      continue;
    }
    b->queries[i] = q;
    ++b->missing;
    ++b->refs;
    ++shared_->in_flight;
  }
  // `done` always runs from the loop, never inside start(): the caller's state is
  // settled first. Nothing to wait for: on the next turn.
  uv_timer_start(
      &b->timer,
      [](uv_timer_t* t) {
        auto* batch = static_cast<Batch*>(t->data);
        for (auto& r : batch->results)
          if (!r.ok && r.error.empty()) r.error = "no answer within " + format_duration(batch->timeout);
        finish(batch);
      },
      b->missing == 0 ? 0 : uint64_t(timeout.count()), 0);
}

void Resolver::stop_batch(Batch* b) {
  b->finished = true;
  if (b->owner) b->owner->batch_ = nullptr;
  b->owner = nullptr;
  // Queued lookups are dropped (their callbacks still run, with UV_EAI_CANCELED); a
  // running one refuses (UV_EBUSY) and answers later into a finished batch.
  for (Query* q : b->queries)
    if (q) uv_cancel(reinterpret_cast<uv_req_t*>(&q->req));
  uv_close(as_handle(&b->timer), [](uv_handle_t* h) { unref(static_cast<Batch*>(h->data)); });
}

void Resolver::finish(Batch* b) {
  Done done = std::move(b->done);
  std::vector<HostLookup> results = std::move(b->results);
  stop_batch(b);
  if (done) done(std::move(results));
}

void Resolver::cancel() {
  if (!batch_) return;
  batch_->done = nullptr;
  stop_batch(batch_);
}

void Resolver::unref(Batch* b) {
  if (--b->refs == 0) delete b;
}

ConfigLoad resolve_config_now(ConfigLoad load, Millis timeout) {
  if (!load.ok()) return load;
  std::vector<std::string> hosts = hosts_to_resolve(*load.config);
  if (hosts.empty()) return load;
  ConfigLoad out;
  uv_loop_t loop;
  uv_loop_init(&loop);
  {
    Resolver resolver(&loop);
    resolver.start(std::move(hosts), timeout,
                   [&](std::vector<HostLookup> results) { out = apply_lookups(*load.config, results); });
    // Returns once every lookup has called back (a lookup past the timeout still holds
    // its thread; the process could not exit before it anyway).
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return out;
}

}  // namespace smtplb
