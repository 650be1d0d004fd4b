#pragma once
// The admin API's route table, pure: which handler a method and path select, or why
// none does (404, or 405 with the methods the path takes).
#include <string>
#include <string_view>
#include <utility>
#include <vector>

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

// A query string ("n=5&format=text") as name/value pairs in order, values percent-decoded
// ("where=2001%3Adb8%3A%3A1"; '+' is a space); a parameter without '=' has an empty value.
// False (and `error` says why) on an empty name or a bad % escape.
bool parse_query(std::string_view query, std::vector<std::pair<std::string, std::string>>& out, std::string& error);

}  // namespace smtplb
