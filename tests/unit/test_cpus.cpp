// workers = 0: how many workers the CPUs this process may use allow.
#include <doctest/doctest.h>

#include "smtplb/config/cpus.hpp"

using namespace smtplb;

TEST_CASE("workers = 0 never exceeds the per-worker counter slots") {
  // The defect: a 128-CPU machine took 128 workers while counters have 64 slots.
  CHECK(workers_for_cpus(128, std::nullopt, 64) == 64);
  CHECK(workers_for_cpus(65, std::nullopt, 64) == 64);
  CHECK(workers_for_cpus(64, std::nullopt, 64) == 64);
  CHECK(workers_for_cpus(2, std::nullopt, 64) == 2);
}

TEST_CASE("workers = 0 follows the affinity mask and the cgroup quota") {
  CHECK(workers_for_cpus(1, std::nullopt, 64) == 1);
  CHECK(workers_for_cpus(0, std::nullopt, 64) == 1);  // unknown: at least one
  CHECK(workers_for_cpus(16, 2.0, 64) == 2);          // a container limited to 2 CPUs
  CHECK(workers_for_cpus(16, 1.5, 64) == 2);          // 1.5 CPUs keep two threads busy
  CHECK(workers_for_cpus(16, 0.25, 64) == 1);
  CHECK(workers_for_cpus(2, 8.0, 64) == 2);  // a quota above the mask changes nothing
  CHECK(workers_for_cpus(128, 100.0, 64) == 64);
}

TEST_CASE("cgroup v2 cpu.max") {
  CHECK_FALSE(parse_cpu_max("max 100000\n").has_value());
  CHECK(parse_cpu_max("200000 100000\n").value() == doctest::Approx(2.0));
  CHECK(parse_cpu_max("150000 100000").value() == doctest::Approx(1.5));
  CHECK_FALSE(parse_cpu_max("").has_value());
  CHECK_FALSE(parse_cpu_max("garbage").has_value());
  CHECK_FALSE(parse_cpu_max("100 0").has_value());
}

TEST_CASE("cgroup v1 cfs quota") {
  CHECK_FALSE(parse_cfs_quota("-1\n", "100000\n").has_value());
  CHECK(parse_cfs_quota("50000\n", "100000\n").value() == doctest::Approx(0.5));
  CHECK_FALSE(parse_cfs_quota("x", "100000").has_value());
}

TEST_CASE("/proc/self/cgroup: v2 path and the v1 cpu hierarchy") {
  const auto hybrid = parse_proc_cgroup(
      "9:name=systemd:/\n4:memory:/x\n2:cpu,cpuacct:/system.slice/smtplb.service\n0::/system.slice/smtplb.service\n");
  CHECK(hybrid.v2 == "/system.slice/smtplb.service");
  CHECK(hybrid.v1_cpu == "/system.slice/smtplb.service");
  CHECK(hybrid.v1_mount_name == "cpu,cpuacct");
  const auto v2 = parse_proc_cgroup("0::/user.slice\n");
  CHECK(v2.v2 == "/user.slice");
  CHECK(v2.v1_cpu.empty());
  const auto cpuacct_only = parse_proc_cgroup("3:cpuacct:/a\n");
  CHECK(cpuacct_only.v1_cpu.empty());  // "cpuacct" is not "cpu"
}
