#include <doctest/doctest.h>

#include <unistd.h>

#include <sys/wait.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "smtplb/log/metrics.hpp"

using smtplb::metrics::escape_help;
using smtplb::metrics::escape_label;
using smtplb::metrics::format_value;
using smtplb::metrics::Writer;

namespace {

// A small registry in the shape of smtplb's own (docs/operations.md): gauges, counters with escaped
// label values, integral and fractional values, and a histogram.
std::string render_sample() {
  Writer w;
  w.family("smtplb_build_info", "gauge", "Build information; the value is always 1.");
  w.sample("smtplb_build_info", {{"version", "0.1.0"}}, 1.0);
  w.family("smtplb_start_time_seconds", "gauge", "Start time of the process since the Unix epoch in seconds.");
  w.sample("smtplb_start_time_seconds", {}, 1700000000.0);
  w.family("smtplb_listener_connections_total", "counter",
           "Connections accepted.\nLabel values are configured names, C:\\like\\this.");
  w.sample("smtplb_listener_connections_total", {{"listener", "smtp"}}, uint64_t{18446744073709551615u});
  w.sample("smtplb_listener_connections_total", {{"listener", "say \"hi\"\\\nbye"}}, uint64_t{0});
  w.family("smtplb_server_up", "gauge", "Whether the server passes its health checks (1) or not (0).");
  w.sample("smtplb_server_up", {{"pool", "mx"}, {"server", "mx1"}}, 1.0);
  w.sample("smtplb_server_up", {{"pool", "mx"}, {"server", "mx2"}}, 0.0);
  w.family("smtplb_server_connect_duration_seconds", "histogram",
           "Time from connect to the server's greeting in seconds.");
  const double bounds[] = {0.005, 0.5, 1, 10};
  const uint64_t counts[] = {1, 2, 0, 3, 4};
  w.histogram("smtplb_server_connect_duration_seconds", {{"pool", "mx"}, {"server", "mx1"}}, bounds, counts, 42.25);
  w.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
  w.sample("process_cpu_seconds_total", {}, 0.1 + 0.2);
  return w.take();
}

const char* const kSampleText =
    "# HELP smtplb_build_info Build information; the value is always 1.\n"
    "# TYPE smtplb_build_info gauge\n"
    "smtplb_build_info{version=\"0.1.0\"} 1\n"
    "# HELP smtplb_start_time_seconds Start time of the process since the Unix epoch in seconds.\n"
    "# TYPE smtplb_start_time_seconds gauge\n"
    "smtplb_start_time_seconds 1700000000\n"
    "# HELP smtplb_listener_connections_total Connections accepted.\\nLabel values are configured names, "
    "C:\\\\like\\\\this.\n"
    "# TYPE smtplb_listener_connections_total counter\n"
    "smtplb_listener_connections_total{listener=\"smtp\"} 18446744073709551615\n"
    "smtplb_listener_connections_total{listener=\"say \\\"hi\\\"\\\\\\nbye\"} 0\n"
    "# HELP smtplb_server_up Whether the server passes its health checks (1) or not (0).\n"
    "# TYPE smtplb_server_up gauge\n"
    "smtplb_server_up{pool=\"mx\",server=\"mx1\"} 1\n"
    "smtplb_server_up{pool=\"mx\",server=\"mx2\"} 0\n"
    "# HELP smtplb_server_connect_duration_seconds Time from connect to the server's greeting in seconds.\n"
    "# TYPE smtplb_server_connect_duration_seconds histogram\n"
    "smtplb_server_connect_duration_seconds_bucket{pool=\"mx\",server=\"mx1\",le=\"0.005\"} 1\n"
    "smtplb_server_connect_duration_seconds_bucket{pool=\"mx\",server=\"mx1\",le=\"0.5\"} 3\n"
    "smtplb_server_connect_duration_seconds_bucket{pool=\"mx\",server=\"mx1\",le=\"1\"} 3\n"
    "smtplb_server_connect_duration_seconds_bucket{pool=\"mx\",server=\"mx1\",le=\"10\"} 6\n"
    "smtplb_server_connect_duration_seconds_bucket{pool=\"mx\",server=\"mx1\",le=\"+Inf\"} 10\n"
    "smtplb_server_connect_duration_seconds_sum{pool=\"mx\",server=\"mx1\"} 42.25\n"
    "smtplb_server_connect_duration_seconds_count{pool=\"mx\",server=\"mx1\"} 10\n"
    "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
    "# TYPE process_cpu_seconds_total counter\n"
    "process_cpu_seconds_total 0.30000000000000004\n";

// The exit status of a shell command, or -1 when it could not be run.
int run(const std::string& command) {
  const int rc = std::system(command.c_str());
  return rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace

TEST_CASE("metrics: format_value") {
  CHECK(format_value(0) == "0");
  CHECK(format_value(-0.0) == "0");
  CHECK(format_value(1) == "1");
  CHECK(format_value(3) == "3");
  CHECK(format_value(-7) == "-7");
  CHECK(format_value(1700000000) == "1700000000");
  CHECK(format_value(9007199254740993.0) == "9007199254740992");  // the nearest double
  CHECK(format_value(1e20) == "100000000000000000000");
  CHECK(format_value(1e21) == "1e+21");
  CHECK(format_value(0.005) == "0.005");
  CHECK(format_value(0.1) == "0.1");
  CHECK(format_value(-2.5) == "-2.5");
  CHECK(format_value(42.25) == "42.25");
  CHECK(format_value(0.1 + 0.2) == "0.30000000000000004");
  CHECK(format_value(1e-7) == "1e-07");
  CHECK(format_value(1.5e300) == "1.5e+300");
  CHECK(format_value(std::numeric_limits<double>::infinity()) == "+Inf");
  CHECK(format_value(-std::numeric_limits<double>::infinity()) == "-Inf");
  CHECK(format_value(std::numeric_limits<double>::quiet_NaN()) == "NaN");
  // Every finite value reads back as the same double.
  for (double v : {1.0 / 3, 2.0 / 3, 1e-300, 123456.789, 5e-324, 1.7976931348623157e308, -0.001}) {
    CAPTURE(v);
    CHECK(std::strtod(format_value(v).c_str(), nullptr) == v);
  }
}

TEST_CASE("metrics: escaping") {
  CHECK(escape_label("plain") == "plain");
  CHECK(escape_label("a\\b") == "a\\\\b");
  CHECK(escape_label("say \"hi\"") == "say \\\"hi\\\"");
  CHECK(escape_label("two\nlines") == "two\\nlines");
  CHECK(escape_label("tab\tand caf\xc3\xa9") == "tab\tand caf\xc3\xa9");
  CHECK(escape_label("") == "");
  CHECK(escape_help("a\\b\nc \"quoted\"") == "a\\\\b\\nc \"quoted\"");
  CHECK(escape_help("") == "");
}

TEST_CASE("metrics: exact text of a small registry") {
  CHECK(render_sample() == kSampleText);
}

TEST_CASE("metrics: samples without labels, uint64 values, histogram edge cases") {
  Writer w;
  w.sample("a", {}, uint64_t{42});
  w.sample("b", {{"x", ""}}, 0.5);
  CHECK(w.text() == "a 42\nb{x=\"\"} 0.5\n");

  // No labels, no bounds: only +Inf, _sum and _count.
  Writer h;
  const uint64_t one[] = {7};
  h.histogram("h", {}, {}, one, 1.5);
  CHECK(h.text() == "h_bucket{le=\"+Inf\"} 7\nh_sum 1.5\nh_count 7\n");

  // Counts shorter than bounds + 1 count as zeros; longer ones land in +Inf.
  Writer s;
  const double bounds[] = {1, 2};
  const uint64_t short_counts[] = {3};
  s.histogram("s", {{"p", "q"}}, bounds, short_counts, 3);
  CHECK(s.text() ==
        "s_bucket{p=\"q\",le=\"1\"} 3\ns_bucket{p=\"q\",le=\"2\"} 3\ns_bucket{p=\"q\",le=\"+Inf\"} 3\n"
        "s_sum{p=\"q\"} 3\ns_count{p=\"q\"} 3\n");
  Writer l;
  const uint64_t long_counts[] = {1, 1, 1, 1};
  l.histogram("l", {}, bounds, long_counts, 4);
  CHECK(l.text() == "l_bucket{le=\"1\"} 1\nl_bucket{le=\"2\"} 2\nl_bucket{le=\"+Inf\"} 4\nl_sum 4\nl_count 4\n");

  // take() empties the writer.
  CHECK_FALSE(l.take().empty());
  CHECK(l.text().empty());
}

TEST_CASE("metrics: promtool accepts the rendered text") {
  if (run("command -v promtool >/dev/null 2>&1") != 0) {
    MESSAGE("SKIPPED: promtool not found (Debian package prometheus; scripts/deps.sh test installs it)");
    return;
  }
  const auto path =
      std::filesystem::temp_directory_path() / ("smtplb_test_metrics_" + std::to_string(::getpid()) + ".prom");
  {
    std::ofstream f(path, std::ios::binary);
    f << render_sample();
    REQUIRE(f.good());
  }
  const std::string out = path.string() + ".out";
  // Exit status 0: parsed and no lint problems (3 would be lint problems, 1 a parse error).
  const int rc = run("promtool check metrics < '" + path.string() + "' > '" + out + "' 2>&1");
  std::ifstream o(out);
  const std::string report((std::istreambuf_iterator<char>(o)), std::istreambuf_iterator<char>());
  std::filesystem::remove(path);
  std::filesystem::remove(out);
  CHECK_MESSAGE(rc == 0, "promtool check metrics: ", report);
}
