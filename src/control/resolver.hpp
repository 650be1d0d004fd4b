#pragma once
// Host name lookups off the control loop. libuv's uv_getaddrinfo runs the system resolver
// on its thread pool, so a slow or dead DNS server delays only the reload that needs the
// answer, never health checks, signals or the admin API.
#include <uv.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "smtplb/config/duration.hpp"
#include "smtplb/config/resolve_plan.hpp"

namespace smtplb {

// How long a reload (or the start) waits for answers. The system resolver's own timeouts
// (resolv.conf: 5 s per try, 2 tries, per name server) can add up to much more; the
// admin API's callers (smtplb ctl waits 30 s) should not be kept that long.
constexpr Millis kResolveTimeout{10000};

class Resolver {
 public:
  using Done = std::function<void(std::vector<HostLookup>)>;

  explicit Resolver(uv_loop_t* loop) : loop_(loop) {}
  ~Resolver() { cancel(); }
  Resolver(const Resolver&) = delete;
  Resolver& operator=(const Resolver&) = delete;

  // Looks every host up at once. `done` runs once, later, on the loop, with one answer
  // per host in the order given, when all have answered or `timeout` has passed (hosts
  // without an answer by then fail). One batch at a time: call only when !busy().
  void start(std::vector<std::string> hosts, Millis timeout, Done done);
  // Abandons the batch in flight: `done` never runs. Lookups still queued are cancelled;
  // a lookup already running cannot be, and its answer is dropped when it comes. Needs
  // the loop to run once more (a timer closes).
  void cancel();
  bool busy() const { return batch_ != nullptr; }
  // Lookups still running on their threads, abandoned ones included. The loop cannot
  // end before they come back (libuv needs each request until its callback).
  size_t in_flight() const { return shared_->in_flight; }
  // Runs `f` once, on the loop, when in_flight() drops to 0 (call only while it is not).
  void when_idle(std::function<void()> f) { shared_->on_idle = std::move(f); }

 private:
  struct Batch;
  struct Query;
  // Outlives the Resolver if need be: late answers of abandoned batches count down here.
  struct Shared {
    size_t in_flight = 0;
    std::function<void()> on_idle;
  };
  static void finish(Batch* b);
  static void stop_batch(Batch* b);
  static void unref(Batch* b);

  uv_loop_t* loop_;
  Batch* batch_ = nullptr;  // owned by its own reference count (see Batch)
  std::shared_ptr<Shared> shared_ = std::make_shared<Shared>();
};

// For the start and --check: resolves the host names of `load.config` on a loop of its
// own, waiting for the answers. Returns `load` itself when there is nothing to resolve.
ConfigLoad resolve_config_now(ConfigLoad load, Millis timeout = kResolveTimeout);

}  // namespace smtplb
