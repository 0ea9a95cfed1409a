// The kvbench subcommands' benchmarks, each given settings that passed Validate
// (settings.h); each returns the process's exit code. main.cc parses the command line.
// The GPU ones are defined in their .cu files, and in no_cuda.cc where the build has no
// CUDA (they say so and fail there).
#ifndef KVMEM_TOOLS_KVBENCH_SUBCOMMANDS_H_
#define KVMEM_TOOLS_KVBENCH_SUBCOMMANDS_H_

#include "tools/kvbench/settings.h"

namespace kvbench {

int RunDecode(const DecodeSettings& s);    // decode_bench.cu
int RunPrefill(const PrefillSettings& s);  // prefill_bench.cu
int RunMapper(const MapperSettings& s);    // mapper_bench.cu
int RunVmm(const VmmSettings& s);          // vmm_bench.cc (host and CUDA builds)
int RunSteps(const StepsSettings& s);      // steps_bench.cc (host and CUDA builds)

}  // namespace kvbench

#endif  // KVMEM_TOOLS_KVBENCH_SUBCOMMANDS_H_
