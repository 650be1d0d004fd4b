#pragma once
// HAProxy's agent-check reply, pure: one line a server's agent sends, the words of which
// say how the balancer should treat the server. Words are separated by spaces, tabs or
// commas, in any order, case-insensitive, and the line may end in CR and/or LF:
//   NN%                  the weight, in percent of the configured one (0 to 256%)
//   ready | drain | maint   the agent's admin state (ready clears drain and maint)
//   up | down | failed | stopped   the agent's health (failed and stopped mean down)
//   maxconn:NN           accepted and ignored (smtplb's limits are its own)
// and everything after '#' is a description for the logs. The last word of each kind
// wins. An empty line, an unknown word or a malformed percentage is an error: the reply
// is then ignored as a whole.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "smtplb/config/config.hpp"

namespace smtplb {

struct AgentReply {
  std::optional<uint32_t> weight_percent;
  std::optional<AdminState> admin;
  std::optional<bool> up;  // true: up; false: down, failed or stopped
  std::string description;
};

// Parses one reply (the bytes the agent sent up to its first LF, or all of them when it
// sent none). False, with `error` saying why, when the reply is not understood.
bool parse_agent_reply(std::string_view line, AgentReply& out, std::string& error);

// The weight a configured (or admin-set) `weight` becomes at `percent`: rounded to the
// nearest, at least 1 unless the weight or the percentage is 0, at most 256.
uint32_t agent_scaled_weight(uint32_t weight, uint32_t percent);

}  // namespace smtplb
