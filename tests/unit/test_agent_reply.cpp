#include <doctest/doctest.h>

#include <string>

#include "smtplb/lb/agent_reply.hpp"

using smtplb::AdminState;
using smtplb::agent_scaled_weight;
using smtplb::AgentReply;
using smtplb::parse_agent_reply;

namespace {
AgentReply ok(const std::string& line) {
  AgentReply r;
  std::string error;
  INFO(line);
  CHECK(parse_agent_reply(line, r, error));
  CHECK(error.empty());
  return r;
}
std::string bad(const std::string& line) {
  AgentReply r;
  std::string error;
  INFO(line);
  CHECK_FALSE(parse_agent_reply(line, r, error));
  return error;
}
}  // namespace

TEST_CASE("agent reply: single words") {
  CHECK(*ok("up\n").up);
  CHECK_FALSE(*ok("down\r\n").up);
  CHECK_FALSE(*ok("failed").up);
  CHECK_FALSE(*ok("stopped\n").up);
  CHECK(*ok("ready\n").admin == AdminState::ready);
  CHECK(*ok("drain\n").admin == AdminState::drain);
  CHECK(*ok("maint\n").admin == AdminState::maint);
  CHECK(*ok("75%\n").weight_percent == 75u);
  CHECK(*ok("0%").weight_percent == 0u);
  CHECK(*ok("256%").weight_percent == 256u);
  const AgentReply only = ok("50%\n");
  CHECK_FALSE(only.up.has_value());
  CHECK_FALSE(only.admin.has_value());
}

TEST_CASE("agent reply: combinations, separators, case, comments") {
  AgentReply r = ok("up 50%\n");
  CHECK(*r.up);
  CHECK(*r.weight_percent == 50u);
  r = ok("DRAIN,\t25%  Up\r\n");
  CHECK(*r.admin == AdminState::drain);
  CHECK(*r.weight_percent == 25u);
  CHECK(*r.up);
  r = ok("down #queue full, 1234 deferred\n");
  CHECK_FALSE(*r.up);
  CHECK(r.description == "queue full, 1234 deferred");
  // The last word of a kind wins; maxconn is accepted and ignored.
  r = ok("drain ready 10% 20% maxconn:30\n");
  CHECK(*r.admin == AdminState::ready);
  CHECK(*r.weight_percent == 20u);
  // Only the first line counts.
  r = ok("up\ndown\n");
  CHECK(*r.up);
}

TEST_CASE("agent reply: what is refused") {
  CHECK(bad("") == "empty reply");
  CHECK(bad("\r\n") == "empty reply");
  CHECK(bad("  , \n") == "empty reply");
  CHECK(bad("# only a comment\n") == "empty reply");
  CHECK(bad("upp\n") == "unknown word 'upp'");
  CHECK(bad("up 50\n") == "unknown word '50'");
  CHECK(bad("257%\n") == "bad weight '257%' (0% to 256%)");
  CHECK(bad("-5%\n") == "bad weight '-5%' (0% to 256%)");
  CHECK(bad("%\n") == "bad weight '%' (0% to 256%)");
  CHECK(bad("1000%\n") == "bad weight '1000%' (0% to 256%)");
  CHECK(bad("maxconn:\n") == "unknown word 'maxconn:'");
  CHECK(bad(std::string("up\0x", 4)) == "unknown word 'up?x'");
}

TEST_CASE("agent reply: scaled weights") {
  CHECK(agent_scaled_weight(100, 50) == 50);
  CHECK(agent_scaled_weight(100, 100) == 100);
  CHECK(agent_scaled_weight(1, 50) == 1);  // never 0 unless asked
  CHECK(agent_scaled_weight(3, 50) == 2);  // rounded to the nearest
  CHECK(agent_scaled_weight(10, 0) == 0);
  CHECK(agent_scaled_weight(0, 80) == 0);
  CHECK(agent_scaled_weight(200, 256) == 256);  // capped
}
