#include "smtplb/config/duration.hpp"

#include <cstdint>
#include <limits>

namespace smtplb {

std::optional<Millis> parse_duration(std::string_view text) {
  // Cap at 2^31 ms (~24.8 days): timers take 32-bit-safe values and no timeout in an
  // SMTP proxy needs more.
  constexpr int64_t kMax = int64_t{1} << 31;
  if (text.empty()) return std::nullopt;
  int64_t total = 0;
  size_t i = 0;
  while (i < text.size()) {
    int64_t num = 0;
    size_t digits = 0;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      num = num * 10 + (text[i] - '0');
      if (num > kMax) return std::nullopt;
      ++i;
      ++digits;
    }
    if (digits == 0) return std::nullopt;
    size_t unit_start = i;
    while (i < text.size() && text[i] >= 'a' && text[i] <= 'z') ++i;
    std::string_view unit = text.substr(unit_start, i - unit_start);
    int64_t mult;
    if (unit == "ms")
      mult = 1;
    else if (unit == "s")
      mult = 1000;
    else if (unit == "m")
      mult = 60'000;
    else if (unit == "h")
      mult = 3'600'000;
    else if (unit == "d")
      mult = 86'400'000;
    else
      return std::nullopt;
    if (num > kMax / mult) return std::nullopt;
    total += num * mult;
    if (total > kMax) return std::nullopt;
  }
  return Millis(total);
}

std::string format_duration(Millis d) {
  int64_t ms = d.count();
  if (ms != 0 && ms % 86'400'000 == 0) return std::to_string(ms / 86'400'000) + "d";
  if (ms != 0 && ms % 3'600'000 == 0) return std::to_string(ms / 3'600'000) + "h";
  if (ms != 0 && ms % 60'000 == 0) return std::to_string(ms / 60'000) + "m";
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

}  // namespace smtplb
