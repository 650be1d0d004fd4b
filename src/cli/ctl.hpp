#pragma once
#include <string>
#include <vector>

namespace smtplb {

// `smtplb ctl ...`: talks to the admin unix socket. args[0] is "ctl".
int run_ctl(const std::vector<std::string>& args);

}  // namespace smtplb
