// libFuzzer target for the agent-check reply parser. Invariants: a reply either parses
// with no error or fails with one; a parsed weight is 0..256; the description is
// printable and bounded; parsing is a pure function of the first line.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "fuzz_check.hpp"
#include "smtplb/lb/agent_reply.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  smtplb::AgentReply r;
  std::string error;
  const bool ok = smtplb::parse_agent_reply(in, r, error);
  FUZZ_CHECK(ok == error.empty());
  if (ok) {
    FUZZ_CHECK(!r.weight_percent || *r.weight_percent <= 256);
    FUZZ_CHECK(r.description.size() <= 200);
    for (char c : r.description) FUZZ_CHECK(c >= 0x20 && c < 0x7f);
    if (r.weight_percent) FUZZ_CHECK(smtplb::agent_scaled_weight(256, *r.weight_percent) <= 256);
  }
  // Only the first line matters.
  if (const size_t lf = in.find('\n'); lf != std::string_view::npos) {
    smtplb::AgentReply again;
    std::string error2;
    FUZZ_CHECK(smtplb::parse_agent_reply(in.substr(0, lf + 1), again, error2) == ok);
    FUZZ_CHECK(error2 == error);
  }
  return 0;
}
