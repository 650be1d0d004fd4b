#include "cli/ctl.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>

#include "cli/cli.hpp"
#include "smtplb/config/config.hpp"
#include "smtplb/config/duration.hpp"

namespace smtplb {

namespace {

constexpr const char* kCtlUsage =
    "usage: smtplb ctl [--socket PATH | -f CONFIG] COMMAND\n"
    "  status                   listeners and servers with health, admin state, sessions\n"
    "  drain POOL/SERVER        no new sessions; open ones continue; checks go on\n"
    "  ready POOL/SERVER        back to normal\n"
    "  drain [--wait QUIET [--timeout MAX]]\n"
    "                           the whole process: /healthz answers 503 (keepalived moves\n"
    "                           the address away) while new sessions are still served;\n"
    "                           --wait returns once no new session came for QUIET (e.g. 5s),\n"
    "                           exit 1 after MAX (default 5m)\n"
    "  ready                    undo a process drain\n"
    "  maint POOL/SERVER        no new sessions, no checks\n"
    "  weight POOL/SERVER N     runtime weight 0..256\n"
    "  clients [N]              the N client keys (default 20) with the most open sessions,\n"
    "                           then the most recent sessions by the rate limiter\n"
    "  where ADDRESS            the server each algorithm = \"source\" pool sends that client\n"
    "                           to now, its key (the masked address) and its preferences\n"
    "  reload                   reload the configuration file (like SIGHUP)\n"
    "The socket defaults to admin.socket of the configuration file (default\n"
    "/etc/smtplb/smtplb.toml), or /run/smtplb/admin.sock.\n";

int usage(const std::string& msg) {
  std::fprintf(stderr, "smtplb ctl: %s\n%s", msg.c_str(), kCtlUsage);
  return kExitUsage;
}

// One request over a fresh connection; returns the HTTP status (0 on a transport error,
// with `body` saying why).
int request(const std::string& socket_path, const std::string& method, const std::string& path,
            const std::string& payload, std::string& body) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (fd < 0 || socket_path.size() >= sizeof addr.sun_path) {
    body = "cannot use socket " + socket_path;
    if (fd >= 0) ::close(fd);
    return 0;
  }
  std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    body = "cannot connect to " + socket_path + ": " + std::strerror(errno) + " (is smtplb running? see --socket)";
    ::close(fd);
    return 0;
  }
  const std::string req = method + " " + path + " HTTP/1.1\r\nHost: smtplb\r\nConnection: close\r\nContent-Length: " +
                          std::to_string(payload.size()) + "\r\n\r\n" + payload;
  size_t off = 0;
  while (off < req.size()) {
    const ssize_t n = ::send(fd, req.data() + off, req.size() - off, MSG_NOSIGNAL);
    if (n <= 0) {
      body = std::string("write: ") + std::strerror(errno);
      ::close(fd);
      return 0;
    }
    off += size_t(n);
  }
  std::string resp;
  char buf[16384];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 30000) <= 0) {
      body = "no answer from smtplb within 30 s";
      ::close(fd);
      return 0;
    }
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    resp.append(buf, size_t(n));
  }
  ::close(fd);
  const size_t sp = resp.find(' ');
  const size_t hdr_end = resp.find("\r\n\r\n");
  if (resp.rfind("HTTP/1.", 0) != 0 || sp == std::string::npos || hdr_end == std::string::npos) {
    body = "malformed answer from smtplb";
    return 0;
  }
  body = resp.substr(hdr_end + 4);
  return std::atoi(resp.c_str() + sp + 1);
}

struct ListenerCounts {
  uint64_t accepted = 0;  // smtplb_listener_connections_total, all listeners
  uint64_t open = 0;      // smtplb_listener_current_connections
  bool draining = false;  // smtplb_draining
};

// Sums the listener samples of a /metrics text (Prometheus text format: one sample a line,
// the value after the last space).
ListenerCounts parse_counts(const std::string& metrics) {
  ListenerCounts c;
  size_t pos = 0;
  while (pos < metrics.size()) {
    size_t end = metrics.find('\n', pos);
    if (end == std::string::npos) end = metrics.size();
    const std::string_view line(metrics.data() + pos, end - pos);
    pos = end + 1;
    const size_t sp = line.rfind(' ');
    if (line.empty() || line[0] == '#' || sp == std::string_view::npos) continue;
    const auto value = uint64_t(std::strtod(std::string(line.substr(sp + 1)).c_str(), nullptr));
    if (line.starts_with("smtplb_listener_connections_total{"))
      c.accepted += value;
    else if (line.starts_with("smtplb_listener_current_connections{"))
      c.open += value;
    else if (line.starts_with("smtplb_draining "))
      c.draining = value != 0;
  }
  return c;
}

// After a process drain: polls the listeners' counts until no new connection was accepted
// for `quiet` (the address has moved, or the clients are gone), at most `limit`.
int wait_quiet(const std::string& socket_path, std::chrono::milliseconds quiet, std::chrono::milliseconds limit) {
  using clock = std::chrono::steady_clock;
  std::string body;
  auto read = [&](ListenerCounts& c) {
    const int status = request(socket_path, "GET", "/metrics", "", body);
    if (status != 200) {
      std::fprintf(stderr, "smtplb ctl: %s%s\n", status ? ("error " + std::to_string(status) + ": ").c_str() : "",
                   body.c_str());
      return false;
    }
    c = parse_counts(body);
    return true;
  };
  ListenerCounts first;
  if (!read(first)) return kExitFailure;
  std::printf("waiting until no new session arrives for %s (at most %s)\n", format_duration(quiet).c_str(),
              format_duration(limit).c_str());
  std::fflush(stdout);
  const auto start = clock::now();
  auto last_new = start;
  uint64_t accepted = first.accepted;
  unsigned long long during = 0;  // increments seen (a reload that removes a listener lowers the sum)
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ListenerCounts c;
    if (!read(c)) return kExitFailure;
    const auto now = clock::now();
    if (!c.draining) {
      std::fprintf(stderr, "smtplb ctl: smtplb is no longer draining (smtplb ctl ready?)\n");
      return kExitFailure;
    }
    if (c.accepted != accepted) {
      if (c.accepted > accepted) during += c.accepted - accepted;
      accepted = c.accepted;
      last_new = now;
    }
    if (now - last_new >= quiet) {
      std::printf("no new session for %s: %llu accepted while waiting, %llu still open\n",
                  format_duration(quiet).c_str(), during, (unsigned long long)c.open);
      return kExitOk;
    }
    if (now - start >= limit) {
      std::fprintf(stderr,
                   "smtplb ctl: new sessions still arrive after %s (%llu accepted while waiting): has the address "
                   "moved to the other node?\n",
                   format_duration(limit).c_str(), during);
      return kExitFailure;
    }
  }
}

}  // namespace

int run_ctl(const std::vector<std::string>& args) {
  std::string socket_path, config_path = kDefaultConfig;
  bool explicit_config = false;
  std::vector<std::string> words;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--socket" || a == "-s") {
      if (++i >= args.size()) return usage("--socket needs a path");
      socket_path = args[i];
    } else if (a == "-f" || a == "--config") {
      if (++i >= args.size()) return usage(a + " needs a file name");
      config_path = args[i];
      explicit_config = true;
    } else if (a == "-h" || a == "--help") {
      std::fputs(kCtlUsage, stdout);
      return kExitOk;
    } else {
      words.push_back(a);
    }
  }
  if (socket_path.empty()) {
    ConfigLoad load = load_config_file(config_path);
    if (load.ok()) {
      socket_path = load.config->admin.socket;
    } else if (explicit_config) {
      for (const auto& e : load.errors) std::fprintf(stderr, "%s\n", e.to_string().c_str());
      return kExitConfig;
    } else {
      socket_path = AdminConfig{}.socket;
    }
    if (socket_path.empty()) return usage("admin.socket is off in " + config_path + "; use --socket");
  }
  if (words.empty()) return usage("a command is needed");
  const std::string& cmd = words[0];
  std::string method = "GET", path, payload;
  std::optional<std::chrono::milliseconds> wait_for, wait_limit;
  const bool process_state = (cmd == "drain" || cmd == "ready") && (words.size() == 1 || words[1].starts_with("--"));
  if (process_state) {
    for (size_t i = 1; i < words.size(); i += 2) {
      const std::string& opt = words[i];
      if (cmd != "drain" || (opt != "--wait" && opt != "--timeout"))
        return usage("unknown option for " + cmd + ": " + opt);
      if (i + 1 >= words.size()) return usage(opt + " needs a duration such as 5s");
      const auto d = parse_duration(words[i + 1]);
      if (!d || d->count() <= 0) return usage(opt + " needs a duration such as 5s, not " + words[i + 1]);
      (opt == "--wait" ? wait_for : wait_limit) = *d;
    }
    if (wait_limit && !wait_for) return usage("--timeout goes with --wait");
    method = "POST";
    path = "/state";
    payload = cmd;
  } else if (cmd == "status" && words.size() == 1) {
    path = "/status?format=text";
  } else if (cmd == "clients" && words.size() <= 2) {
    path = "/clients?format=text";
    if (words.size() == 2) path += "&n=" + words[1];
  } else if (cmd == "where" && words.size() == 2) {
    path = "/status?format=text&where=";
    for (unsigned char c : words[1]) {
      if (std::isalnum(c) || c == '.' || c == ':' || c == '-') {
        path += char(c);
      } else {
        char esc[4];
        std::snprintf(esc, sizeof esc, "%%%02X", c);
        path += esc;
      }
    }
  } else if (cmd == "reload" && words.size() == 1) {
    method = "POST";
    path = "/reload";
  } else if ((cmd == "drain" || cmd == "ready" || cmd == "maint") && words.size() == 2) {
    if (words[1].find('/') == std::string::npos) return usage("name the server as POOL/SERVER");
    method = "POST";
    path = "/servers/" + words[1] + "/state";
    payload = cmd;
  } else if (cmd == "weight" && words.size() == 3) {
    if (words[1].find('/') == std::string::npos) return usage("name the server as POOL/SERVER");
    method = "POST";
    path = "/servers/" + words[1] + "/weight";
    payload = words[2];
  } else {
    return usage("unknown command or wrong arguments: " + cmd);
  }
  std::string body;
  const int status = request(socket_path, method, path, payload, body);
  if (status >= 200 && status < 300) {
    std::fputs(body.c_str(), stdout);
    if (wait_for) {
      std::fflush(stdout);
      return wait_quiet(socket_path, *wait_for, wait_limit.value_or(std::chrono::minutes(5)));
    }
    return kExitOk;
  }
  std::fprintf(stderr, "smtplb ctl: %s%s", status ? ("error " + std::to_string(status) + ": ").c_str() : "",
               body.c_str());
  if (body.empty() || body.back() != '\n') std::fputc('\n', stderr);
  return kExitFailure;
}

}  // namespace smtplb
