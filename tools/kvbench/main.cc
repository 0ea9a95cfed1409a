// kvbench: kernel and allocator benchmarks. `kvbench` lists the subcommands.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "tools/kvbench/registry.h"

namespace kvbench {
std::vector<Bench>& Registry() {
  static std::vector<Bench> registry;
  return registry;
}
}  // namespace kvbench

int main(int argc, char** argv) {
  auto& reg = kvbench::Registry();
  std::sort(reg.begin(), reg.end(), [](const kvbench::Bench& a, const kvbench::Bench& b) {
    return std::strcmp(a.name, b.name) < 0;
  });
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0) {
    std::printf("usage: kvbench SUBCOMMAND [args]\n\nsubcommands:\n");
    for (const auto& b : reg) std::printf("  %-12s %s\n", b.name, b.help);
    return argc < 2 ? 2 : 0;
  }
  for (const auto& b : reg) {
    if (std::strcmp(b.name, argv[1]) == 0)
      return b.fn(std::vector<std::string>(argv + 2, argv + argc));
  }
  std::fprintf(stderr, "kvbench: unknown subcommand '%s' (run kvbench --help)\n", argv[1]);
  return 2;
}
