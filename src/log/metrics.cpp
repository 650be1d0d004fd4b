#include "smtplb/log/metrics.hpp"

#include <charconv>
#include <cmath>

namespace smtplb::metrics {

std::string escape_label(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string escape_help(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string format_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == 0) return "0";  // also -0
  char buf[64];
  // Integral values (timestamps, counts kept as doubles) are printed whole, without an
  // exponent, up to 1e21 as JavaScript does; anything else in the shortest form that
  // reads back as the same double.
  const bool integral = std::trunc(v) == v && std::fabs(v) < 1e21;
  const auto r = integral ? std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed)
                          : std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

void Writer::family(std::string_view name, std::string_view type, std::string_view help) {
  out_ += "# HELP ";
  out_ += name;
  out_ += ' ';
  out_ += escape_help(help);
  out_ += "\n# TYPE ";
  out_ += name;
  out_ += ' ';
  out_ += type;
  out_ += '\n';
}

void Writer::labels(Labels ls, std::string_view extra_name, std::string_view extra_value) {
  if (ls.size() == 0 && extra_name.empty()) return;
  out_ += '{';
  bool first = true;
  const auto add = [&](std::string_view n, std::string_view v) {
    if (!first) out_ += ',';
    first = false;
    out_ += n;
    out_ += "=\"";
    out_ += escape_label(v);
    out_ += '"';
  };
  for (const auto& [n, v] : ls) add(n, v);
  if (!extra_name.empty()) add(extra_name, extra_value);
  out_ += '}';
}

void Writer::sample(std::string_view name, Labels ls, double value) {
  out_ += name;
  labels(ls);
  out_ += ' ';
  out_ += format_value(value);
  out_ += '\n';
}

void Writer::sample(std::string_view name, Labels ls, uint64_t value) {
  out_ += name;
  labels(ls);
  out_ += ' ';
  out_ += std::to_string(value);
  out_ += '\n';
}

void Writer::histogram(std::string_view name, Labels ls, std::span<const double> bounds,
                       std::span<const uint64_t> counts, double sum) {
  const std::string bucket = std::string(name) + "_bucket";
  // counts should hold bounds.size() + 1 entries; a missing one counts as 0 and any
  // extra ones land in +Inf, so the buckets stay cumulative whatever the caller passes.
  uint64_t cumulative = 0;
  for (size_t i = 0; i < bounds.size(); ++i) {
    if (i < counts.size()) cumulative += counts[i];
    out_ += bucket;
    labels(ls, "le", format_value(bounds[i]));
    out_ += ' ';
    out_ += std::to_string(cumulative);
    out_ += '\n';
  }
  for (size_t i = bounds.size(); i < counts.size(); ++i) cumulative += counts[i];
  out_ += bucket;
  labels(ls, "le", "+Inf");
  out_ += ' ';
  out_ += std::to_string(cumulative);
  out_ += '\n';
  sample(std::string(name) + "_sum", ls, sum);
  sample(std::string(name) + "_count", ls, cumulative);
}

}  // namespace smtplb::metrics
