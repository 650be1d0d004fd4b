#pragma once
// Durations in the config: a decimal number followed by a unit, e.g. "500ms", "5s", "2m",
// "1h", "1m30s". Bare numbers are rejected so "5" can never silently mean 5 ms.
#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace smtplb {

using Millis = std::chrono::milliseconds;

// Parses a duration; nullopt on any syntax error or overflow (more than ~24 days).
std::optional<Millis> parse_duration(std::string_view text);

// Shortest exact rendering, e.g. 1500ms -> "1500ms", 120000ms -> "2m".
std::string format_duration(Millis d);

}  // namespace smtplb
