// The Resolver on a real loop (libuv's thread pool and the system resolver): names that
// /etc/hosts or a literal answer, so no DNS server is needed.
#include <doctest/doctest.h>

#include <uv.h>

#include <string>
#include <vector>

#include "control/resolver.hpp"
#include "smtplb/config/config.hpp"

using smtplb::HostLookup;
using smtplb::Millis;
using smtplb::Resolver;

namespace {

struct Loop {
  uv_loop_t loop{};
  Loop() { uv_loop_init(&loop); }
  ~Loop() {
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&loop) == 0);  // nothing left behind: every request and handle ended
  }
};

}  // namespace

TEST_CASE("resolver: one callback with every answer, in the order asked") {
  Loop l;
  Resolver r(&l.loop);
  int calls = 0;
  std::vector<HostLookup> got;
  r.start({"localhost", "127.0.0.2", "bad..name.invalid"}, Millis(10000), [&](std::vector<HostLookup> res) {
    ++calls;
    got = std::move(res);
  });
  CHECK(r.busy());
  CHECK(calls == 0);  // never inside start()
  uv_run(&l.loop, UV_RUN_DEFAULT);
  CHECK_FALSE(r.busy());
  REQUIRE(calls == 1);
  REQUIRE(got.size() == 3);
  CHECK(got[0].host == "localhost");
  CHECK(got[0].ok);
  CHECK((got[0].addr.family() == AF_INET || got[0].addr.family() == AF_INET6));
  CHECK(got[1].ok);
  CHECK(got[1].addr.to_string() == "127.0.0.2:0");
  CHECK_FALSE(got[2].ok);
  CHECK_FALSE(got[2].error.empty());
}

TEST_CASE("resolver: nothing to look up still answers from the loop") {
  Loop l;
  Resolver r(&l.loop);
  int calls = 0;
  r.start({}, Millis(10000), [&](std::vector<HostLookup> res) {
    ++calls;
    CHECK(res.empty());
  });
  CHECK(calls == 0);
  uv_run(&l.loop, UV_RUN_DEFAULT);
  CHECK(calls == 1);
}

TEST_CASE("resolver: an abandoned batch never calls back, and late answers find their memory") {
  Loop l;
  int calls = 0;
  {
    Resolver r(&l.loop);
    r.start({"localhost", "127.0.0.3"}, Millis(10000), [&](std::vector<HostLookup>) { ++calls; });
    r.cancel();
    CHECK_FALSE(r.busy());
    // A new batch may start at once; destroying the Resolver abandons it too.
    r.start({"localhost"}, Millis(10000), [&](std::vector<HostLookup>) { ++calls; });
  }
  uv_run(&l.loop, UV_RUN_DEFAULT);  // the lookups end on their threads; ASan watches
  CHECK(calls == 0);
}

TEST_CASE("resolver: lookups in flight are counted until they come back, abandoned ones too") {
  Loop l;
  Resolver r(&l.loop);
  int calls = 0, idle = 0;
  CHECK(r.in_flight() == 0);
  r.start({"localhost", "127.0.0.5"}, Millis(10000), [&](std::vector<HostLookup>) { ++calls; });
  CHECK(r.in_flight() == 2);
  r.cancel();
  CHECK(r.in_flight() == 2);  // answers come back through the loop only
  r.when_idle([&] {
    ++idle;
    CHECK(r.in_flight() == 0);
  });
  uv_run(&l.loop, UV_RUN_DEFAULT);
  CHECK(calls == 0);
  CHECK(idle == 1);
  CHECK(r.in_flight() == 0);
}

TEST_CASE("resolver: the callback may start the next batch") {
  Loop l;
  Resolver r(&l.loop);
  std::vector<std::string> order;
  r.start({"localhost"}, Millis(10000), [&](std::vector<HostLookup> first) {
    order.push_back(first[0].host);
    r.start({"127.0.0.4"}, Millis(10000), [&](std::vector<HostLookup> second) { order.push_back(second[0].host); });
  });
  uv_run(&l.loop, UV_RUN_DEFAULT);
  CHECK(order == std::vector<std::string>{"localhost", "127.0.0.4"});
}
