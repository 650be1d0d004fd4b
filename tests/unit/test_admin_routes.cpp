#include <doctest/doctest.h>

#include <string>
#include <utility>
#include <vector>

#include "smtplb/proto/admin_routes.hpp"

using smtplb::AdminRoute;
using smtplb::route_admin;
using K = AdminRoute::Kind;

TEST_CASE("admin routes: read-only paths") {
  for (const char* m : {"GET", "HEAD"}) {
    CHECK(route_admin(m, "/metrics").kind == K::metrics);
    CHECK(route_admin(m, "/status").kind == K::status);
    CHECK(route_admin(m, "/clients").kind == K::clients);
    CHECK(route_admin(m, "/healthz").kind == K::healthz);
  }
  for (const char* m : {"POST", "PUT", "DELETE", "get"}) {
    const AdminRoute r = route_admin(m, "/metrics");
    CHECK(r.kind == K::wrong_method);
    CHECK(r.allow == "GET, HEAD");
  }
}

TEST_CASE("admin routes: changes") {
  CHECK(route_admin("POST", "/reload").kind == K::reload);
  CHECK(route_admin("GET", "/reload").kind == K::wrong_method);
  CHECK(route_admin("GET", "/reload").allow == "POST");
  CHECK(route_admin("POST", "/state").kind == K::process_state);
  CHECK(route_admin("GET", "/state").kind == K::wrong_method);
  CHECK(route_admin("GET", "/state").allow == "POST");
  AdminRoute r = route_admin("POST", "/servers/postfix/pf1/state");
  CHECK(r.kind == K::server_state);
  CHECK(r.pool == "postfix");
  CHECK(r.server == "pf1");
  r = route_admin("POST", "/servers/postfix/pf-2.b/weight");
  CHECK(r.kind == K::server_weight);
  CHECK(r.server == "pf-2.b");
  r = route_admin("GET", "/servers/postfix/pf1/weight");
  CHECK(r.kind == K::wrong_method);
  CHECK(r.allow == "POST");
}

TEST_CASE("admin routes: not found") {
  for (const char* p : {"/", "/metrics/", "/status/x", "/servers", "/servers/", "/servers/p", "/servers/p/s",
                        "/servers/p/s/", "/servers/p/s/health", "/servers//s/state", "/servers/p//state",
                        "/servers/p/s/state/x", "/reload/now", "/METRICS", "/state/", "/state/x"})
    CHECK_MESSAGE(route_admin("POST", p).kind == K::not_found, p);
}

TEST_CASE("admin routes: query strings") {
  using P = std::vector<std::pair<std::string, std::string>>;
  P out;
  std::string error;
  CHECK(smtplb::parse_query("", out, error));
  CHECK(out.empty());
  CHECK(smtplb::parse_query("format=text&where=192.0.2.7", out, error));
  CHECK(out == P{{"format", "text"}, {"where", "192.0.2.7"}});
  CHECK(smtplb::parse_query("where=2001%3Adb8%3a%3A1&n=5", out, error));
  CHECK(out == P{{"where", "2001:db8::1"}, {"n", "5"}});
  CHECK(smtplb::parse_query("where=2001:db8::1", out, error));  // ':' needs no escape
  CHECK(out == P{{"where", "2001:db8::1"}});
  CHECK(smtplb::parse_query("a+b=c+d&flag&&x=", out, error));
  CHECK(out == P{{"a b", "c d"}, {"flag", ""}, {"x", ""}});
  CHECK(smtplb::parse_query("x=%41%7a%00", out, error));
  CHECK(out == P{{"x", std::string("Az\0", 3)}});
  for (const char* bad : {"x=%", "x=%4", "x=%G1", "%zz=1"}) {
    CHECK_FALSE_MESSAGE(smtplb::parse_query(bad, out, error), bad);
    CHECK(error == "bad % escape in the query");
  }
  CHECK_FALSE(smtplb::parse_query("=5", out, error));
  CHECK(error == "a query parameter without a name");
}
