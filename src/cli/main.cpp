#include <string>
#include <vector>

#include "cli/cli.hpp"

int main(int argc, char** argv) {
  return smtplb::run_cli(std::vector<std::string>(argv, argv + argc));
}
