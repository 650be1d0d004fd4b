#include "control/admin.hpp"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "runtime/uv_util.hpp"
#include "smtplb/proto/http.hpp"

namespace smtplb {

namespace {

bool socket_in_use(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), std::min(path.size() + 1, sizeof addr.sun_path - 1));
  const bool live = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return live;
}

constexpr uint64_t kIdleTimeoutMs = 10'000;  // per request, and between keep-alive requests
constexpr size_t kMaxConnections = 64;
}  // namespace

struct AdminServer::Conn {
  union {
    uv_pipe_t pipe;
    uv_tcp_t tcp;
  } h;
  uv_timer_t timer;
  AdminServer* owner = nullptr;
  bool writable = false;
  bool closing = false;
  int open_handles = 2;
  http::RequestParser parser;
  std::string pending;  // received bytes not parsed yet (pipelined requests)
  // A deferred request's ticket (0: none). Until it is answered nothing more is read or
  // served on this connection, so responses stay in request order.
  uint64_t waiting = 0;
  bool waiting_keep_alive = false;
  bool waiting_head = false;
};

AdminServer::AdminServer(uv_loop_t* loop, Handler handler) : loop_(loop), handler_(std::move(handler)) {}

AdminServer::~AdminServer() = default;

bool AdminServer::start(const Config& cfg, std::string& error) {
  auto listen_cb = [](uv_stream_t* s, int status) {
    auto* ep = static_cast<Endpoint*>(s->data);
    ep->owner->on_connection(*ep, status);
  };
  if (!cfg.admin.socket.empty()) {
    auto* ep = new Endpoint;
    ep->owner = this;
    ep->writable = true;
    uv_pipe_init(loop_, &ep->h.pipe, 0);
    ep->h.pipe.data = ep;
    endpoints_.push_back(ep);
    // A socket left by a previous run would make bind fail: removed, unless a live process
    // still answers on it (another smtplb with the same path). Anything else is kept.
    int rc = 0;
    struct stat st {};
    if (lstat(cfg.admin.socket.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
      if (socket_in_use(cfg.admin.socket))
        rc = UV_EADDRINUSE;
      else
        ::unlink(cfg.admin.socket.c_str());
    }
    if (rc == 0) rc = uv_pipe_bind(&ep->h.pipe, cfg.admin.socket.c_str());
    if (rc == 0) rc = uv_listen(as_stream(&ep->h.pipe), 16, listen_cb);
    if (rc == 0 && ::chmod(cfg.admin.socket.c_str(), 0660) != 0) rc = uv_translate_sys_error(errno);
    if (rc != 0) {
      const std::string dir = cfg.admin.socket.substr(0, cfg.admin.socket.rfind('/'));
      struct stat dst {};
      const bool no_dir = !dir.empty() && ::stat(dir.c_str(), &dst) != 0;
      const std::string msg = "admin socket " + cfg.admin.socket + ": " +
                              (no_dir ? "directory " + dir + " does not exist" : std::string(uv_strerror(rc)));
      if (cfg.admin.socket_configured) {
        error = msg;
        return false;
      }
      // The default path: its directory comes from systemd's RuntimeDirectory=, so
      // outside systemd it is missing; smtplb runs on, but without `smtplb ctl`, which an
      // operator must hear about (a warning, as the documentation says).
      spdlog::warn("{} (admin API off; set admin.socket to {})", msg, no_dir ? "use it" : "a writable path");
    } else {
      socket_path_ = cfg.admin.socket;
      if (lstat(socket_path_.c_str(), &st) == 0) socket_id_ = {st.st_dev, st.st_ino};
      spdlog::info("admin API on unix socket {}", cfg.admin.socket);
    }
  }
  if (!cfg.admin.listen.empty()) {
    auto* ep = new Endpoint;
    ep->owner = this;
    ep->writable = false;
    uv_tcp_init(loop_, &ep->h.tcp);
    ep->h.tcp.data = ep;
    endpoints_.push_back(ep);
    int rc = uv_tcp_bind(&ep->h.tcp, cfg.admin_listen.sa(), 0);
    if (rc == 0) rc = uv_listen(as_stream(&ep->h.tcp), 16, listen_cb);
    if (rc != 0) {
      error = "admin listen " + cfg.admin.listen + ": " + uv_strerror(rc);
      return false;
    }
    SocketAddress bound;
    int len = sizeof bound.storage;
    uv_tcp_getsockname(&ep->h.tcp, reinterpret_cast<sockaddr*>(&bound.storage), &len);
    bound.len = socklen_t(len);
    spdlog::info("admin API (read-only) on http://{}/", bound.to_string());
  }
  return true;
}

void AdminServer::stop() {
  for (Endpoint* ep : endpoints_)
    uv_close(as_handle(&ep->h.pipe), [](uv_handle_t* h) { delete static_cast<Endpoint*>(h->data); });
  endpoints_.clear();
  while (!conns_.empty()) close_conn(conns_.back());
  // Removed only if it is still ours: another instance may have taken the path since.
  struct stat st {};
  if (!socket_path_.empty() && lstat(socket_path_.c_str(), &st) == 0 &&
      std::pair<uint64_t, uint64_t>{st.st_dev, st.st_ino} == socket_id_)
    ::unlink(socket_path_.c_str());
  socket_path_.clear();
}

void AdminServer::on_connection(Endpoint& ep, int status) {
  if (status < 0) return;
  auto* c = new Conn;
  c->owner = this;
  c->writable = ep.writable;
  if (ep.writable)
    uv_pipe_init(loop_, &c->h.pipe, 0);
  else
    uv_tcp_init(loop_, &c->h.tcp);
  c->h.pipe.data = c;
  uv_timer_init(loop_, &c->timer);
  c->timer.data = c;
  conns_.push_back(c);
  if (uv_accept(as_stream(&ep.h.pipe), as_stream(&c->h.pipe)) != 0 || conns_.size() > kMaxConnections) {
    close_conn(c);
    return;
  }
  start_reading(c);
}

void AdminServer::start_reading(Conn* c) {
  uv_timer_start(
      &c->timer, [](uv_timer_t* t) { static_cast<Conn*>(t->data)->owner->close_conn(static_cast<Conn*>(t->data)); },
      kIdleTimeoutMs, 0);
  uv_read_start(
      as_stream(&c->h.pipe),
      [](uv_handle_t* h, size_t, uv_buf_t* b) {
        auto* conn = static_cast<Conn*>(h->data);
        *b = uv_buf_init(conn->owner->buf_, sizeof conn->owner->buf_);
      },
      [](uv_stream_t* s, ssize_t n, const uv_buf_t* b) {
        auto* conn = static_cast<Conn*>(s->data);
        if (n < 0) return conn->owner->close_conn(conn);
        if (n == 0) return;
        conn->pending.append(b->base, size_t(n));
        conn->owner->serve(conn);
      });
}

void AdminServer::close_conn(Conn* c) {
  if (c->closing) return;
  c->closing = true;
  conns_.erase(std::find(conns_.begin(), conns_.end(), c));
  auto closed = [](uv_handle_t* h) {
    auto* conn = static_cast<Conn*>(h->data);
    if (--conn->open_handles == 0) delete conn;
  };
  uv_close(as_handle(&c->h.pipe), closed);
  uv_close(as_handle(&c->timer), closed);
}

namespace {

struct Write {
  uv_write_t req;
  std::string data;
  bool close_after = false;
};

}  // namespace

void AdminServer::serve(Conn* c) {
  while (!c->closing && !c->waiting && !c->pending.empty()) {
    size_t consumed = 0;
    const auto st = c->parser.feed(c->pending, consumed);
    if (st == http::RequestParser::Status::need_more) {
      c->pending.clear();  // the parser keeps what it needs
      return;
    }
    c->pending.erase(0, consumed);
    AdminResponse resp;
    bool keep_alive = false;
    size_t content_length = 0;
    if (st == http::RequestParser::Status::error) {
      resp.status = c->parser.status_code();
      resp.body = c->parser.error() + "\n";
      content_length = resp.body.size();
    } else {
      const http::Request& req = c->parser.request();
      keep_alive = req.keep_alive;
      const size_t q = req.target.find('?');
      Request r{req.method, req.path,
                q == std::string::npos ? std::string_view() : std::string_view(req.target).substr(q + 1), req.body,
                ++next_ticket_};
      if (!c->writable && req.method != "GET" && req.method != "HEAD") {
        resp.status = 403;
        resp.body = "this endpoint is read-only; use the admin unix socket for changes\n";
      } else {
        resp = handler_(r);
      }
      if (resp.later) {
        c->waiting = r.ticket;
        c->waiting_keep_alive = keep_alive;
        c->waiting_head = req.method == "HEAD";
        c->parser.reset();
        // Nothing more is read meanwhile (a client cannot pile up pipelined bytes), and
        // the idle timeout does not count our own wait against the client.
        uv_read_stop(as_stream(&c->h.pipe));
        uv_timer_stop(&c->timer);
        return;
      }
      content_length = resp.body.size();  // HEAD announces what GET would send
      if (req.method == "HEAD") resp.body.clear();
    }
    if (!send(c, resp, content_length, keep_alive)) return;
  }
}

void AdminServer::complete(uint64_t ticket, AdminResponse resp) {
  auto it = std::find_if(conns_.begin(), conns_.end(), [ticket](const Conn* c) { return c->waiting == ticket; });
  if (ticket == 0 || it == conns_.end()) return;  // the client went away (or we stopped)
  Conn* c = *it;
  c->waiting = 0;
  const size_t content_length = resp.body.size();
  if (c->waiting_head) resp.body.clear();
  if (!send(c, resp, content_length, c->waiting_keep_alive)) return;
  start_reading(c);
  serve(c);  // requests that came behind the deferred one
}

bool AdminServer::send(Conn* c, const AdminResponse& resp, size_t content_length, bool keep_alive) {
  auto* w = new Write;
  w->close_after = !keep_alive;
  w->data = "HTTP/1.1 " + std::to_string(resp.status) + " " + http::reason(resp.status) + "\r\n" +
            "Content-Type: " + resp.content_type + "\r\nContent-Length: " + std::to_string(content_length) + "\r\n" +
            (resp.allow.empty() ? "" : "Allow: " + resp.allow + "\r\n") + (keep_alive ? "" : "Connection: close\r\n") +
            "Cache-Control: no-store\r\n\r\n" + resp.body;
  w->req.data = w;
  uv_buf_t b = uv_buf_init(w->data.data(), unsigned(w->data.size()));
  const int rc = uv_write(&w->req, as_stream(&c->h.pipe), &b, 1, [](uv_write_t* req, int status) {
    auto* wr = static_cast<Write*>(req->data);
    auto* conn = static_cast<Conn*>(req->handle->data);
    const bool close_after = wr->close_after;
    delete wr;
    if (status == UV_ECANCELED) return;
    if (status < 0 || close_after) conn->owner->close_conn(conn);
  });
  if (rc != 0) {
    delete w;
    close_conn(c);
    return false;
  }
  c->parser.reset();
  if (!keep_alive) {
    uv_read_stop(as_stream(&c->h.pipe));
    return false;
  }
  uv_timer_start(
      &c->timer, [](uv_timer_t* t) { static_cast<Conn*>(t->data)->owner->close_conn(static_cast<Conn*>(t->data)); },
      kIdleTimeoutMs, 0);
  return true;
}

}  // namespace smtplb
