#pragma once
// Process logging (spdlog): stderr (with journald priority prefixes under systemd),
// syslog (facility mail) or a file that SIGUSR1 reopens for logrotate.
#include <spdlog/spdlog.h>

#include <string>

#include "smtplb/config/config.hpp"

namespace smtplb {

spdlog::level::level_enum to_spdlog(LogLevel level);

// Installs the process logger. False, with `error` set, when the log file cannot be
// opened (the caller reports it on stderr).
bool setup_logging(const LogConfig& cfg, LogLevel level, std::string& error);
void set_log_level(LogLevel level);
// Reopens the log file (target "file"); a no-op for other targets. False on failure,
// in which case logging goes on to the old file.
bool reopen_log(std::string& error);

}  // namespace smtplb
