#pragma once
#include <string>
#include <vector>

namespace smtplb {

// Exit codes (sysexits).
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 64;
inline constexpr int kExitConfig = 78;

inline constexpr const char* kDefaultConfig = "/etc/smtplb/smtplb.toml";

// Entry point behind main(): parses the command line and runs the chosen mode.
int run_cli(const std::vector<std::string>& args);

}  // namespace smtplb
