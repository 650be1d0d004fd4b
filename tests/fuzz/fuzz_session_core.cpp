// libFuzzer target for the session core: the input is a script of events (bytes from
// either side, ends, connects, flushes, write failures, timers, queue offers, drain and
// kill) and of the answers its effects get (picks, connect and send results), delivered
// only as the data path would deliver them (a side is read only while reading is on, a
// flush only when something is queued, the timer only when armed). Invariants are
// checked with abort(), so a violation is reported like a crash:
// - finished() comes at most once, and nothing is delivered after it;
// - bytes go to a server only on an open, connected attempt; a send to a side that was
//   closed is never asked for;
// - before the hand-off, the client receives nothing but smtplb's own 421;
// - after a hand-off with no failed write and no PROXY headers, the server received
//   exactly the client's bytes and the client exactly the chosen server's, in order;
// - no more tries than retries + 1, and held client bytes stay bounded.
#include <arpa/inet.h>
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "smtplb/proto/proxy_protocol.hpp"
#include "smtplb/session/session_core.hpp"

namespace {

using namespace smtplb;

struct Input {
  const uint8_t* p;
  size_t n;
  uint8_t byte() {
    if (!n) return 0;
    --n;
    return *p++;
  }
  bool empty() const { return n == 0; }
  std::string bytes(size_t len) {
    len = std::min(len, n);
    std::string s(reinterpret_cast<const char*>(p), len);
    p += len;
    n -= len;
    return s;
  }
};

struct Fuzzed : SessionCore {
  Fuzzed(const ListenerConfig& l, const PoolConfig& p, Input& in) : SessionCore(l, p), in(in) {}
  Input& in;
  bool ended = false;
  bool server_open = false;       // an attempt exists (connect .. close_server)
  bool connect_pending = false;   // its connect has not completed yet
  bool server_connected = false;  // it completed
  bool client_reading = true, server_reading = false;
  bool client_queued = false, server_queued = false;  // bytes wait in the relay's queue
  bool client_shut = false, server_shut = false;
  bool write_failed_once = false;
  bool timer_armed = false;
  uint64_t timer_at = 0;
  uint64_t now = 0;
  std::string to_client, to_server;
  std::string server_stream;  // bytes the current attempt's server sent
  bool in_effect_after_end = false;

  void check_alive() const { FUZZ_CHECK(!ended); }

 protected:
  Selection pick(std::span<const uint32_t> tried) override {
    check_alive();
    FUZZ_CHECK(tried.size() <= 17);
    const uint8_t b = in.byte();
    switch (b % 4) {
      case 0:
        return {};
      case 1:
        return {std::nullopt, true};
      default:
        return {size_t(b / 4 % 5), false};
    }
  }
  void enqueue() override { check_alive(); }
  void dequeue() override { check_alive(); }
  int connect(uint32_t) override {
    check_alive();
    FUZZ_CHECK(!server_open);
    server_open = true;
    connect_pending = true;
    server_connected = false;
    server_reading = server_queued = server_shut = false;
    server_stream.clear();
    const uint8_t b = in.byte() % 16;
    if (b == 1) {
      connect_pending = false;
      return ECONNREFUSED;
    }
    if (b == 2) {
      connect_pending = false;
      return EMFILE;
    }
    return 0;
  }
  void close_server() override {
    check_alive();
    FUZZ_CHECK(server_open);
    server_open = connect_pending = server_connected = server_reading = server_queued = false;
  }
  int send(Side to, std::string_view bytes, bool) override {
    check_alive();
    if (to == Side::server) {
      FUZZ_CHECK(server_open && server_connected);
      FUZZ_CHECK(!server_shut);
    } else {
      FUZZ_CHECK(!client_shut);
    }
    bool& queued = to == Side::client ? client_queued : server_queued;
    int r = kSent;
    const uint8_t b = in.byte() % 16;
    if (queued || b == 0)
      r = kQueued;
    else if (b == 1)
      r = EPIPE;
    if (r == EPIPE) {
      write_failed_once = true;
      return r;
    }
    (to == Side::client ? to_client : to_server) += bytes;
    if (r == kQueued) queued = true;
    return r;
  }
  void shutdown(Side to) override {
    check_alive();
    if (to == Side::server) FUZZ_CHECK(server_open);
    bool& shut = to == Side::client ? client_shut : server_shut;
    FUZZ_CHECK(!shut);
    shut = true;
  }
  void read(Side from, bool on, bool) override {
    check_alive();
    if (from == Side::server) {
      FUZZ_CHECK(!on || server_open);
      server_reading = on;
    } else {
      client_reading = on;
    }
  }
  void delay_acks(Side) override { check_alive(); }
  void arm_timer(uint64_t ms) override {
    check_alive();
    timer_armed = true;
    timer_at = now + ms;
  }
  SocketAddress local_address() override { return {}; }
  std::string_view hostname() const override { return "lb.example"; }
  void attempt_failed(uint32_t, ConnError, const std::string&, bool) override {
    check_alive();
    FUZZ_CHECK(server_open);
  }
  void handed_off(uint32_t) override {
    check_alive();
    FUZZ_CHECK(server_open && server_connected);
  }
  void refused(TermCode) override { check_alive(); }
  void proxy_refused(const std::string&) override { check_alive(); }
  void finished() override {
    FUZZ_CHECK(!ended);
    FUZZ_CHECK(!server_open);  // the core closed its attempt before
    ended = true;
  }
};

const char* const kServerLines[] = {
    "220 mx.example ESMTP\r\n",
    "220-mx.example\r\n220 hi\r\n",
    "421 4.3.2 busy\r\n",
    "22",
    "0 x\r\n",
    "250 ok\r\n",
    "554 no\r\n",
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in{data, size};
  const uint8_t setup = in.byte();
  const uint8_t setup2 = in.byte();
  ListenerConfig lc;
  lc.name = "mx";
  lc.client_idle_timeout = Millis(1000 + 1000 * (setup2 % 4));
  lc.proxy_protocol = ProxyIn(setup % 4);
  Cidr all;  // 0.0.0.0/0: every IPv4 sender is trusted
  all.family = AF_INET;
  lc.trusted_proxies = {all};
  PoolConfig pc;
  pc.name = "p";
  pc.proxy_protocol = ProxyOut(setup / 4 % 3);
  pc.handoff = (setup / 16) % 4 == 0 ? Handoff::connect : Handoff::banner;
  pc.retries = (setup / 64) % 4;
  pc.queue_timeout = Millis(setup2 / 4 % 2 ? 2000 : 0);
  pc.connect_timeout = Millis(500);
  pc.banner_timeout = Millis(700);
  pc.server_idle_timeout = Millis(3000);
  const bool plain = lc.proxy_protocol == ProxyIn::none && pc.proxy_protocol == ProxyOut::none;

  Fuzzed s(lc, pc, in);
  SocketAddress peer;
  auto* sin = reinterpret_cast<sockaddr_in*>(&peer.storage);
  sin->sin_family = AF_INET;
  sin->sin_port = htons(40000);
  sin->sin_addr.s_addr = htonl(0xC0000207);  // 192.0.2.7
  peer.len = sizeof(sockaddr_in);
  s.start(s.now, peer);

  std::string client_stream;  // what the client sent, in order
  bool handed = false;

  for (int steps = 0; steps < 400 && !s.ended && !in.empty(); ++steps) {
    s.now += in.byte() % 50;
    const uint8_t op = in.byte() % 12;
    switch (op) {
      case 0:
      case 1: {  // client bytes
        if (!s.client_reading) break;
        std::string b;
        const uint8_t k = in.byte();
        if (k % 8 == 0 && lc.proxy_protocol != ProxyIn::none) {
          proxy::Header h;
          h.source = peer;
          h.destination = peer;
          b = proxy::encode(lc.proxy_protocol == ProxyIn::v1 ? proxy::Version::v1 : proxy::Version::v2, h);
        } else {
          b = in.bytes(k % 64 + 1);
        }
        const bool eof = in.byte() % 8 == 0;
        client_stream += b;
        s.client_data(s.now, b.data(), b.size(), eof);
        if (eof && !s.ended) s.client_end(s.now, 0);
        break;
      }
      case 2:  // the client closes or resets
        if (!s.client_reading) break;
        s.client_end(s.now, in.byte() % 4 == 0 ? ECONNRESET : 0);
        break;
      case 3:  // the connect completes
        if (!s.connect_pending) break;
        s.connect_pending = false;
        {
          const uint8_t e = in.byte() % 8;
          const int err = e == 0 ? ECONNREFUSED : e == 1 ? ETIMEDOUT : 0;
          if (err == 0) s.server_connected = true;
          s.connected(s.now, err);
        }
        break;
      case 4:
      case 5: {  // server bytes
        if (!s.server_open || !s.server_connected || !s.server_reading) break;
        const uint8_t k = in.byte();
        const std::string b = k % 2 ? std::string(kServerLines[k / 2 % (sizeof kServerLines / sizeof *kServerLines)])
                                    : in.bytes(k % 32 + 1);
        s.server_stream += b;
        const bool before = s.was_handed_off();
        s.server_data(s.now, b.data(), b.size(), false);
        if (!before && s.was_handed_off()) handed = true;
        break;
      }
      case 6:  // the server closes or resets
        if (!s.server_open || !s.server_connected || !s.server_reading) break;
        s.server_end(s.now, in.byte() % 4 == 0 ? ECONNRESET : 0);
        break;
      case 7: {  // a queue is flushed
        const bool to_client = in.byte() % 2;
        bool& q = to_client ? s.client_queued : s.server_queued;
        if (!q) break;
        q = false;
        s.flushed(s.now, to_client ? Side::client : Side::server);
        break;
      }
      case 8: {  // writing a queue fails
        const bool to_client = in.byte() % 2;
        bool& q = to_client ? s.client_queued : s.server_queued;
        if (!q) break;
        q = false;
        s.write_failed_once = true;
        s.write_failed(s.now, to_client ? Side::client : Side::server, ECONNRESET);
        break;
      }
      case 9:  // the timer
        if (!s.timer_armed) break;
        s.now = std::max(s.now, s.timer_at);
        s.timer_armed = false;
        s.timer(s.now);
        break;
      case 10:
        if (s.queued()) s.slot_offered(s.now);
        break;
      case 11:
        if (in.byte() % 4 == 0)
          s.kill(s.now);
        else
          s.drain(s.now);
        break;
    }
    FUZZ_CHECK(s.tried().size() <= size_t(pc.retries) + 1);
    if (!s.was_handed_off() && !s.to_client.empty()) FUZZ_CHECK(s.to_client.rfind("421 4.3.2 lb.example ", 0) == 0);
    if (s.was_handed_off()) FUZZ_CHECK(handed || pc.handoff == Handoff::connect);
  }
  // Relayed bytes are exactly what each side sent, in order (with no header on either
  // side and no failed write; a hand-off on connect has no greeting gate).
  if (plain && s.was_handed_off() && !s.write_failed_once) {
    FUZZ_CHECK(s.to_server == client_stream);
    if (pc.handoff == Handoff::banner) FUZZ_CHECK(s.to_client == s.server_stream);
  }
  return 0;
}
