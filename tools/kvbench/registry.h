// kvbench subcommands register themselves here: `kvbench NAME [flags]` runs one.
// Each benchmark lives in its own file (vmm_bench.cc, decode_bench.cu, ...).
#ifndef KVMEM_TOOLS_KVBENCH_REGISTRY_H_
#define KVMEM_TOOLS_KVBENCH_REGISTRY_H_

#include <string>
#include <vector>

namespace kvbench {

// Runs the benchmark with the arguments after its name; returns the process exit code.
using BenchFn = int (*)(const std::vector<std::string>& args);

struct Bench {
  const char* name;
  const char* help;
  BenchFn fn;
};

std::vector<Bench>& Registry();

struct Registrar {
  Registrar(const char* name, const char* help, BenchFn fn) {
    Registry().push_back({name, help, fn});
  }
};

}  // namespace kvbench

#define KVBENCH_REGISTER(ident, name, help, fn) \
  static ::kvbench::Registrar kvbench_registrar_##ident(name, help, fn)

#endif  // KVMEM_TOOLS_KVBENCH_REGISTRY_H_
