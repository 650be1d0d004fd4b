#pragma once
// The process: control loop on the main thread (signals, health checks, snapshot
// publishing) and the worker threads of the data path.
#include <uv.h>

#include <memory>
#include <vector>

#include "health_check.hpp"
#include "server_pool.hpp"
#include "worker.hpp"

namespace smtplb {

class Server {
 public:
  explicit Server(std::shared_ptr<const Config> config);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds, starts workers and checks, runs until SIGTERM/SIGINT. Returns the exit code.
  int run();

 private:
  void on_signal(int signum);
  void stop();
  void on_transition(HealthChecker& c, Health from, Health to, const CheckResult& r);
  void on_passive_reports();

  std::shared_ptr<const Config> config_;
  std::shared_ptr<Snapshot> snapshot_;
  uv_loop_t loop_{};
  std::vector<uv_signal_t> signals_;
  ControlLink link_;
  uv_async_t passive_async_{};  // workers report passive ejections through it
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::unique_ptr<HealthChecker>> checkers_;
  bool stopping_ = false;
};

}  // namespace smtplb
