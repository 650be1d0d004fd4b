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

bool parse_query(std::string_view query, std::vector<std::pair<std::string, std::string>>& out, std::string& error) {
  out.clear();
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  auto decode = [&](std::string_view in, std::string& to) {
    to.clear();
    for (size_t i = 0; i < in.size(); ++i) {
      if (in[i] == '+') {
        to += ' ';
      } else if (in[i] != '%') {
        to += in[i];
      } else {
        if (i + 2 >= in.size()) {
          error = "bad % escape in the query";
          return false;
        }
        const int a = hex(in[i + 1]), b = hex(in[i + 2]);
        if (a < 0 || b < 0) {
          error = "bad % escape in the query";
          return false;
        }
        to += char(a * 16 + b);
        i += 2;
      }
    }
    return true;
  };
  while (!query.empty()) {
    const size_t amp = query.find('&');
    const std::string_view kv = query.substr(0, amp);
    query = amp == std::string_view::npos ? std::string_view() : query.substr(amp + 1);
    if (kv.empty()) continue;  // "a=1&&b=2", a trailing '&'
    const size_t eq = kv.find('=');
    std::pair<std::string, std::string> p;
    if (!decode(kv.substr(0, eq), p.first)) return false;
    if (p.first.empty()) {
      error = "a query parameter without a name";
      return false;
    }
    if (eq != std::string_view::npos && !decode(kv.substr(eq + 1), p.second)) return false;
    out.push_back(std::move(p));
  }
  return true;
}

}  // namespace smtplb
