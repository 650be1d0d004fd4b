#include "log.hpp"

#include <spdlog/sinks/stdout_sinks.h>

namespace smtplb {

spdlog::level::level_enum to_spdlog(LogLevel level) {
  switch (level) {
    case LogLevel::trace: return spdlog::level::trace;
    case LogLevel::debug: return spdlog::level::debug;
    case LogLevel::info: return spdlog::level::info;
    case LogLevel::warn: return spdlog::level::warn;
    case LogLevel::error: return spdlog::level::err;
  }
  return spdlog::level::info;
}

void setup_logging(LogLevel level) {
  auto logger = spdlog::stderr_logger_mt("smtplb");
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%e%z %l: %v");
  logger->set_level(to_spdlog(level));
  // Warnings and errors are rare and must not be lost in a crash right after them.
  logger->flush_on(spdlog::level::warn);
  spdlog::set_default_logger(logger);
}

}  // namespace smtplb
