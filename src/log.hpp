#pragma once
#include <spdlog/spdlog.h>

#include "smtplb/config.hpp"

namespace smtplb {

// Installs the process logger (stderr, one line per event) at the given level.
void setup_logging(LogLevel level);
spdlog::level::level_enum to_spdlog(LogLevel level);

}  // namespace smtplb
