#pragma once
// Reads what `workers = 0` needs to know about this process's CPUs: its affinity mask
// and the CPU quota of its cgroup (v2 cpu.max or v1 cfs quota, the tightest one on the
// way up to the root). The decision itself is smtplb/cpus.hpp, pure.
#include <optional>
#include <string>

namespace smtplb {

struct CpuBudget {
  unsigned affinity = 1;        // CPUs in the affinity mask
  std::optional<double> quota;  // CPUs' worth of cgroup quota, when one is set
  std::string quota_source;     // the file that set it, for the log
};

CpuBudget probe_cpus();

}  // namespace smtplb
