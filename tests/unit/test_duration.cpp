#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "smtplb/config/duration.hpp"

using smtplb::format_duration;
using smtplb::Millis;
using smtplb::parse_duration;

namespace {

// 2^31 ms, the documented ceiling (about 24.8 days).
constexpr int64_t kMaxMs = int64_t{1} << 31;

}  // namespace

TEST_CASE("duration: each unit") {
  CHECK(parse_duration("500ms") == Millis(500));
  CHECK(parse_duration("5s") == Millis(5'000));
  CHECK(parse_duration("5m") == Millis(300'000));
  CHECK(parse_duration("1h") == Millis(3'600'000));
  CHECK(parse_duration("1d") == Millis(86'400'000));
  CHECK(parse_duration("0s") == Millis(0));
  CHECK(parse_duration("0ms") == Millis(0));
  CHECK(parse_duration("007s") == Millis(7'000));
}

TEST_CASE("duration: compound values add up") {
  CHECK(parse_duration("1m30s") == Millis(90'000));
  CHECK(parse_duration("1h2m3s4ms") == Millis(3'723'004));
  CHECK(parse_duration("2s500ms") == Millis(2'500));
}

TEST_CASE("duration: bare numbers and malformed text are rejected") {
  // A bare number must never silently mean milliseconds (or seconds).
  const std::vector<std::string> bad = {
      "",      "5",     "0",   "s",    "ms",   "5x",   "5S",   "5MS",  "5 s",  " 5s",
      "5s ",   "-5s",   "+5s", "1.5s", "5sec", "5mss", "1m30", "m5",   "5s,",  "5\ts",
      "1e3ms", "0x10s", "5ns", "5us",  "5y",   "5w",   "5s5",  "\xff", "5s\n", "1_000ms",
  };
  for (const auto& text : bad) {
    CAPTURE(text);
    CHECK_FALSE(parse_duration(text).has_value());
  }
}

TEST_CASE("duration: the 2^31 ms ceiling") {
  CHECK(parse_duration("2147483648ms") == Millis(kMaxMs));
  CHECK_FALSE(parse_duration("2147483649ms"));
  CHECK(parse_duration("24d") == Millis(24LL * 86'400'000));
  CHECK_FALSE(parse_duration("25d"));
  CHECK(parse_duration("596h") == Millis(596LL * 3'600'000));
  CHECK_FALSE(parse_duration("597h"));
  // The sum of parts is capped too, not only each part.
  CHECK_FALSE(parse_duration("24d24d"));
  CHECK_FALSE(parse_duration("2147483648ms1ms"));
  // Digits far beyond int64 must not wrap around into a small value.
  CHECK_FALSE(parse_duration("99999999999999999999999s"));
  CHECK_FALSE(parse_duration("18446744073709551617ms"));
  CHECK_FALSE(parse_duration("9223372036854775808ms"));
}

TEST_CASE("duration: format picks the largest exact unit") {
  CHECK(format_duration(Millis(0)) == "0s");
  CHECK(format_duration(Millis(1)) == "1ms");
  CHECK(format_duration(Millis(1'500)) == "1500ms");
  CHECK(format_duration(Millis(1'000)) == "1s");
  CHECK(format_duration(Millis(90'000)) == "90s");
  CHECK(format_duration(Millis(120'000)) == "2m");
  CHECK(format_duration(Millis(3'600'000)) == "1h");
  CHECK(format_duration(Millis(5'400'000)) == "90m");
  CHECK(format_duration(Millis(90'000'000)) == "25h");
}

TEST_CASE("duration: format uses days when exact") {
  CHECK(format_duration(Millis(86'400'000)) == "1d");
  CHECK(format_duration(Millis(7 * 86'400'000LL)) == "7d");
}

TEST_CASE("duration: format then parse is the identity") {
  std::vector<int64_t> values = {0,      1,      10,        999,       1'000,      1'001,      59'999,
                                 60'000, 61'000, 3'599'999, 3'600'000, 86'400'000, kMaxMs - 1, kMaxMs};
  // A deterministic spread over the whole accepted range.
  uint64_t x = 88172645463325252ULL;
  for (int i = 0; i < 2000; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    values.push_back(int64_t(x % uint64_t(kMaxMs + 1)));
    values.push_back(int64_t(x % 1000) * 1000);
    values.push_back(int64_t(x % 1000) * 60'000);
  }
  for (int64_t v : values) {
    CAPTURE(v);
    const std::string text = format_duration(Millis(v));
    REQUIRE(parse_duration(text) == Millis(v));
  }
}
