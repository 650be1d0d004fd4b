// The session core driven by hand: events in with a clock the test sets, every effect
// recorded. The SMTP cases the integration tests cover over real sockets (early talkers,
// 421 and silent backends, retries, the queue, idle timeouts, PROXY headers) with exact
// times and without a socket.
#include <doctest/doctest.h>

#include <arpa/inet.h>

#include <cerrno>
#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "smtplb/proto/proxy_protocol.hpp"
#include "smtplb/session/session_core.hpp"

using namespace smtplb;

namespace {

SocketAddress addr(const char* ip, uint16_t port) {
  SocketAddress a;
  if (std::string(ip).find(':') == std::string::npos) {
    auto* sin = reinterpret_cast<sockaddr_in*>(&a.storage);
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    REQUIRE(inet_pton(AF_INET, ip, &sin->sin_addr) == 1);
    a.len = sizeof(sockaddr_in);
  } else {
    auto* sin6 = reinterpret_cast<sockaddr_in6*>(&a.storage);
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(port);
    REQUIRE(inet_pton(AF_INET6, ip, &sin6->sin6_addr) == 1);
    a.len = sizeof(sockaddr_in6);
  }
  return a;
}

const char* side(Side s) {
  return s == Side::client ? "client" : "server";
}

// Records every effect as a line of text, and answers the ones that return something
// from what the test scripted.
struct Probe : SessionCore {
  Probe(const ListenerConfig& l, const PoolConfig& p) : SessionCore(l, p) {}

  std::vector<std::string> fx;  // effects in order
  // pick(): the next scripted answer; none left = no usable server.
  std::deque<Selection> picks;
  std::vector<std::vector<uint32_t>> picked_with;  // `tried` at each pick
  std::function<void()> on_enqueue;                // runs inside enqueue()
  int connect_err = 0;
  std::deque<int> send_results;  // kSent when empty
  std::string to_client, to_server;
  bool client_reading = true, server_reading = false;
  bool client_fin = false, server_fin = false;
  bool server_open = false;
  int64_t timer_ms = -1;  // armed timeout, -1 = none
  bool ended = false;

  std::string fx_text() const {
    std::string s;
    for (const auto& f : fx) s += f + "\n";
    return s;
  }
  bool did(const std::string& f) const { return std::find(fx.begin(), fx.end(), f) != fx.end(); }

 protected:
  Selection pick(std::span<const uint32_t> tried) override {
    picked_with.emplace_back(tried.begin(), tried.end());
    fx.push_back("pick");
    if (picks.empty()) return {};
    Selection s = picks.front();
    picks.pop_front();
    return s;
  }
  void enqueue() override {
    fx.push_back("enqueue");
    if (on_enqueue) on_enqueue();
  }
  void dequeue() override { fx.push_back("dequeue"); }
  int connect(uint32_t server) override {
    fx.push_back("connect " + std::to_string(server));
    server_open = true;
    return connect_err;
  }
  void close_server() override {
    fx.push_back("close server");
    server_open = false;
    server_reading = false;
  }
  int send(Side to, std::string_view bytes, bool) override {
    int r = kSent;
    if (!send_results.empty()) {
      r = send_results.front();
      send_results.pop_front();
    }
    if (r == kSent || r == kQueued) (to == Side::client ? to_client : to_server) += bytes;
    fx.push_back(std::string("send ") + side(to) + (r == kQueued ? " (queued)" : r > 0 ? " (failed)" : ""));
    return r;
  }
  void shutdown(Side to) override {
    fx.push_back(std::string("fin ") + side(to));
    (to == Side::client ? client_fin : server_fin) = true;
  }
  void read(Side from, bool on, bool) override {
    fx.push_back(std::string("read ") + side(from) + (on ? " on" : " off"));
    (from == Side::client ? client_reading : server_reading) = on;
  }
  void delay_acks(Side) override {}
  void arm_timer(uint64_t ms) override { timer_ms = int64_t(ms); }
  SocketAddress local_address() override { return addr("198.51.100.1", 25); }
  std::string_view hostname() const override { return "lb.example"; }
  void attempt_failed(uint32_t server, ConnError kind, const std::string& why, bool) override {
    fx.push_back("failed " + std::to_string(server) + " " + kConnErrorNames[size_t(kind)] + ": " + why);
  }
  void handed_off(uint32_t server) override { fx.push_back("handoff " + std::to_string(server)); }
  void refused(TermCode term) override { fx.push_back("refused " + term.text()); }
  void proxy_refused(const std::string& why) override { fx.push_back("proxy refused: " + why); }
  void finished() override {
    fx.push_back("finished " + term().text());
    ended = true;
  }
};

Selection server(size_t i) {
  return {i, false};
}
const Selection kAllFull{std::nullopt, true};

struct Setup {
  ListenerConfig listener;
  PoolConfig pool;
  Setup() {
    listener.name = "mx";
    listener.client_idle_timeout = Millis(300000);
    pool.name = "p";
    pool.retries = 2;
    pool.connect_timeout = Millis(5000);
    pool.banner_timeout = Millis(15000);
    pool.server_idle_timeout = Millis(600000);
    pool.queue_timeout = Millis(0);
  }
};

void data(Probe& p, uint64_t now, Side from, const std::string& bytes, bool eof = false) {
  if (from == Side::client)
    p.client_data(now, bytes.data(), bytes.size(), eof);
  else
    p.server_data(now, bytes.data(), bytes.size(), eof);
}

const std::string kGreeting = "220 mx1.example ESMTP\r\n";

}  // namespace

TEST_CASE("session core: a server that greets 220 gets the session, and bytes flow both ways") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(1)};
  p.start(1000, addr("192.0.2.7", 40000));
  CHECK(p.fx == std::vector<std::string>{"pick", "connect 1"});
  CHECK(p.timer_ms == 5000);  // connect_timeout
  p.connected(1003, 0);
  CHECK(p.state() == SessionCore::State::greeting);
  CHECK(p.server_reading);
  CHECK(p.timer_ms == 15000);  // banner_timeout
  data(p, 1010, Side::server, kGreeting);
  CHECK(p.state() == SessionCore::State::relaying);
  CHECK(p.did("handoff 1"));
  CHECK(p.to_client == kGreeting);
  CHECK(p.stats().tc == 3);
  CHECK(p.stats().tb == 7);
  CHECK(p.timer_ms == 300000);  // the client's turn: client_idle_timeout
  data(p, 1020, Side::client, "EHLO c.example\r\n");
  CHECK(p.to_server == "EHLO c.example\r\n");
  data(p, 1021, Side::server, "250 ok\r\n");
  CHECK(p.to_client == kGreeting + "250 ok\r\n");
  // Both sides close: the server's FIN goes to the client, and the session ends normally.
  p.server_end(1030, 0);
  CHECK(p.client_fin);
  CHECK(p.timer_ms == int64_t(kFinLingerMs));
  p.client_end(1031, 0);
  CHECK(p.ended);
  CHECK(p.term() == TermCode{});
  CHECK(p.stats().bytes_in == 16);
  CHECK(p.stats().bytes_out == kGreeting.size() + 8);
  CHECK(p.tried().size() == 1);
}

TEST_CASE("session core: an early talker's bytes are held until the greeting, then delivered after it") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0)};
  p.start(0, addr("192.0.2.7", 40000));
  data(p, 1, Side::client, "EHLO early\r\n");  // before connect completes
  p.connected(2, 0);
  data(p, 3, Side::client, "MAIL FROM:<a@b>\r\n");  // before the greeting
  CHECK(p.to_server.empty());
  CHECK(p.to_client.empty());
  data(p, 4, Side::server, kGreeting);
  CHECK(p.to_client == kGreeting);
  CHECK(p.to_server == "EHLO early\r\nMAIL FROM:<a@b>\r\n");
  // The greeting went to the client before the held bytes went to the server.
  const auto sc = std::find(p.fx.begin(), p.fx.end(), "send client");
  const auto ss = std::find(p.fx.begin(), p.fx.end(), "send server");
  CHECK(sc < ss);
}

TEST_CASE("session core: an early talker is paused at the hold limit, not buffered without bound") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(1, 0);
  data(p, 2, Side::client, std::string(kHoldLimit - 1, 'x'));
  CHECK(p.client_reading);
  data(p, 3, Side::client, "y");
  CHECK_FALSE(p.client_reading);
  // The handoff delivers the held bytes and reads the client again.
  data(p, 4, Side::server, kGreeting);
  CHECK(p.to_server.size() == kHoldLimit);
  CHECK(p.client_reading);
}

TEST_CASE("session core: an early talker that half-closes still gets its answers, then the FIN goes on") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0)};
  p.start(0, addr("192.0.2.7", 40000));
  data(p, 1, Side::client, "QUIT\r\n");
  p.client_end(1, 0);  // `printf 'QUIT\r\n' | nc -N`
  CHECK_FALSE(p.ended);
  p.connected(2, 0);
  data(p, 3, Side::server, kGreeting);
  CHECK(p.to_server == "QUIT\r\n");
  CHECK(p.server_fin);
  data(p, 4, Side::server, "221 bye\r\n");
  p.server_end(5, 0);
  CHECK(p.ended);
  CHECK(p.term() == TermCode{});
}

TEST_CASE("session core: a client that leaves before the greeting without talking ends the session (CH)") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(1, 0);
  p.client_end(2, 0);
  CHECK(p.ended);
  CHECK(p.term() == TermCode{Cause::client, Phase::greeting});
  CHECK(p.did("close server"));
}

TEST_CASE("session core: a 421 greeting fails the attempt, and the next server is tried, never the same one") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0), server(2)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(1, 0);
  data(p, 2, Side::client, "EHLO early\r\n");
  data(p, 3, Side::server, "421 4.3.2 busy\r\n");
  CHECK(p.did("failed 0 banner: greeting 421 4.3.2 busy"));
  CHECK(p.did("close server"));
  REQUIRE(p.picked_with.size() == 2);
  CHECK(p.picked_with[1] == std::vector<uint32_t>{0});
  CHECK(p.did("connect 2"));
  CHECK(p.to_client.empty());  // the client saw nothing of the failed server
  p.connected(4, 0);
  data(p, 5, Side::server, kGreeting);
  CHECK(p.to_client == kGreeting);
  CHECK(p.to_server == "EHLO early\r\n");  // held bytes survive a retry
  CHECK(p.tried().size() == 2);
}

TEST_CASE(
    "session core: a silent server times out after banner_timeout, and with retries used up the client gets 421") {
  Setup s;
  s.pool.retries = 1;
  Probe p(s.listener, s.pool);
  p.picks = {server(0), server(1)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(1, 0);
  CHECK(p.timer_ms == 15000);
  p.timer(15001);
  CHECK(p.did("failed 0 banner: no greeting within 15s"));
  CHECK(p.did("connect 1"));
  p.connected(15002, 0);
  p.timer(30002);
  CHECK(p.did("failed 1 banner: no greeting within 15s"));
  // retries = 1: two tries, then smtplb answers itself.
  CHECK(p.picked_with.size() == 2);
  CHECK(p.did("refused sH"));
  CHECK(p.state() == SessionCore::State::replying);
  CHECK(p.to_client.rfind("421 4.3.2 ", 0) == 0);
  CHECK(p.to_client.find("lb.example") != std::string::npos);
  CHECK(p.client_fin);
  CHECK(p.timer_ms == int64_t(kReplyLingerMs));
  CHECK(p.refusal_reason(p.term()) == "no server of pool p could take it after 2 tries (last: no greeting within 15s)");
  // The client reads the reply and closes.
  p.client_end(30010, 0);
  CHECK(p.ended);
  CHECK(p.term() == TermCode{Cause::server_timeout, Phase::greeting});
}

TEST_CASE("session core: a refused connect is retried, and a local shortage is answered at once, blaming no server") {
  Setup s;
  SUBCASE("refused") {
    Probe p(s.listener, s.pool);
    p.picks = {server(0), server(1)};
    p.start(0, addr("192.0.2.7", 40000));
    p.connected(1, ECONNREFUSED);
    CHECK(p.did("failed 0 refused: connect: connection refused"));
    CHECK(p.did("connect 1"));
    p.connected(2, ETIMEDOUT);
    CHECK(p.did("failed 1 timeout: connect: connection timed out"));
    // No third server: 421 with the last failure's code.
    CHECK(p.did("refused SC") == false);
    CHECK(p.did("refused sC"));
  }
  SUBCASE("out of descriptors") {
    Probe p(s.listener, s.pool);
    p.picks = {server(0)};
    p.connect_err = EMFILE;
    p.start(0, addr("192.0.2.7", 40000));
    CHECK(p.fx_text().find("failed") == std::string::npos);
    CHECK(p.did("refused RC"));
    CHECK(p.picked_with.size() == 1);  // no retry that would fail the same way
    CHECK(p.refusal_reason(p.term()) == "out of local resources (connect: too many open files)");
  }
  SUBCASE("no usable server at all") {
    Probe p(s.listener, s.pool);
    p.start(0, addr("192.0.2.7", 40000));
    CHECK(p.did("refused SC"));
    CHECK(p.refusal_reason(p.term()) == "no usable server in pool p");
  }
  SUBCASE("connect timeout") {
    Probe p(s.listener, s.pool);
    p.picks = {server(0), server(1)};
    p.start(0, addr("192.0.2.7", 40000));
    p.timer(5000);
    CHECK(p.did("failed 0 timeout: connect timeout after 5s"));
    CHECK(p.did("connect 1"));
  }
}

TEST_CASE("session core: a greeting split over reads is reassembled, and an endless first line fails the attempt") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0), server(1)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(1, 0);
  data(p, 2, Side::server, "22");
  data(p, 3, Side::server, "0 mx ready");
  CHECK(p.state() == SessionCore::State::greeting);
  data(p, 4, Side::server, "\r\n250");
  CHECK(p.state() == SessionCore::State::relaying);
  CHECK(p.to_client == "220 mx ready\r\n250");

  Probe q(s.listener, s.pool);
  q.picks = {server(0), server(1)};
  q.start(0, addr("192.0.2.7", 40000));
  q.connected(1, 0);
  data(q, 2, Side::server, std::string(kGreetingLineLimit, '2'));
  CHECK(q.state() == SessionCore::State::greeting);
  data(q, 3, Side::server, "0");
  CHECK(q.did("failed 0 banner: greeting line longer than 2048 bytes"));
  CHECK(q.did("connect 1"));
}

TEST_CASE("session core: a server that closes or resets before its greeting fails the attempt") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0), server(1)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(1, 0);
  p.server_end(2, 0);
  CHECK(p.did("failed 0 banner: closed before greeting"));
  p.connected(3, 0);
  p.server_end(4, ECONNRESET);
  CHECK(p.did("failed 1 reset: greeting: connection reset by peer"));
}

TEST_CASE("session core: every server full: the session queues, a freed slot hands it over, Tw counts the wait") {
  Setup s;
  s.pool.queue_timeout = Millis(2000);
  Probe p(s.listener, s.pool);
  p.picks = {kAllFull};
  p.start(100, addr("192.0.2.7", 40000));
  CHECK(p.queued());
  CHECK(p.state() == SessionCore::State::queued);
  CHECK(p.timer_ms == 2000);
  CHECK(p.did("enqueue"));
  // Still full when offered a slot: stays queued, and is not enqueued twice.
  p.picks = {kAllFull};
  CHECK_FALSE(p.slot_offered(500));
  CHECK(std::count(p.fx.begin(), p.fx.end(), "enqueue") == 1);
  p.picks = {server(3)};
  CHECK(p.slot_offered(700));
  CHECK_FALSE(p.queued());
  CHECK(p.did("dequeue"));
  CHECK(p.did("connect 3"));
  CHECK(p.stats().tw == 600);
}

TEST_CASE("session core: a slot freed between the pick and the enqueue is taken at once (the re-check)") {
  // The worker's enqueue looks once more and offers the slot inside enqueue().
  Setup s;
  s.pool.queue_timeout = Millis(2000);
  Probe p(s.listener, s.pool);
  p.picks = {kAllFull, server(0)};
  p.on_enqueue = [&] { CHECK(p.slot_offered(100)); };
  p.start(100, addr("192.0.2.7", 40000));
  CHECK_FALSE(p.queued());
  CHECK(p.did("connect 0"));
  CHECK(p.timer_ms == 5000);  // connect_timeout, not the queue's
  p.connected(101, 0);
  data(p, 102, Side::server, kGreeting);
  CHECK(p.to_client == kGreeting);
}

TEST_CASE("session core: queue_timeout expires: 421 with sQ, and a client that leaves while queued ends CQ") {
  Setup s;
  s.pool.queue_timeout = Millis(2000);
  Probe p(s.listener, s.pool);
  p.picks = {kAllFull};
  p.start(0, addr("192.0.2.7", 40000));
  p.timer(2000);
  CHECK(p.did("dequeue"));
  CHECK(p.did("refused sQ"));
  CHECK(p.to_client.rfind("421 4.3.2 ", 0) == 0);
  CHECK(p.stats().tw == 2000);
  CHECK(p.refusal_reason(p.term()) == "every server of pool p stayed full for queue_timeout 2s");

  Probe q(s.listener, s.pool);
  q.picks = {kAllFull};
  q.start(0, addr("192.0.2.7", 40000));
  q.client_end(10, 0);
  CHECK(q.ended);
  CHECK(q.term() == TermCode{Cause::client, Phase::queue});
  CHECK(q.did("dequeue"));
  // Without a queue, a full pool is answered at once.
  s.pool.queue_timeout = Millis(0);
  Probe r(s.listener, s.pool);
  r.picks = {kAllFull};
  r.start(0, addr("192.0.2.7", 40000));
  CHECK(r.did("refused sQ"));
}

TEST_CASE("session core: idle timeouts follow whose turn it is, and every byte restarts them") {
  Setup s;
  s.listener.client_idle_timeout = Millis(60000);
  s.pool.server_idle_timeout = Millis(90000);
  Probe p(s.listener, s.pool);
  p.picks = {server(0)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(0, 0);
  data(p, 0, Side::server, kGreeting);
  CHECK(p.timer_ms == 60000);  // the server spoke: the client's turn
  data(p, 30000, Side::client, "DATA\r\n");
  // The timer fires at its old deadline: 30 s of the server's 90 s have gone.
  p.timer(60000);
  CHECK_FALSE(p.ended);
  CHECK(p.timer_ms == 60000);
  p.timer(120000);
  CHECK(p.ended);
  CHECK(p.term() == TermCode{Cause::server_timeout, Phase::data});

  Probe q(s.listener, s.pool);
  q.picks = {server(0)};
  q.start(0, addr("192.0.2.7", 40000));
  q.connected(0, 0);
  data(q, 0, Side::server, kGreeting);
  q.timer(60000);
  CHECK(q.ended);
  CHECK(q.term() == TermCode{Cause::client_timeout, Phase::data});
}

TEST_CASE("session core: after the server's FIN the client has a short linger, then the session ends") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(0, 0);
  data(p, 0, Side::server, kGreeting);
  data(p, 10, Side::server, "221 bye\r\n", true);
  p.server_end(10, 0);
  CHECK(p.client_fin);
  CHECK(p.timer_ms == int64_t(kFinLingerMs));
  p.timer(10 + kFinLingerMs);
  CHECK(p.ended);
  CHECK(p.term() == TermCode{});  // everything reached the client
}

TEST_CASE("session core: a slow receiver pauses the sender until its queue is flushed") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(0, 0);
  data(p, 0, Side::server, kGreeting);
  p.send_results = {SessionCore::kQueued};
  data(p, 1, Side::client, "BDAT 100000\r\n");
  CHECK_FALSE(p.client_reading);
  p.flushed(2, Side::server);
  CHECK(p.client_reading);
  // Both closed while bytes wait for the client: the session ends only once they are out.
  p.send_results = {SessionCore::kQueued};
  data(p, 3, Side::server, "250 ok\r\n");
  CHECK_FALSE(p.server_reading);
  p.server_end(4, 0);
  p.client_end(4, 0);
  CHECK_FALSE(p.ended);
  p.flushed(5, Side::client);
  CHECK(p.ended);
  CHECK(p.term() == TermCode{});
}

TEST_CASE("session core: write failures: the client's ends the session, a reset server ends it as SD") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(0, 0);
  data(p, 0, Side::server, kGreeting);
  p.send_results = {EPIPE};
  data(p, 1, Side::client, "QUIT\r\n");
  CHECK(p.ended);
  CHECK(p.term() == TermCode{Cause::server, Phase::data});

  Probe q(s.listener, s.pool);
  q.picks = {server(0)};
  q.start(0, addr("192.0.2.7", 40000));
  q.connected(0, 0);
  data(q, 0, Side::server, kGreeting);
  q.write_failed(1, Side::client, ECONNRESET);
  CHECK(q.term() == TermCode{Cause::client, Phase::data});
}

TEST_CASE("session core: PROXY in: an untrusted sender is refused, a good header gives the client's address") {
  Setup s;
  s.listener.proxy_protocol = ProxyIn::v1;
  Cidr trusted;
  REQUIRE(parse_cidr("127.0.0.0/8", trusted));
  s.listener.trusted_proxies = {trusted};
  SUBCASE("untrusted") {
    Probe p(s.listener, s.pool);
    p.start(0, addr("192.0.2.7", 40000));
    CHECK(p.did("proxy refused: sender is not in trusted_proxies"));
    CHECK(p.term() == TermCode{Cause::proxy, Phase::proxy_header});
    CHECK(p.picked_with.empty());
  }
  SUBCASE("header in two pieces, then an early command") {
    Probe p(s.listener, s.pool);
    p.picks = {server(0)};
    p.start(0, addr("127.0.0.1", 40000));
    CHECK(p.state() == SessionCore::State::proxy_header);
    CHECK(p.timer_ms == int64_t(kProxyHeaderTimeoutMs));
    data(p, 1, Side::client, "PROXY TCP4 192.0.2.9 198.51.100.2 5");
    CHECK(p.picked_with.empty());
    data(p, 2, Side::client, "1234 25\r\nEHLO x\r\n");
    CHECK(p.did("connect 0"));
    CHECK(p.peer().to_string() == "192.0.2.9:51234");
    p.connected(3, 0);
    data(p, 4, Side::server, kGreeting);
    CHECK(p.to_server == "EHLO x\r\n");  // the header is not relayed
  }
  SUBCASE("garbage") {
    Probe p(s.listener, s.pool);
    p.start(0, addr("127.0.0.1", 40000));
    data(p, 1, Side::client, "EHLO x\r\n");
    CHECK(p.term() == TermCode{Cause::proxy, Phase::proxy_header});
    CHECK(p.fx_text().find("proxy refused: malformed PROXY header") != std::string::npos);
  }
  SUBCASE("silence") {
    Probe p(s.listener, s.pool);
    p.start(0, addr("127.0.0.1", 40000));
    p.timer(kProxyHeaderTimeoutMs);
    CHECK(p.term() == TermCode{Cause::client_timeout, Phase::proxy_header});
  }
}

TEST_CASE("session core: PROXY out: the header goes first, and a failed header write tries the next server") {
  Setup s;
  s.pool.proxy_protocol = ProxyOut::v1;
  Probe p(s.listener, s.pool);
  p.picks = {server(0), server(1)};
  p.start(0, addr("192.0.2.7", 40000));
  p.send_results = {ECONNRESET};
  p.connected(1, 0);
  CHECK(p.did("failed 0 reset: PROXY header: connection reset by peer"));
  CHECK(p.did("connect 1"));
  p.connected(2, 0);
  CHECK(p.to_server == "PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n");
  data(p, 3, Side::server, kGreeting);
  CHECK(p.to_client == kGreeting);
}

TEST_CASE("session core: a client gone while a PROXY backend connects: header, then close, no retry (CC)") {
  Setup s;
  s.pool.proxy_protocol = ProxyOut::v2;
  Probe p(s.listener, s.pool);
  p.picks = {server(0), server(1)};
  p.start(0, addr("192.0.2.7", 40000));
  p.client_end(1, 0);
  CHECK_FALSE(p.ended);  // the backend may have accepted us already
  p.connected(2, 0);
  CHECK(p.to_server.rfind(std::string("\r\n\r\n\0\r\nQUIT\n", 12), 0) == 0);
  CHECK(p.ended);
  CHECK(p.term() == TermCode{Cause::client, Phase::connect});
  CHECK(p.picked_with.size() == 1);
  // A connect that fails after the client left is not retried either.
  Probe q(s.listener, s.pool);
  q.picks = {server(0), server(1)};
  q.start(0, addr("192.0.2.7", 40000));
  q.client_end(1, 0);
  q.connected(2, ECONNREFUSED);
  CHECK(q.ended);
  CHECK(q.term() == TermCode{Cause::client, Phase::connect});
  CHECK(q.picked_with.size() == 1);
}

TEST_CASE("session core: drain answers sessions not handed off yet, and leaves relaying ones alone") {
  Setup s;
  Probe p(s.listener, s.pool);
  p.picks = {server(0)};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(1, 0);
  p.drain(2);
  CHECK(p.state() == SessionCore::State::replying);
  CHECK(p.term() == TermCode{Cause::killed, Phase::greeting});
  CHECK(p.did("refused KH"));  // reported, though not counted as a refusal by the owner
  CHECK(p.to_client.rfind("421 4.3.2 ", 0) == 0);

  Probe q(s.listener, s.pool);
  q.picks = {server(0)};
  q.start(0, addr("192.0.2.7", 40000));
  q.connected(1, 0);
  data(q, 2, Side::server, kGreeting);
  q.drain(3);
  CHECK(q.state() == SessionCore::State::relaying);
  q.kill(4);
  CHECK(q.term() == TermCode{Cause::killed, Phase::data});
}

TEST_CASE("session core: handoff = connect hands off at the connect, without waiting for a greeting") {
  Setup s;
  s.pool.handoff = Handoff::connect;
  Probe p(s.listener, s.pool);
  p.picks = {server(0)};
  p.start(0, addr("192.0.2.7", 40000));
  data(p, 1, Side::client, "\x16\x03\x01");  // a TLS ClientHello on port 465
  p.connected(2, 0);
  CHECK(p.state() == SessionCore::State::relaying);
  CHECK(p.to_server == "\x16\x03\x01");
}

TEST_CASE("session core: remap_tried follows a newer server list, and a vanished server excludes nothing") {
  Setup s;
  s.pool.queue_timeout = Millis(1000);
  Probe p(s.listener, s.pool);
  p.picks = {server(0), kAllFull};
  p.start(0, addr("192.0.2.7", 40000));
  p.connected(1, ECONNREFUSED);
  REQUIRE(p.queued());
  p.remap_tried([](uint32_t i) { return i == 0 ? 4L : -1L; });
  CHECK(p.tried().size() == 1);
  CHECK(p.tried()[0] == 4);
  p.remap_tried([](uint32_t) { return -1L; });
  CHECK(p.tried()[0] == SessionCore::kGone);
}
