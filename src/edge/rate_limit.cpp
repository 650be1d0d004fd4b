#include "smtplb/edge/rate_limit.hpp"

#include <charconv>

namespace smtplb {

std::string RateSpec::to_string() const {
  return std::to_string(count) + "/" + format_duration(period);
}

std::optional<RateSpec> parse_rate(std::string_view text, std::string& error) {
  const size_t slash = text.find('/');
  if (slash == std::string_view::npos) {
    error = "a rate is COUNT/PERIOD, e.g. \"30/1m\"";
    return std::nullopt;
  }
  const std::string_view count = text.substr(0, slash);
  uint64_t n = 0;
  auto [end, ec] = std::from_chars(count.data(), count.data() + count.size(), n);
  if (count.empty() || ec != std::errc() || end != count.data() + count.size() || n == 0 || n > 1000000) {
    error = "the COUNT of COUNT/PERIOD must be a whole number from 1 to 1000000";
    return std::nullopt;
  }
  const auto period = parse_duration(text.substr(slash + 1));
  if (!period || period->count() < 1000 || period->count() > 86400000) {
    error = "the PERIOD of COUNT/PERIOD must be a duration from 1s to 1d, e.g. \"1m\"";
    return std::nullopt;
  }
  return RateSpec{uint32_t(n), *period};
}

}  // namespace smtplb
