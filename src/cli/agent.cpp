#include "cli/agent.hpp"

#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>

#include "cli/cli.hpp"
#include "smtplb/config/config.hpp"
#include "smtplb/lb/queue_weight.hpp"

namespace smtplb {

namespace {

constexpr const char* kDefaultAgentConfig = "/etc/smtplb/agent.toml";
constexpr const char* kAgentUsage =
    "usage: smtplb agent [-f|--config FILE] [-c|--check] [--once]\n"
    "\n"
    "  -f, --config FILE    agent configuration (default /etc/smtplb/agent.toml)\n"
    "  -c, --check          validate the configuration and exit\n"
    "      --once           count the queue, print the answer and exit\n";

volatile sig_atomic_t g_stop = 0;

// Messages in one queue: the regular files below it (deferred/ and the others may be
// hashed into subdirectories). Nothing is opened or read: names only.
std::optional<uint64_t> count_files(const std::filesystem::path& dir, std::string& error) {
  std::error_code ec;
  std::filesystem::recursive_directory_iterator it(dir, ec), end;
  if (ec) {
    error = dir.string() + ": " + ec.message();
    return std::nullopt;
  }
  uint64_t n = 0;
  for (; it != end; it.increment(ec)) {
    if (ec) {
      error = dir.string() + ": " + ec.message();
      return std::nullopt;
    }
    std::error_code fe;
    if (it->is_regular_file(fe)) ++n;
  }
  if (ec) {
    error = dir.string() + ": " + ec.message();
    return std::nullopt;
  }
  return n;
}

std::optional<QueueCounts> count_queue(const std::string& queue_directory, std::string& error) {
  const std::filesystem::path base(queue_directory);
  QueueCounts c;
  auto in = count_files(base / "incoming", error);
  if (!in) return std::nullopt;
  auto ac = count_files(base / "active", error);
  if (!ac) return std::nullopt;
  auto de = count_files(base / "deferred", error);
  if (!de) return std::nullopt;
  c.incoming = *in;
  c.active = *ac;
  c.deferred = *de;
  return c;
}

std::string words_of(const std::string& answer) {
  return answer.substr(0, answer.find(" #"));
}

}  // namespace

int run_agent(const std::vector<std::string>& args) {
  std::string path = kDefaultAgentConfig;
  bool check = false, once = false;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    if ((a == "-f" || a == "--config") && i + 1 < args.size()) {
      path = args[++i];
    } else if (a.rfind("--config=", 0) == 0) {
      path = a.substr(9);
    } else if (a == "-c" || a == "--check") {
      check = true;
    } else if (a == "--once") {
      once = true;
    } else if (a == "-h" || a == "--help") {
      std::fputs(kAgentUsage, stdout);
      return kExitOk;
    } else {
      std::fprintf(stderr, "smtplb agent: unknown argument '%s'\n%s", a.c_str(), kAgentUsage);
      return kExitUsage;
    }
  }
  const AgentConfigLoad load = load_agent_config_file(path);
  if (!load.ok()) {
    for (const auto& e : load.errors) std::fprintf(stderr, "%s\n", e.to_string().c_str());
    return kExitConfig;
  }
  const AgentConfig& cfg = *load.config;
  if (check) {
    std::printf("agent configuration file %s test is successful\n", path.c_str());
    return kExitOk;
  }
  std::string error;
  if (once) {
    auto c = count_queue(cfg.queue_directory, error);
    if (!c) {
      std::fprintf(stderr, "smtplb agent: cannot count the queue: %s\n", error.c_str());
      return kExitFailure;
    }
    std::printf("%s\n", queue_agent_answer(cfg.queue, *c).c_str());
    return kExitOk;
  }

  const int fd = ::socket(cfg.bind.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int one = 1;
  if (fd < 0 || ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
      ::bind(fd, cfg.bind.sa(), cfg.bind.len) != 0 || ::listen(fd, 64) != 0) {
    std::fprintf(stderr, "smtplb agent: cannot listen on %s: %s\n", cfg.bind.to_string().c_str(), std::strerror(errno));
    if (fd >= 0) ::close(fd);
    return kExitFailure;
  }
  SocketAddress bound;
  bound.len = sizeof bound.storage;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound.storage), &bound.len);

  struct sigaction sa {};
  sa.sa_handler = [](int) { g_stop = 1; };
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  std::fprintf(stderr,
               "smtplb agent: listening on %s; queue %s counted every %lld ms (low %llu, high %llu, floor %u%%, "
               "drain %llu)\n",
               bound.to_string().c_str(), cfg.queue_directory.c_str(), (long long)cfg.refresh.count(),
               (unsigned long long)cfg.queue.low, (unsigned long long)cfg.queue.high, cfg.queue.floor,
               (unsigned long long)cfg.queue.drain);

  using Clock = std::chrono::steady_clock;
  std::string answer;  // empty: the queue could not be counted; queries get no reply
  bool failing = false;
  Clock::time_point next = Clock::now();
  while (!g_stop) {
    if (Clock::now() >= next) {
      next = Clock::now() + cfg.refresh;
      auto c = count_queue(cfg.queue_directory, error);
      if (!c) {
        // No reply rather than a guess: smtplb keeps the last answer it understood.
        if (!failing) std::fprintf(stderr, "smtplb agent: cannot count the queue: %s\n", error.c_str());
        failing = true;
        answer.clear();
      } else {
        const std::string now = queue_agent_answer(cfg.queue, *c);
        if (failing || words_of(now) != words_of(answer)) std::fprintf(stderr, "smtplb agent: %s\n", now.c_str());
        failing = false;
        answer = now;
      }
      std::fflush(stderr);
    }
    const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next - Clock::now()).count();
    pollfd p{fd, POLLIN, 0};
    const int rc = ::poll(&p, 1, int(std::max<int64_t>(0, wait)));
    if (rc <= 0) continue;  // the refresh time, or a signal
    const int c = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (c < 0) continue;
    if (!answer.empty()) {
      const std::string line = answer + "\n";
      // One short line into an empty socket buffer: it fits; a peer that is gone is not
      // our problem.
      (void)::send(c, line.data(), line.size(), MSG_NOSIGNAL);
    }
    ::close(c);
  }
  ::close(fd);
  std::fprintf(stderr, "smtplb agent: stopped\n");
  return kExitOk;
}

}  // namespace smtplb
