#include "control/cpu_probe.hpp"

#include <sched.h>

#include <cerrno>

#include <fstream>
#include <sstream>
#include <thread>

#include "smtplb/config/cpus.hpp"

namespace smtplb {

namespace {

std::optional<std::string> read_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

unsigned affinity_cpus() {
  // The mask can be larger than cpu_set_t's 1024 CPUs: grow until the kernel's fits.
  for (int n = 1024; n <= 1 << 16; n *= 2) {
    cpu_set_t* set = CPU_ALLOC(n);
    if (!set) break;
    const size_t size = CPU_ALLOC_SIZE(n);
    CPU_ZERO_S(size, set);
    if (sched_getaffinity(0, size, set) == 0) {
      const int count = CPU_COUNT_S(size, set);
      CPU_FREE(set);
      return count > 0 ? unsigned(count) : 1;
    }
    CPU_FREE(set);
    if (errno != EINVAL) break;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? hw : 1;
}

// The tightest quota from `leaf` up to `root` (a parent's limit binds its children too).
template <class Read>
void walk_up(const std::string& root, std::string leaf, CpuBudget& out, Read read_quota) {
  while (true) {
    const std::string dir = root + (leaf == "/" ? "" : leaf);
    if (auto q = read_quota(dir); q && (!out.quota || *q < *out.quota)) {
      out.quota = q;
      out.quota_source = dir;
    }
    if (leaf.empty() || leaf == "/") break;
    const size_t slash = leaf.find_last_of('/');
    leaf = slash == 0 || slash == std::string::npos ? "/" : leaf.substr(0, slash);
  }
}

}  // namespace

CpuBudget probe_cpus() {
  CpuBudget out;
  out.affinity = affinity_cpus();
  const auto proc = read_file("/proc/self/cgroup");
  if (!proc) return out;
  const CgroupPaths paths = parse_proc_cgroup(*proc);
  if (!paths.v2.empty())
    walk_up("/sys/fs/cgroup", paths.v2, out, [](const std::string& dir) -> std::optional<double> {
      const auto text = read_file(dir + "/cpu.max");
      return text ? parse_cpu_max(*text) : std::nullopt;
    });
  if (!paths.v1_cpu.empty()) {
    for (const std::string& mount : {"/sys/fs/cgroup/" + paths.v1_mount_name, std::string("/sys/fs/cgroup/cpu")}) {
      CpuBudget v1;
      walk_up(mount, paths.v1_cpu, v1, [](const std::string& dir) -> std::optional<double> {
        const auto q = read_file(dir + "/cpu.cfs_quota_us"), p = read_file(dir + "/cpu.cfs_period_us");
        return q && p ? parse_cfs_quota(*q, *p) : std::nullopt;
      });
      if (v1.quota && (!out.quota || *v1.quota < *out.quota)) {
        out.quota = v1.quota;
        out.quota_source = v1.quota_source;
      }
      if (v1.quota) break;
    }
  }
  return out;
}

}  // namespace smtplb
