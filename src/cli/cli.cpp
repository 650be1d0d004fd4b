#include "cli/cli.hpp"

#include <spdlog/spdlog.h>

#include <cstdio>
#include <exception>
#include <optional>

#include "cli/agent.hpp"
#include "cli/ctl.hpp"
#include "control/process.hpp"
#include "control/resolver.hpp"
#include "log/log.hpp"
#include "smtplb/config/config.hpp"
#include "smtplb/version.hpp"

namespace smtplb {

namespace {

constexpr const char* kUsage =
    "usage: smtplb [-f|--config FILE] [-c|--check] [-q|--quiet] [--log-level LEVEL] [-V|--version]\n"
    "       smtplb ctl [--socket PATH] status | drain|ready|maint POOL/SERVER | weight POOL/SERVER N | reload\n"
    "                                  | drain [--wait QUIET [--timeout MAX]] | ready\n"
    "       smtplb agent [-f FILE] [--check] [--once]   (on a Postfix host: queue-aware agent-check)\n"
    "\n"
    "  -f, --config FILE    configuration file (default /etc/smtplb/smtplb.toml)\n"
    "  -c, --check          validate the configuration, print every problem, and exit\n"
    "  -q, --quiet          with --check: print nothing on success\n"
    "      --log-level L    override log.level: trace, debug, info, warn, error\n"
    "  -V, --version        print the version and exit\n"
    "  -h, --help           print this help and exit\n";

int usage_error(const std::string& msg) {
  std::fprintf(stderr, "smtplb: %s\n%s", msg.c_str(), kUsage);
  return kExitUsage;
}

std::optional<LogLevel> parse_level(const std::string& s) {
  if (s == "trace") return LogLevel::trace;
  if (s == "debug") return LogLevel::debug;
  if (s == "info") return LogLevel::info;
  if (s == "warn") return LogLevel::warn;
  if (s == "error") return LogLevel::error;
  return std::nullopt;
}

}  // namespace

int run_cli(const std::vector<std::string>& args) {
  std::string config_path = kDefaultConfig;
  bool check = false, quiet = false;
  std::optional<LogLevel> level;

  if (args.size() > 1 && args[1] == "ctl") return run_ctl(std::vector<std::string>(args.begin() + 1, args.end()));
  if (args.size() > 1 && args[1] == "agent") return run_agent(std::vector<std::string>(args.begin() + 1, args.end()));
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&](const char* name) -> std::optional<std::string> {
      if (i + 1 >= args.size()) return std::nullopt;
      (void)name;
      return args[++i];
    };
    if (a == "-f" || a == "--config") {
      auto v = value("--config");
      if (!v) return usage_error(a + " needs a file name");
      config_path = *v;
    } else if (a.rfind("--config=", 0) == 0) {
      config_path = a.substr(9);
    } else if (a == "-c" || a == "--check") {
      check = true;
    } else if (a == "-q" || a == "--quiet") {
      quiet = true;
    } else if (a == "--log-level" || a.rfind("--log-level=", 0) == 0) {
      std::optional<std::string> v = a == "--log-level" ? value("--log-level") : a.substr(12);
      if (!v) return usage_error("--log-level needs a level");
      level = parse_level(*v);
      if (!level) return usage_error("unknown log level '" + *v + "' (trace, debug, info, warn, error)");
    } else if (a == "-V" || a == "--version") {
      std::printf("smtplb %s\n", kVersion);
      return kExitOk;
    } else if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return kExitOk;
    } else {
      return usage_error("unknown argument '" + a + "'");
    }
  }

  // Host names are looked up here, before anything starts. One that does not resolve is
  // a warning, not an error: the server starts DOWN and its name is looked up again (a
  // DNS hiccup at boot must not keep the service down).
  ConfigLoad load = resolve_config_now(load_config_file(config_path));
  if (!load.ok()) {
    for (const auto& e : load.errors) std::fprintf(stderr, "%s\n", e.to_string().c_str());
    if (check) return kExitConfig;
    if (load.errors.size() == 1 && load.errors[0].line == 0)
      std::fprintf(stderr, "smtplb: not started (-f names the configuration file, default %s)\n", kDefaultConfig);
    else
      std::fprintf(stderr, "smtplb: configuration file %s has errors; not started\n", config_path.c_str());
    return kExitConfig;
  }
  if (check) {
    for (const auto& w : load.warnings) {
      ConfigError e = w;
      e.message = "warning: " + e.message;
      std::fprintf(stderr, "%s\n", e.to_string().c_str());
    }
    if (!quiet) std::printf("configuration file %s test is successful\n", config_path.c_str());
    return kExitOk;
  }

  std::string error;
  if (!setup_logging(load.config->log, level.value_or(load.config->log.level), error)) {
    std::fprintf(stderr, "smtplb: %s\n", error.c_str());
    return kExitFailure;
  }
  for (const auto& w : load.warnings) spdlog::warn("{}", w.to_string());
  try {
    Process process(load.config, level);
    return process.run();
  } catch (const std::exception& e) {
    spdlog::error("fatal: {}", e.what());
    return kExitFailure;
  }
}

}  // namespace smtplb
