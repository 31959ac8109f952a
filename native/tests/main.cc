// Runs the registered native test cases. `--list` prints their names; names
// as arguments run just those; no arguments runs all. One line per case:
// "ok <name>" or "not ok <name>: <why>". Exit status 1 when any failed.
#include <cstdio>
#include <cstring>
#include <exception>

#include "testing.h"

namespace vmlet::testing {
std::vector<Case>& Cases() {
  static std::vector<Case> cases;
  return cases;
}
}  // namespace vmlet::testing

int main(int argc, char** argv) {
  auto& cases = vmlet::testing::Cases();
  if (argc == 2 && std::strcmp(argv[1], "--list") == 0) {
    for (auto& c : cases) std::printf("%s\n", c.name.c_str());
    return 0;
  }
  int failed = 0, ran = 0;
  for (auto& c : cases) {
    bool wanted = argc == 1;
    for (int i = 1; i < argc && !wanted; i++) wanted = c.name == argv[i];
    if (!wanted) continue;
    ran++;
    try {
      c.fn();
      std::printf("ok %s\n", c.name.c_str());
    } catch (const std::exception& e) {
      failed++;
      std::printf("not ok %s: %s\n", c.name.c_str(), e.what());
    }
    std::fflush(stdout);
  }
  if (argc > 1 && ran != argc - 1) {
    std::printf("not ok: %d of %d requested cases exist\n", ran, argc - 1);
    return 1;
  }
  return failed ? 1 : 0;
}
