#pragma once
// How many workers `workers = 0` means: the CPUs this process may really use (its
// affinity mask and its cgroup's CPU quota), never more than the per-worker counter
// slots. Pure: the caller reads /proc and /sys (src/control/cpu_probe.cpp).
#include <optional>
#include <string>
#include <string_view>

namespace smtplb {

// cgroup v2 `cpu.max` ("max 100000" or "150000 100000"): CPUs' worth of quota, or none.
std::optional<double> parse_cpu_max(std::string_view text);
// cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us` (quota -1: none).
std::optional<double> parse_cfs_quota(std::string_view quota_us, std::string_view period_us);

// The process's cgroups from /proc/self/cgroup: the v2 path ("0::/path") and the path
// in the v1 hierarchy that has the cpu controller ("4:cpu,cpuacct:/path"); empty if none.
struct CgroupPaths {
  std::string v2;
  std::string v1_cpu;
  std::string v1_mount_name;  // the controller list as mounted, e.g. "cpu,cpuacct"
};
CgroupPaths parse_proc_cgroup(std::string_view text);

// Workers for `workers = 0`: one per usable CPU, where a quota of q CPUs allows ceil(q)
// (1.5 CPUs keep two threads busy), at least 1 and at most `max_workers`.
unsigned workers_for_cpus(unsigned affinity_cpus, std::optional<double> quota_cpus, unsigned max_workers);

}  // namespace smtplb
