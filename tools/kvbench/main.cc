// kvbench: kernel and allocator benchmarks. `kvbench --help` lists the subcommands,
// `kvbench SUBCOMMAND --help` a subcommand's flags.
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "tools/kvbench/flags.h"
#include "tools/kvbench/settings.h"
#include "tools/kvbench/subcommands.h"

namespace kvbench {
namespace {

// Parses a subcommand's flags into its settings, validates them and runs it.
template <typename Settings, int (*kBench)(const Settings&)>
int Run(std::string_view name, const char* about, const std::vector<std::string>& args) {
  Settings settings;
  FlagSet flags("kvbench " + std::string(name), about);
  DeclareFlags(&settings, &flags);
  if (std::optional<int> rc = ParseCommandLine(flags, args, [&] { return Validate(&settings); })) {
    return *rc;
  }
  return kBench(settings);
}

struct Subcommand {
  const char* name;
  const char* about;
  bool needs_cuda;
  int (*run)(std::string_view name, const char* about, const std::vector<std::string>& args);
};

// In the order `kvbench --help` lists them. tools/gpu/run_gpu_suite.sh runs each line of
// that list that starts with two spaces and a name.
constexpr Subcommand kSubcommands[] = {
    {"decode", "D1, D2: decode attention over kvmem's caches vs the measured read bandwidth", true,
     &Run<DecodeSettings, RunDecode>},
    {"mapper", "V2: decode steps stalled on mapping, background mapper off vs on", true,
     &Run<MapperSettings, RunMapper>},
    {"prefill", "P1: extend / prefill attention over the paged and virtual layouts, TFLOP/s", true,
     &Run<PrefillSettings, RunPrefill>},
    {"vmm",
     "V1: driver VMM call latency per 2 MiB handle vs cudaMalloc (--backend=host: the "
     "host backend)",
     false, &Run<VmmSettings, RunVmm>},
    {"steps",
     "host bookkeeping around each step (decode, prefill, churn, fork, rewind, pressure): "
     "per-request calls vs batch calls",
     false, &Run<StepsSettings, RunSteps>},
};

void PrintHelp(std::FILE* out) {
#ifdef KVMEM_WITH_CUDA
  constexpr bool kCuda = true;
#else
  constexpr bool kCuda = false;
#endif
  std::fprintf(out,
               "usage: kvbench SUBCOMMAND [--flag=value ...]\n"
               "Benchmarks of kvmem's kernels and allocators (docs/gpu.md, docs/benchmarks.md).\n"
               "\nsubcommands:\n");
  for (const Subcommand& c : kSubcommands) {
    std::fprintf(out, "  %-8s %s%s\n", c.name, c.about,
                 c.needs_cuda && !kCuda ? " (needs a CUDA build)" : "");
  }
  std::fprintf(out,
               "\n'kvbench SUBCOMMAND --help' lists its flags: --name=value, or --name alone "
               "for a boolean.\n");
}

}  // namespace
}  // namespace kvbench

int main(int argc, char** argv) {
  if (argc < 2) {
    kvbench::PrintHelp(stderr);
    return 2;
  }
  const std::string_view command = argv[1];
  if (command == "--help" || command == "help") {
    kvbench::PrintHelp(stdout);
    return 0;
  }
  const std::vector<std::string> args(argv + 2, argv + argc);
  for (const kvbench::Subcommand& c : kvbench::kSubcommands) {
    if (command == c.name) return c.run(c.name, c.about, args);
  }
  std::fprintf(stderr, "kvbench: unknown subcommand '%s' (kvbench --help lists them)\n", argv[1]);
  return 2;
}
