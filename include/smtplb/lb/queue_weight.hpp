#pragma once
// What `smtplb agent` answers for a Postfix queue, pure: the weight falls as the queue
// grows, so a backlogged MTA takes less new mail before it fails outright.
//   total <= low           100%
//   low < total < high     linear from 100% down to `floor`
//   total >= high          floor
//   total >= drain         "drain" (0 = never): no new sessions until it shrinks
// total = incoming + active + deferred messages.
#include <cstdint>
#include <string>

namespace smtplb {

struct QueueThresholds {
  uint64_t low = 100;
  uint64_t high = 1000;
  uint32_t floor = 10;  // percent at and above `high`
  uint64_t drain = 0;   // 0: off
};

struct QueueCounts {
  uint64_t incoming = 0, active = 0, deferred = 0;
  uint64_t total() const { return incoming + active + deferred; }
};

// The weight percentage for a queue of `total` messages.
uint32_t queue_weight_percent(const QueueThresholds& t, uint64_t total);

// The agent-check line (without its LF), e.g. "up 55% #incoming=3 active=10 deferred=480";
// at or above `drain`: "drain 10% #...". The state word is always there, so a reply
// after a drain ends it ("ready up NN%" then).
std::string queue_agent_answer(const QueueThresholds& t, const QueueCounts& c);

}  // namespace smtplb
