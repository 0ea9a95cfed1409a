// The GPU subcommands in a build without CUDA: their flags still parse and --help still
// lists them (settings.cc is host code); running one says what is missing.
#ifndef KVMEM_WITH_CUDA

#include <cstdio>

#include "tools/kvbench/settings.h"
#include "tools/kvbench/subcommands.h"

namespace kvbench {
namespace {

int NeedsCuda(const char* name) {
  std::fprintf(stderr,
               "kvbench %s: this kvbench is built without CUDA (no nvcc at configure time); "
               "build with -DKVMEM_CUDA=ON to run it\n",
               name);
  return 1;
}

}  // namespace

int RunDecode(const DecodeSettings&) { return NeedsCuda("decode"); }
int RunPrefill(const PrefillSettings&) { return NeedsCuda("prefill"); }
int RunMapper(const MapperSettings&) { return NeedsCuda("mapper"); }

}  // namespace kvbench

#endif  // KVMEM_WITH_CUDA
