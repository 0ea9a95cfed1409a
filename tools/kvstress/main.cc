// kvstress: replays a serving workload against kvmem's real KV caches under several
// memory policies and reports what each costs. docs/kvstress.md describes every flag.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/strip.h"
#include "tools/kvstress/options.h"
#include "tools/kvstress/run.h"

namespace {
const kvstress::FlagValues kDefaults;
}  // namespace

ABSL_FLAG(std::string, device, kDefaults.device,
          "host (real virtual memory on the CPU) or cuda / cuda:N (the CUDA backend)");
ABSL_FLAG(std::string, workload, kDefaults.workload,
          "built-in mix: chat, long-context, shared-system-prompt or adversarial");
ABSL_FLAG(std::string, trace, kDefaults.trace,
          "replay this CSV instead of a mix: arrival_step,prompt_len,output_len[,prefix_group]");
ABSL_FLAG(uint64_t, seed, kDefaults.seed, "random seed of the mix");
ABSL_FLAG(double, arrival_rate, kDefaults.arrival_rate,
          "mean requests arriving per step (Poisson); -1: the mix's default");
ABSL_FLAG(int64_t, requests, kDefaults.requests, "number of requests the mix generates");
ABSL_FLAG(double, scale, kDefaults.scale,
          "multiplies --requests, --arrival_rate, --budget_gib and --max_requests together "
          "(a smaller or larger run under the same pressure)");
ABSL_FLAG(int64_t, layers, kDefaults.layers, "model layers");
ABSL_FLAG(int64_t, kv_heads, kDefaults.kv_heads, "KV heads per layer");
ABSL_FLAG(int64_t, head_dim, kDefaults.head_dim, "head dimension");
ABSL_FLAG(std::string, dtype, kDefaults.dtype, "KV element type: bf16, fp16 or fp32");
ABSL_FLAG(double, budget_gib, kDefaults.budget_gib, "KV memory budget of every policy, GiB");
ABSL_FLAG(int64_t, max_context, kDefaults.max_context, "maximum tokens of one request");
ABSL_FLAG(int64_t, max_requests, kDefaults.max_requests,
          "request rows of each cache (concurrent requests, prefix holders included)");
ABSL_FLAG(int64_t, steps, kDefaults.steps, "stop after this many steps even if not drained");
ABSL_FLAG(std::string, policies, kDefaults.policies,
          "comma-separated subset of static, paged-1, paged-16, paged-64, virtual, "
          "virtual-chunk, virtual-layer; or all");
ABSL_FLAG(std::string, json, kDefaults.json, "write everything, per-step series included, here");
ABSL_FLAG(std::string, plot, kDefaults.plot, "write an SVG of bytes held and live per step here");
ABSL_FLAG(int64_t, prefix_len, kDefaults.prefix_len,
          "tokens of the shared prefix of a prefix group (shared-system-prompt and traces)");
ABSL_FLAG(int64_t, num_prefixes, kDefaults.num_prefixes,
          "distinct shared prefixes of the shared-system-prompt mix");
ABSL_FLAG(int64_t, host_page_kib, kDefaults.host_page_kib,
          "page granularity of the host backend in KiB (2048 mirrors GPUs; 4 for tiny runs)");
ABSL_FLAG(int64_t, check_invariants, kDefaults.check_invariants,
          "run KvCache::CheckInvariants every N steps (0: only at the end)");
ABSL_FLAG(bool, progress, kDefaults.progress, "progress bar on stderr when it is a terminal");

namespace {

// kvstress's flags are the ones defined in this file.
bool IsKvstressFile(absl::string_view file) {
  return absl::EndsWith(file, "tools/kvstress/main.cc");
}

bool IsHelpFlag(absl::string_view arg) {
  return arg == "--help" || arg == "-help" || arg == "-h" || arg == "--helpshort" ||
         arg == "-helpshort";
}

// --help: the usage line and kvstress's flags with their defaults, on stdout. absl's own
// --help lists only flags of a file named after the program (kvstress.cc), finds none
// here ("No flags matched") and exits 1; --helpfull stays absl's, listing every flag.
void PrintHelp() {
  std::vector<absl::CommandLineFlag*> flags;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (IsKvstressFile(flag->Filename())) flags.push_back(flag);
  }
  std::sort(flags.begin(), flags.end(),
            [](const absl::CommandLineFlag* a, const absl::CommandLineFlag* b) {
              return a->Name() < b->Name();
            });
  std::string text =
      absl::StrFormat("%s\n\nflags (docs/kvstress.md says more):\n", absl::ProgramUsageMessage());
  for (const absl::CommandLineFlag* f : flags) {
    const std::string def = f->DefaultValue();
    text += absl::StrFormat("  --%s (default %s)\n      %s\n", f->Name(),
                            def.empty() ? "\"\"" : def, f->Help());
  }
  text += "  --helpfull lists the libraries' flags too\n";
  std::fputs(text.c_str(), stdout);
}

// Names of kvstress's flags on the command line, read from argv as absl parses it
// ("--name=value", "--name value", "-name", "--noname" for booleans; nothing after "--"):
// this absl keeps its own record of them private.
std::set<std::string> SpecifiedFlags(int argc, char** argv) {
  std::set<std::string> names;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") break;
    if (!absl::ConsumePrefix(&arg, "-")) continue;
    absl::ConsumePrefix(&arg, "-");
    absl::string_view name = arg.substr(0, arg.find('='));
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr && absl::ConsumePrefix(&name, "no")) flag = absl::FindCommandLineFlag(name);
    if (flag != nullptr && IsKvstressFile(flag->Filename())) names.insert(std::string(name));
  }
  return names;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "serving simulation over kvmem's KV caches: compares static reservation, paged and "
      "virtual layouts on one workload.\nusage: kvstress [--workload=chat|long-context|"
      "shared-system-prompt|adversarial | --trace=FILE] [flags]");
  // absl's --helpshort and --helppackage then list kvstress's flags too.
  absl::FlagsUsageConfig usage;
  usage.contains_helpshort_flags = IsKvstressFile;
  usage.contains_help_flags = IsKvstressFile;
  usage.contains_helppackage_flags = IsKvstressFile;
  absl::SetFlagsUsageConfig(usage);
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--") == 0) break;
    if (IsHelpFlag(argv[i])) {
      PrintHelp();
      return 0;
    }
  }
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() > 1) {
    std::fprintf(stderr, "kvstress: unexpected argument '%s' (flags are --name=value)\n", rest[1]);
    return 2;
  }
  kvstress::FlagValues f;
  f.device = absl::GetFlag(FLAGS_device);
  f.workload = absl::GetFlag(FLAGS_workload);
  f.trace = absl::GetFlag(FLAGS_trace);
  f.seed = absl::GetFlag(FLAGS_seed);
  f.arrival_rate = absl::GetFlag(FLAGS_arrival_rate);
  f.requests = absl::GetFlag(FLAGS_requests);
  f.scale = absl::GetFlag(FLAGS_scale);
  f.layers = absl::GetFlag(FLAGS_layers);
  f.kv_heads = absl::GetFlag(FLAGS_kv_heads);
  f.head_dim = absl::GetFlag(FLAGS_head_dim);
  f.dtype = absl::GetFlag(FLAGS_dtype);
  f.budget_gib = absl::GetFlag(FLAGS_budget_gib);
  f.max_context = absl::GetFlag(FLAGS_max_context);
  f.max_requests = absl::GetFlag(FLAGS_max_requests);
  f.steps = absl::GetFlag(FLAGS_steps);
  f.policies = absl::GetFlag(FLAGS_policies);
  f.json = absl::GetFlag(FLAGS_json);
  f.plot = absl::GetFlag(FLAGS_plot);
  f.prefix_len = absl::GetFlag(FLAGS_prefix_len);
  f.num_prefixes = absl::GetFlag(FLAGS_num_prefixes);
  f.host_page_kib = absl::GetFlag(FLAGS_host_page_kib);
  f.check_invariants = absl::GetFlag(FLAGS_check_invariants);
  f.progress = absl::GetFlag(FLAGS_progress);
  f.specified = SpecifiedFlags(argc, argv);

  absl::StatusOr<kvstress::RunConfig> rc = kvstress::BuildRunConfig(f);
  if (!rc.ok()) {
    std::fprintf(stderr, "kvstress: %s\n", std::string(rc.status().message()).c_str());
    return 2;
  }
  absl::StatusOr<std::vector<kvstress::SimResult>> results = kvstress::Run(*rc, stdout);
  if (!results.ok()) {
    std::fflush(stdout);
    std::fprintf(stderr, "kvstress: %s\n", std::string(results.status().message()).c_str());
    return 1;
  }
  return 0;
}
