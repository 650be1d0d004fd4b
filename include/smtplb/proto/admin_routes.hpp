#pragma once
// The admin API's route table, pure: which handler a method and path select, or why
// none does (404, or 405 with the methods the path takes).
#include <string_view>

namespace smtplb {

struct AdminRoute {
  enum class Kind {
    metrics,
    status,
    clients,
    healthz,
    reload,
    process_state,
    server_state,
    server_weight,
    not_found,
    wrong_method
  };
  Kind kind = Kind::not_found;
  std::string_view pool;  // server_state / server_weight
  std::string_view server;
  std::string_view allow;  // wrong_method: the methods to list in Allow
};

// GET/HEAD /metrics /status /clients /healthz; POST /reload, /state (the process's: drain,
// ready), /servers/POOL/SERVER/state|weight.
AdminRoute route_admin(std::string_view method, std::string_view path);

}  // namespace smtplb
