#include "smtplb/config/cpus.hpp"

#include <charconv>
#include <cmath>

namespace smtplb {

namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  return s;
}

std::optional<long long> number(std::string_view s) {
  s = trim(s);
  long long v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

}  // namespace

std::optional<double> parse_cpu_max(std::string_view text) {
  text = trim(text);
  const size_t sp = text.find(' ');
  if (sp == std::string_view::npos) return std::nullopt;
  const std::string_view quota = text.substr(0, sp);
  if (quota == "max") return std::nullopt;
  const auto q = number(quota), p = number(text.substr(sp + 1));
  if (!q || !p || *q <= 0 || *p <= 0) return std::nullopt;
  return double(*q) / double(*p);
}

std::optional<double> parse_cfs_quota(std::string_view quota_us, std::string_view period_us) {
  const auto q = number(quota_us), p = number(period_us);
  if (!q || !p || *q <= 0 || *p <= 0) return std::nullopt;
  return double(*q) / double(*p);
}

CgroupPaths parse_proc_cgroup(std::string_view text) {
  CgroupPaths out;
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    // hierarchy-ID:controller-list:cgroup-path
    const size_t a = line.find(':');
    if (a == std::string_view::npos) continue;
    const size_t b = line.find(':', a + 1);
    if (b == std::string_view::npos) continue;
    const std::string_view id = line.substr(0, a), controllers = line.substr(a + 1, b - a - 1);
    const std::string_view path = line.substr(b + 1);
    if (id == "0" && controllers.empty()) {
      out.v2 = std::string(path);
      continue;
    }
    for (size_t pos = 0; pos <= controllers.size();) {
      const size_t comma = controllers.find(',', pos);
      const std::string_view c = controllers.substr(pos, comma == std::string_view::npos ? comma : comma - pos);
      if (c == "cpu") {
        out.v1_cpu = std::string(path);
        out.v1_mount_name = std::string(controllers);
      }
      if (comma == std::string_view::npos) break;
      pos = comma + 1;
    }
  }
  return out;
}

unsigned workers_for_cpus(unsigned affinity_cpus, std::optional<double> quota_cpus, unsigned max_workers) {
  unsigned n = affinity_cpus ? affinity_cpus : 1;
  if (quota_cpus && *quota_cpus > 0) {
    const double ceiling = std::ceil(*quota_cpus - 1e-9);
    if (ceiling < double(n)) n = unsigned(ceiling < 1 ? 1 : ceiling);
  }
  if (max_workers && n > max_workers) n = max_workers;
  return n ? n : 1;
}

}  // namespace smtplb
