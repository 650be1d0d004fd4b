// The storm mode's load generator (scripts/bench.py --tests storm): opens COUNT SMTP
// connections to 127.0.0.1:PORT at RATE per second from a start time, and for each one
// times the greeting, sends QUIT, reads the 221 and closes. One epoll set, non-blocking
// connects, nothing else on the path: the Python client it replaces spent more time per
// connection than the proxies it measured, so it could not open a storm of 20 000 in one
// second on a 2-core machine. Same results and JSON as bench.py's `--helper client storm`:
//   {"outcomes": {"served": N, "reply 421 4.3.2": M, ...}, "first_connect": T,
//    "last_connect": T, "unfinished": 0, "greet_ms": [...]}
// (times on CLOCK_MONOTONIC, as Python's time.monotonic()).
//   usage: storm_client --port P --count N [--rate R] [--start T] [--source ADDR]
//                       [--first-timeout S] [--reply-timeout S]
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace {

double now() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) / 1e9;
}

struct Conn {
  int fd = -1;
  double t0 = 0;
  double t_first = -1;  // seconds from connect() to the end of the first reply (or the end)
  double deadline = 0;
  int step = 0;  // 0: waiting for the greeting; 1: QUIT sent, waiting for 221
  std::string buf;
};

struct Options {
  int port = 0;
  long count = 0;
  double rate = 0;  // connects per second; 0: all at once
  double start = 0;
  std::string source;
  double first_timeout = 15;
  double reply_timeout = 15;
};

std::string errno_name(int e) {
  switch (e) {
    case ECONNREFUSED:
      return "ECONNREFUSED";
    case ECONNRESET:
      return "ECONNRESET";
    case EADDRNOTAVAIL:
      return "EADDRNOTAVAIL";
    case EMFILE:
      return "EMFILE";
    case ENFILE:
      return "ENFILE";
    case ETIMEDOUT:
      return "ETIMEDOUT";
    case ENOBUFS:
      return "ENOBUFS";
    default:
      return std::to_string(e);
  }
}

std::string json_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char b[8];
      std::snprintf(b, sizeof b, "\\u%04x", c);
      out += b;
    } else {
      out += c;
    }
  }
  return out;
}

[[noreturn]] void usage() {
  std::fprintf(stderr,
               "usage: storm_client --port P --count N [--rate R] [--start T] [--source ADDR]\n"
               "                    [--first-timeout S] [--reply-timeout S]\n");
  std::exit(64);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (i + 1 >= argc) usage();
    const char* v = argv[++i];
    if (a == "--port")
      o.port = std::atoi(v);
    else if (a == "--count")
      o.count = std::atol(v);
    else if (a == "--rate")
      o.rate = std::atof(v);
    else if (a == "--start")
      o.start = std::atof(v);
    else if (a == "--source")
      o.source = v;
    else if (a == "--first-timeout")
      o.first_timeout = std::atof(v);
    else if (a == "--reply-timeout")
      o.reply_timeout = std::atof(v);
    else
      usage();
  }
  if (o.port <= 0 || o.port > 65535 || o.count <= 0) usage();

  // As many descriptors as the hard limit allows: every connection may be open at once.
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }

  sockaddr_in dst{};
  dst.sin_family = AF_INET;
  dst.sin_port = htons(uint16_t(o.port));
  dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sockaddr_in src{};
  src.sin_family = AF_INET;
  if (!o.source.empty() && inet_pton(AF_INET, o.source.c_str(), &src.sin_addr) != 1) {
    std::fprintf(stderr, "storm_client: bad --source %s\n", o.source.c_str());
    return 64;
  }

  const int ep = epoll_create1(EPOLL_CLOEXEC);
  if (ep < 0) {
    std::perror("storm_client: epoll_create1");
    return 1;
  }
  std::map<int, Conn> live;  // by descriptor
  std::map<std::string, long> outcomes;
  std::vector<double> greet_ms;
  greet_ms.reserve(size_t(o.count));
  double first_connect = 0, last_connect = 0;

  auto finish = [&](Conn& c, const std::string& outcome, double t) {
    if (c.t_first < 0) c.t_first = t - c.t0;
    if (outcome == "served") greet_ms.push_back(std::round(c.t_first * 1e6) / 1e3);
    ++outcomes[outcome];
    const int fd = c.fd;
    ::close(fd);  // also leaves the epoll set
    live.erase(fd);
  };

  auto open_one = [&]() {
    const double t = now();
    if (first_connect == 0) first_connect = t;
    last_connect = t;
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
      ++outcomes["connect-" + errno_name(errno)];
      return;
    }
    if (!o.source.empty()) {
      const int one = 1;
      setsockopt(fd, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
      if (bind(fd, reinterpret_cast<sockaddr*>(&src), sizeof src) != 0) {
        ++outcomes["connect-" + errno_name(errno)];
        ::close(fd);
        return;
      }
    }
    Conn& c = live[fd];
    c.fd = fd;
    c.t0 = t;
    c.deadline = t + o.first_timeout;
    if (connect(fd, reinterpret_cast<sockaddr*>(&dst), sizeof dst) != 0 && errno != EINPROGRESS) {
      const int e = errno;
      finish(c, e == ECONNREFUSED ? "refused" : "connect-" + errno_name(e), now());
      return;
    }
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLRDHUP;
    ev.data.fd = fd;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) finish(c, "connect-" + errno_name(errno), now());
  };

  // Acts on every complete reply in the buffer; false once the connection is finished.
  auto advance = [&](Conn& c, double t) -> bool {
    for (;;) {
      size_t pos = 0, end = std::string::npos;
      std::string_view first_line;
      while (true) {
        const size_t i = c.buf.find("\r\n", pos);
        if (i == std::string::npos) break;
        const std::string_view line(c.buf.data() + pos, i - pos);
        if (pos == 0) first_line = line;
        pos = i + 2;
        if (line.size() < 4 || line[3] != '-') {
          end = pos;
          break;
        }
      }
      if (end == std::string::npos) return true;
      const std::string code(first_line.substr(0, 9));  // e.g. "421 4.3.2"; first_line dies with the erase
      c.buf.erase(0, end);
      if (c.t_first < 0) c.t_first = t - c.t0;
      if (c.step == 0) {
        if (!code.starts_with("220")) {
          finish(c, "reply " + code, t);
          return false;
        }
        static constexpr std::string_view kQuit = "QUIT\r\n";
        if (::send(c.fd, kQuit.data(), kQuit.size(), MSG_NOSIGNAL) != ssize_t(kQuit.size())) {
          finish(c, std::string("broken: ") + (errno == ECONNRESET ? "reset" : "write-" + errno_name(errno)), t);
          return false;
        }
        c.step = 1;
        c.deadline = t + o.reply_timeout;
        continue;
      }
      finish(c, code.starts_with("221") ? "served" : "broken: " + code + " at step 1", t);
      return false;
    }
  };

  if (o.start > 0) {
    const double wait = o.start - now();
    if (wait > 0) {
      timespec ts{time_t(wait), long((wait - std::floor(wait)) * 1e9)};
      nanosleep(&ts, nullptr);
    }
  }
  const double t_begin = now();
  double next_open = t_begin, last_scan = t_begin;
  long opened = 0;
  epoll_event events[256];
  char rbuf[4096];
  while (opened < o.count || !live.empty()) {
    double t = now();
    while (opened < o.count && (o.rate <= 0 || next_open <= t)) {
      open_one();
      ++opened;
      next_open += o.rate > 0 ? 1.0 / o.rate : 0;
    }
    // Connects are paced to the millisecond: the next one is due within 1 ms or now.
    int timeout_ms = 50;
    if (opened < o.count) timeout_ms = next_open - now() > 0.001 ? 1 : 0;
    const int n = epoll_wait(ep, events, 256, timeout_ms);
    t = now();
    for (int i = 0; i < n; ++i) {
      auto it = live.find(events[i].data.fd);
      if (it == live.end()) continue;
      Conn& c = it->second;
      for (;;) {
        const ssize_t r = ::recv(c.fd, rbuf, sizeof rbuf, 0);
        if (r > 0) {
          c.buf.append(rbuf, size_t(r));
          if (!advance(c, t)) break;
          if (size_t(r) < sizeof rbuf) break;  // drained (level-triggered: more wakes us again)
          continue;
        }
        if (r == 0) {
          finish(c, c.step == 0 && c.t_first < 0 ? "closed" : "broken: closed", t);
          break;
        }
        if (errno == EAGAIN || errno == EINTR) break;
        const int e = errno;
        const std::string what = e == ECONNRESET ? "reset" : e == ECONNREFUSED ? "refused" : errno_name(e);
        finish(c, c.t_first < 0 ? what : "broken: " + what, t);
        break;
      }
    }
    if (t - last_scan > 0.1) {
      last_scan = t;
      std::vector<int> expired;
      for (auto& [fd, c] : live)
        if (c.deadline < t) expired.push_back(fd);
      for (int fd : expired) {
        Conn& c = live[fd];
        finish(c, c.t_first < 0 && c.step == 0 ? "timeout" : "broken: timeout", t);
      }
    }
  }

  std::string out = "{\"outcomes\": {";
  bool first = true;
  for (const auto& [k, v] : outcomes) {
    out += (first ? "\"" : ", \"") + json_escape(k) + "\": " + std::to_string(v);
    first = false;
  }
  char b[96];
  std::snprintf(b, sizeof b, "}, \"first_connect\": %.6f, \"last_connect\": %.6f, \"unfinished\": 0, \"greet_ms\": [",
                first_connect, last_connect);
  out += b;
  for (size_t i = 0; i < greet_ms.size(); ++i) {
    std::snprintf(b, sizeof b, "%s%.3f", i ? ", " : "", greet_ms[i]);
    out += b;
  }
  out += "]}\n";
  std::fwrite(out.data(), 1, out.size(), stdout);
  return 0;
}
