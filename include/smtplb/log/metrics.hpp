#pragma once
// Prometheus text exposition format 0.0.4, pure: families with HELP and TYPE, samples
// with escaped label values, histograms with cumulative buckets, _sum and _count.
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <utility>

namespace smtplb::metrics {

using Label = std::pair<std::string_view, std::string_view>;
using Labels = std::initializer_list<Label>;

class Writer {
 public:
  // Starts a family: "# HELP name help\n# TYPE name type\n". type: counter, gauge,
  // histogram. Every family must be started once, before its samples.
  void family(std::string_view name, std::string_view type, std::string_view help);
  void sample(std::string_view name, Labels labels, double value);
  void sample(std::string_view name, Labels labels, uint64_t value);
  // name_bucket{...,le="b"} for each bound (cumulative counts given per bucket, not yet
  // accumulated: counts[i] = observations in (bounds[i-1], bounds[i]], with one more
  // entry for +Inf), then name_sum and name_count.
  void histogram(std::string_view name, Labels labels, std::span<const double> bounds, std::span<const uint64_t> counts,
                 double sum);

  const std::string& text() const { return out_; }
  std::string take() { return std::move(out_); }

 private:
  void labels(Labels ls, std::string_view extra_name = {}, std::string_view extra_value = {});
  std::string out_;
};

// Label value escaping of the text format: backslash, double quote and line feed.
std::string escape_label(std::string_view v);
// HELP text escaping: backslash and line feed.
std::string escape_help(std::string_view v);
// A sample value as Prometheus prints it: integers without exponent, +Inf, -Inf, NaN.
std::string format_value(double v);

}  // namespace smtplb::metrics
