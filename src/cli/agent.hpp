#pragma once
#include <string>
#include <vector>

namespace smtplb {

// `smtplb agent`: runs on a Postfix host and answers smtplb's agent-check queries
// (health_check.agent_port) with a weight derived from the Postfix queue.
int run_agent(const std::vector<std::string>& args);

}  // namespace smtplb
