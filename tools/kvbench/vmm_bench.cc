// kvbench vmm (benchmark V1): what one physical page costs in the driver's virtual memory
// API. Per 2 MiB handle (the granularity), p50 / p90 / mean latency of cuMemCreate,
// cuMemMap, cuMemSetAccess, cuMemUnmap and cuMemRelease called directly, the same five
// through kvmem's CudaVmm (what a layout pays, bookkeeping included), set access / unmap
// of many handles in one call, and cudaMalloc / cudaFree of 2 MiB as the anchor, all in
// one run. `--backend=host` measures the host backend instead (no GPU needed).
//
// Each phase runs over all handles before the next starts (create all, map all, ...), as
// the virtual layout does when it builds its pool; rounds repeat it, after one warm-up
// round that is not counted. Latencies are host wall time per call: these calls are
// synchronous on the host.
//
// The raw driver calls are looked up through the CUDA runtime
// (cudaGetDriverEntryPointByVersion), not through kvmem: nothing of kvmem runs between the
// benchmark and the driver, and, as with kvmem's CudaVmm, nothing links libcuda.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvmem/vmm.h"
#include "tools/kvbench/settings.h"
#include "tools/kvbench/subcommands.h"
#ifdef KVMEM_WITH_CUDA
#include <cuda.h>
#include <cuda_runtime_api.h>
#endif

namespace kvbench {
namespace {

using Clock = std::chrono::steady_clock;

double MicrosSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

struct Row {
  explicit Row(std::string n) : name(std::move(n)) {}
  std::string name;
  std::vector<double> us;  // one sample per handle
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * v.size()));
  return v[i];
}

double Mean(const std::vector<double>& v) {
  if (v.empty()) return 0;
  double s = 0;
  for (double x : v) s += x;
  return s / v.size();
}

void PrintRows(const std::vector<Row>& rows) {
  std::printf("%-44s %9s %9s %9s %7s\n", "op (per 2 MiB handle)", "p50_us", "p90_us", "mean_us",
              "n");
  for (const Row& r : rows) {
    std::printf("%-44s %9.2f %9.2f %9.2f %7zu\n", r.name.c_str(), Percentile(r.us, 0.5),
                Percentile(r.us, 0.9), Mean(r.us), r.us.size());
  }
}

// Dies with a message: a benchmark has no way to go on after a failed call.
#define BENCH_CHECK_OK(expr)                                                              \
  do {                                                                                    \
    const ::absl::Status s_ = (expr);                                                     \
    if (!s_.ok()) {                                                                       \
      std::fprintf(stderr, "kvbench vmm: %s failed: %s\n", #expr, s_.ToString().c_str()); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

// The five calls through the Vmm interface, per handle; then set access and unmap over
// `batch` handles in one call, reported per handle.
void BenchVmm(kvmem::Vmm* vmm, const VmmSettings& o, const std::string& prefix,
              std::vector<Row>* rows) {
  const int64_t g = vmm->granularity();
  const int n = o.handles;
  Row create{prefix + "create"}, map{prefix + "map"}, access{prefix + "set_access"},
      unmap{prefix + "unmap"}, release{prefix + "release"},
      access_b{prefix + "set_access x" + std::to_string(o.batch) + " (per handle)"},
      unmap_b{prefix + "unmap x" + std::to_string(o.batch) + " (per handle)"};
  absl::StatusOr<uintptr_t> base = vmm->Reserve(n * g);
  BENCH_CHECK_OK(base.status());
  std::vector<kvmem::PhysHandle> hs(n);
  for (int round = 0; round <= o.rounds; ++round) {
    const bool keep = round > 0;  // round 0 warms up
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      absl::StatusOr<kvmem::PhysHandle> h = vmm->Create();
      const double us = MicrosSince(t0);
      BENCH_CHECK_OK(h.status());
      hs[i] = *h;
      if (keep) create.us.push_back(us);
    }
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_OK(vmm->Map(*base + i * g, hs[i]));
      if (keep) map.us.push_back(MicrosSince(t0));
    }
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_OK(vmm->SetAccess(*base + i * g, g));
      if (keep) access.us.push_back(MicrosSince(t0));
    }
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_OK(vmm->Unmap(*base + i * g, g));
      if (keep) unmap.us.push_back(MicrosSince(t0));
    }
    // Batched: map again, then set access and unmap `batch` handles per call.
    for (int i = 0; i < n; ++i) BENCH_CHECK_OK(vmm->Map(*base + i * g, hs[i]));
    for (int i = 0; i + o.batch <= n; i += o.batch) {
      const auto t0 = Clock::now();
      BENCH_CHECK_OK(vmm->SetAccess(*base + i * g, o.batch * g));
      if (keep) access_b.us.push_back(MicrosSince(t0) / o.batch);
    }
    for (int i = 0; i + o.batch <= n; i += o.batch) {
      const auto t0 = Clock::now();
      BENCH_CHECK_OK(vmm->Unmap(*base + i * g, o.batch * g));
      if (keep) unmap_b.us.push_back(MicrosSince(t0) / o.batch);
    }
    for (int i = n / o.batch * o.batch; i < n; ++i) BENCH_CHECK_OK(vmm->Unmap(*base + i * g, g));
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_OK(vmm->Release(hs[i]));
      if (keep) release.us.push_back(MicrosSince(t0));
    }
  }
  BENCH_CHECK_OK(vmm->FreeReservation(*base, n * g));
  for (Row* r : {&create, &map, &access, &unmap, &release, &access_b, &unmap_b}) {
    rows->push_back(std::move(*r));
  }
}

#ifdef KVMEM_WITH_CUDA

const Row* Find(const std::vector<Row>& rows, const std::string& name) {
  for (const Row& r : rows) {
    if (r.name == name) return &r;
  }
  return nullptr;
}

// The driver entry points V1 calls, typed from the declarations of <cuda.h>.
#define KVBENCH_DRIVER_CALLS(X) \
  X(cuDriverGetVersion)         \
  X(cuGetErrorName)             \
  X(cuMemAddressReserve)        \
  X(cuMemAddressFree)           \
  X(cuMemCreate)                \
  X(cuMemRelease)               \
  X(cuMemMap)                   \
  X(cuMemUnmap)                 \
  X(cuMemSetAccess)
struct DriverCalls {
#define KVBENCH_DRIVER_FIELD(name) decltype(&::name) name = nullptr;
  KVBENCH_DRIVER_CALLS(KVBENCH_DRIVER_FIELD)
#undef KVBENCH_DRIVER_FIELD
};

// The entry points of the driver the runtime loaded, at the ABI of the <cuda.h> this is
// built with. REQUIRES: the runtime is initialised on the device.
absl::StatusOr<DriverCalls> LoadDriverCalls() {
  DriverCalls d;
  auto load = [](const char* name, void** fn) -> absl::Status {
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t e =
        cudaGetDriverEntryPointByVersion(name, fn, CUDA_VERSION, cudaEnableDefault, &found);
#else
    const cudaError_t e = cudaGetDriverEntryPoint(name, fn, cudaEnableDefault, &found);
#endif
    if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || *fn == nullptr) {
      return absl::UnavailableError(std::string("the driver has no entry point ") + name + " (" +
                                    cudaGetErrorString(e) + ")");
    }
    return absl::OkStatus();
  };
#define KVBENCH_DRIVER_LOAD(name)                                                 \
  if (absl::Status s = load(#name, reinterpret_cast<void**>(&d.name)); !s.ok()) { \
    return s;                                                                     \
  }
  KVBENCH_DRIVER_CALLS(KVBENCH_DRIVER_LOAD)
#undef KVBENCH_DRIVER_LOAD
  return d;
}

// "CUDA_ERROR_OUT_OF_MEMORY (2)", or the number where the driver cannot name it.
std::string DriverError(const DriverCalls& d, CUresult r) {
  const char* name = nullptr;
  if (d.cuGetErrorName(r, &name) != CUDA_SUCCESS || name == nullptr) name = "unknown error";
  return std::string(name) + " (" + std::to_string(static_cast<int>(r)) + ")";
}

#define BENCH_CHECK_CU(drv, expr)                                                                 \
  do {                                                                                            \
    const CUresult r_ = (expr);                                                                   \
    if (r_ != CUDA_SUCCESS) {                                                                     \
      std::fprintf(stderr, "kvbench vmm: %s failed: %s\n", #expr, DriverError(*drv, r_).c_str()); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)
#define BENCH_CHECK_CUDART(expr)                                                           \
  do {                                                                                     \
    const cudaError_t e_ = (expr);                                                         \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "kvbench vmm: %s failed: %s\n", #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

// The driver's calls with nothing of kvmem around them, in the runtime's primary context.
void BenchDriver(const DriverCalls* d, const VmmSettings& o, size_t g, std::vector<Row>* rows) {
  const int n = o.handles;
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = o.device;
  CUmemAccessDesc desc = {};
  desc.location = prop.location;
  desc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  Row create{"cuMemCreate"}, map{"cuMemMap"}, access{"cuMemSetAccess"}, unmap{"cuMemUnmap"},
      release{"cuMemRelease"},
      access_b{"cuMemSetAccess x" + std::to_string(o.batch) + " (per handle)"},
      unmap_b{"cuMemUnmap x" + std::to_string(o.batch) + " (per handle)"},
      malloc_row{"cudaMalloc 2 MiB (anchor)"}, free_row{"cudaFree 2 MiB (anchor)"};
  CUdeviceptr base = 0;
  BENCH_CHECK_CU(d, d->cuMemAddressReserve(&base, n * g, g, 0, 0));
  std::vector<CUmemGenericAllocationHandle> hs(n);
  std::vector<void*> ptrs(n);
  for (int round = 0; round <= o.rounds; ++round) {
    const bool keep = round > 0;
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_CU(d, d->cuMemCreate(&hs[i], g, &prop, 0));
      if (keep) create.us.push_back(MicrosSince(t0));
    }
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_CU(d, d->cuMemMap(base + i * g, g, 0, hs[i], 0));
      if (keep) map.us.push_back(MicrosSince(t0));
    }
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_CU(d, d->cuMemSetAccess(base + i * g, g, &desc, 1));
      if (keep) access.us.push_back(MicrosSince(t0));
    }
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_CU(d, d->cuMemUnmap(base + i * g, g));
      if (keep) unmap.us.push_back(MicrosSince(t0));
    }
    for (int i = 0; i < n; ++i) BENCH_CHECK_CU(d, d->cuMemMap(base + i * g, g, 0, hs[i], 0));
    for (int i = 0; i + o.batch <= n; i += o.batch) {
      const auto t0 = Clock::now();
      BENCH_CHECK_CU(d, d->cuMemSetAccess(base + i * g, o.batch * g, &desc, 1));
      if (keep) access_b.us.push_back(MicrosSince(t0) / o.batch);
    }
    for (int i = 0; i + o.batch <= n; i += o.batch) {
      const auto t0 = Clock::now();
      BENCH_CHECK_CU(d, d->cuMemUnmap(base + i * g, o.batch * g));
      if (keep) unmap_b.us.push_back(MicrosSince(t0) / o.batch);
    }
    for (int i = n / o.batch * o.batch; i < n; ++i) {
      BENCH_CHECK_CU(d, d->cuMemUnmap(base + i * g, g));
    }
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_CU(d, d->cuMemRelease(hs[i]));
      if (keep) release.us.push_back(MicrosSince(t0));
    }
    // The anchor, interleaved in the same rounds so that both see the same machine state.
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_CUDART(cudaMalloc(&ptrs[i], g));
      if (keep) malloc_row.us.push_back(MicrosSince(t0));
    }
    for (int i = 0; i < n; ++i) {
      const auto t0 = Clock::now();
      BENCH_CHECK_CUDART(cudaFree(ptrs[i]));
      if (keep) free_row.us.push_back(MicrosSince(t0));
    }
  }
  BENCH_CHECK_CU(d, d->cuMemAddressFree(base, n * g));
  for (Row* r :
       {&create, &map, &access, &unmap, &release, &access_b, &unmap_b, &malloc_row, &free_row}) {
    rows->push_back(std::move(*r));
  }
}

int RunCuda(const VmmSettings& o) {
  absl::StatusOr<std::unique_ptr<kvmem::Vmm>> vmm = kvmem::MakeCudaVmm(o.device);
  if (!vmm.ok()) {
    std::fprintf(stderr, "kvbench vmm: %s\n", vmm.status().ToString().c_str());
    return 1;
  }
  BENCH_CHECK_CUDART(cudaSetDevice(o.device));
  BENCH_CHECK_CUDART(cudaFree(nullptr));  // creates the runtime's (primary) context
  absl::StatusOr<DriverCalls> d = LoadDriverCalls();
  if (!d.ok()) {
    std::fprintf(stderr, "kvbench vmm: %s\n", d.status().ToString().c_str());
    return 1;
  }
  cudaDeviceProp prop{};
  BENCH_CHECK_CUDART(cudaGetDeviceProperties(&prop, o.device));
  int driver_version = 0;
  d->cuDriverGetVersion(&driver_version);
  const size_t g = static_cast<size_t>((*vmm)->granularity());
  std::printf(
      "kvbench vmm (V1): device %d %s, driver API %d.%d, granularity %zu bytes, "
      "%d handles x %d rounds (+1 warm-up), batch %d\n",
      o.device, prop.name, driver_version / 1000, (driver_version % 1000) / 10, g, o.handles,
      o.rounds, o.batch);
  std::vector<Row> rows;
  BenchDriver(&*d, o, g, &rows);
  BenchVmm(vmm->get(), o, "kvmem CudaVmm ", &rows);
  PrintRows(rows);
  const double create = Percentile(Find(rows, "cuMemCreate")->us, 0.5);
  const double map = Percentile(Find(rows, "cuMemMap")->us, 0.5);
  const double access = Percentile(Find(rows, "cuMemSetAccess")->us, 0.5);
  const double unmap = Percentile(Find(rows, "cuMemUnmap")->us, 0.5);
  const double release = Percentile(Find(rows, "cuMemRelease")->us, 0.5);
  const double malloc_us = Percentile(Find(rows, "cudaMalloc 2 MiB (anchor)")->us, 0.5);
  const double free_us = Percentile(Find(rows, "cudaFree 2 MiB (anchor)")->us, 0.5);
  std::printf(
      "summary p50: create+map+set_access %.1f us vs cudaMalloc %.1f us (%.2fx); "
      "unmap+release %.1f us vs cudaFree %.1f us (%.2fx); recycling a handle (map+set_access) "
      "%.1f us (%.2fx cudaMalloc)\n",
      create + map + access, malloc_us, (create + map + access) / malloc_us, unmap + release,
      free_us, (unmap + release) / free_us, map + access, (map + access) / malloc_us);
  return 0;
}

#endif  // KVMEM_WITH_CUDA

}  // namespace

int RunVmm(const VmmSettings& o) {
  if (o.backend == VmmBackend::kHost) {
    absl::StatusOr<std::unique_ptr<kvmem::Vmm>> vmm = kvmem::MakeHostVmm(int64_t{2} << 20);
    if (!vmm.ok()) {
      std::fprintf(stderr, "kvbench vmm: %s\n", vmm.status().ToString().c_str());
      return 1;
    }
    std::printf(
        "kvbench vmm (V1): host backend, granularity 2 MiB, %d handles x %d rounds "
        "(+1 warm-up), batch %d\n",
        o.handles, o.rounds, o.batch);
    std::vector<Row> rows;
    BenchVmm(vmm->get(), o, "kvmem HostVmm ", &rows);
    PrintRows(rows);
    return 0;
  }
#ifdef KVMEM_WITH_CUDA
  return RunCuda(o);
#else
  // Validate(VmmSettings*) turns --backend=cuda down in a build without CUDA.
  std::fprintf(stderr, "kvbench vmm: built without CUDA; use --backend=host\n");
  return 1;
#endif
}

}  // namespace kvbench
