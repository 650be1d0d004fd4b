#include <doctest/doctest.h>

#include <string>

#include "smtplb/config/config.hpp"
#include "smtplb/lb/agent_reply.hpp"
#include "smtplb/lb/queue_weight.hpp"

using smtplb::QueueCounts;
using smtplb::QueueThresholds;

TEST_CASE("queue weight: full below low, floor above high, linear between") {
  const QueueThresholds t{100, 1100, 10, 0};
  CHECK(queue_weight_percent(t, 0) == 100);
  CHECK(queue_weight_percent(t, 100) == 100);
  CHECK(queue_weight_percent(t, 600) == 55);  // half way: 100 - 90/2
  CHECK(queue_weight_percent(t, 350) == 77);  // 100 - 22.5: a half rounds to the lighter weight
  CHECK(queue_weight_percent(t, 1099) == 10);
  CHECK(queue_weight_percent(t, 1100) == 10);
  CHECK(queue_weight_percent(t, 1'000'000) == 10);
  // Never rising as the queue grows.
  uint32_t last = 100;
  for (uint64_t n = 0; n < 1300; n += 7) {
    const uint32_t w = queue_weight_percent(t, n);
    CHECK(w <= last);
    last = w;
  }
}

TEST_CASE("queue weight: the agent line, drain at the hard limit, understood by smtplb") {
  const QueueThresholds t{10, 20, 25, 30};
  CHECK(queue_agent_answer(t, QueueCounts{1, 2, 3}) == "ready up 100% #incoming=1 active=2 deferred=3");
  CHECK(queue_agent_answer(t, QueueCounts{0, 0, 15}) == "ready up 62% #incoming=0 active=0 deferred=15");
  CHECK(queue_agent_answer(t, QueueCounts{0, 5, 25}) == "drain 25% #incoming=0 active=5 deferred=25");
  for (const auto& c : {QueueCounts{0, 0, 0}, QueueCounts{0, 0, 15}, QueueCounts{9, 9, 90}}) {
    smtplb::AgentReply r;
    std::string error;
    CHECK(smtplb::parse_agent_reply(queue_agent_answer(t, c), r, error));
    CHECK(*r.weight_percent == queue_weight_percent(t, c.total()));
  }
}

TEST_CASE("agent config: defaults, keys and errors") {
  auto d = smtplb::load_agent_config_string("", "agent.toml");
  REQUIRE(d.ok());
  CHECK(d.config->port == 5555);
  CHECK(d.config->bind.to_string() == "0.0.0.0:5555");
  CHECK(d.config->queue_directory == "/var/spool/postfix");
  CHECK(d.config->queue.low == 100);
  CHECK(d.config->queue.high == 1000);
  auto r = smtplb::load_agent_config_string(
      "[agent]\naddress = \"127.0.0.2\"\nport = 0\nqueue_directory = \"/q\"\nrefresh = \"500ms\"\n"
      "[queue]\nlow = 5\nhigh = 50\nfloor = 20\ndrain = 80\n",
      "agent.toml");
  INFO((r.errors.empty() ? std::string() : r.errors[0].to_string()));
  REQUIRE(r.ok());
  CHECK(r.config->bind.to_string() == "127.0.0.2:0");
  CHECK(r.config->refresh.count() == 500);
  CHECK(r.config->queue.drain == 80);
  auto bad = [](const std::string& text) {
    auto l = smtplb::load_agent_config_string(text, "agent.toml");
    REQUIRE_FALSE(l.ok());
    REQUIRE(l.errors.size() == 1);
    return l.errors[0].to_string();
  };
  CHECK(bad("[queue]\nlow = 50\nhigh = 50\n") == "agent.toml:3:8: 'high' (50) must be above 'low' (50)");
  // Found by fuzz_config: 'low' above the default 'high' with no 'high' in the file; the
  // error had no position (0:0) and now points at 'low'.
  CHECK(bad("[queue]\nlow = 5000\n") == "agent.toml:2:7: 'high' (1000) must be above 'low' (5000)");
  CHECK(bad("[queue]\ndrain = 10\n") == "agent.toml:2:9: 'drain' must be 0 (off) or at least 'high' (1000)");
  CHECK(bad("[agent]\nqueue_directory = \"spool\"\n") == "agent.toml:2:19: 'queue_directory' must be an absolute path");
  CHECK(bad("[queue]\nflor = 1\n").find("agent.toml:2:1: unknown key 'flor' in [queue]") == 0);
  CHECK(bad("[agnet]\n").find("agent.toml:1:2: unknown section or key 'agnet'") == 0);
  CHECK(bad("[agent]\naddress = \"mx.example\"\n").find("agent.toml:2:11:") == 0);
}
