#pragma once
// The admin HTTP/1.1 server on the control loop: a unix socket with the full API and an
// optional read-only TCP endpoint. Requests are parsed by the pure, bounded
// http::RequestParser; a slow or hostile client is cut off by an idle timeout and a
// connection limit and never blocks the loop.
#include <uv.h>

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "smtplb/config/config.hpp"

namespace smtplb {

struct AdminResponse {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
  std::string allow;  // for 405: the methods the path takes
  // The answer comes later, through AdminServer::complete() with the request's ticket
  // (a reload waiting for host names). Everything else is ignored.
  bool later = false;
  static AdminResponse deferred() {
    AdminResponse r;
    r.later = true;
    return r;
  }
};

class AdminServer {
 public:
  // The API, answered by the owner. `writable` is false on the TCP endpoint.
  struct Request {
    std::string_view method;
    std::string_view path;   // without the query
    std::string_view query;  // after '?', may be empty
    std::string_view body;
    uint64_t ticket = 0;  // names this request in complete()
  };
  using Handler = std::function<AdminResponse(const Request&)>;

  AdminServer(uv_loop_t* loop, Handler handler);
  ~AdminServer();
  AdminServer(const AdminServer&) = delete;
  AdminServer& operator=(const AdminServer&) = delete;

  // Opens the endpoints of `cfg`. False with `error` set when a configured endpoint
  // cannot be opened (the default socket path failing is only a warning).
  bool start(const Config& cfg, std::string& error);
  // Closes the endpoints and every connection; the loop must run once more.
  void stop();
  // Sends the answer to a request the handler deferred. Requests pipelined behind it on
  // the same connection were held back and are served now, in order. A connection
  // closed meanwhile is simply not found.
  void complete(uint64_t ticket, AdminResponse resp);

 private:
  struct Conn;
  struct Endpoint {
    union {
      uv_pipe_t pipe;
      uv_tcp_t tcp;
    } h;
    AdminServer* owner = nullptr;
    bool writable = false;
  };

  void on_connection(Endpoint& ep, int status);
  void close_conn(Conn* c);
  void serve(Conn* c);
  void start_reading(Conn* c);
  // Queues one response; false when the connection is done with (closing or closed).
  bool send(Conn* c, const AdminResponse& resp, size_t content_length, bool keep_alive);

  uv_loop_t* loop_;
  Handler handler_;
  std::vector<Endpoint*> endpoints_;  // freed in their close callbacks
  std::vector<Conn*> conns_;
  uint64_t next_ticket_ = 0;
  std::string socket_path_;                        // to unlink at stop
  std::pair<uint64_t, uint64_t> socket_id_{0, 0};  // device and inode of the socket we bound
  char buf_[16 * 1024];                            // read buffer, shared: one loop thread
};

}  // namespace smtplb
