#include "smtplb/proto/admin_routes.hpp"

namespace smtplb {

AdminRoute route_admin(std::string_view method, std::string_view path) {
  using K = AdminRoute::Kind;
  const bool get = method == "GET" || method == "HEAD";
  const bool post = method == "POST";
  AdminRoute r;
  auto read_only = [&](K kind) {
    r.kind = get ? kind : K::wrong_method;
    if (!get) r.allow = "GET, HEAD";
    return r;
  };
  if (path == "/metrics") return read_only(K::metrics);
  if (path == "/status") return read_only(K::status);
  if (path == "/clients") return read_only(K::clients);
  if (path == "/healthz") return read_only(K::healthz);
  auto change = [&](K kind) {
    r.kind = post ? kind : K::wrong_method;
    if (!post) r.allow = "POST";
    return r;
  };
  if (path == "/reload") return change(K::reload);
  if (path == "/state") return change(K::process_state);
  constexpr std::string_view kServers = "/servers/";
  if (path.starts_with(kServers)) {
    // POOL/SERVER/what, each part non-empty, nothing after.
    std::string_view rest = path.substr(kServers.size());
    const size_t a = rest.find('/');
    const size_t b = a == std::string_view::npos ? a : rest.find('/', a + 1);
    if (a == 0 || b == std::string_view::npos || b == a + 1 || rest.find('/', b + 1) != std::string_view::npos)
      return r;
    const std::string_view what = rest.substr(b + 1);
    if (what != "state" && what != "weight") return r;
    r.pool = rest.substr(0, a);
    r.server = rest.substr(a + 1, b - a - 1);
    r.kind = !post ? K::wrong_method : what == "state" ? K::server_state : K::server_weight;
    if (!post) r.allow = "POST";
    return r;
  }
  return r;
}

}  // namespace smtplb
