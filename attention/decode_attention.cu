// Decode attention launcher: validates a launch on the host and starts the kernels of
// attention/decode_kernel.cuh over the plan a DecodeWorkspace uploaded (the workspace
// itself is host code, in cuda_decode_workspace.cc). Instantiates one decode kernel per
// (layout, dtype, head_dim): 2 x 2 x 3. Also sets the kernels' trace target (decode_trace.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "attention/decode_kernel.cuh"
#include "attention/decode_plan.h"
#include "attention/device_utils.cuh"
#include "attention/launch_util.cuh"
#include "kvmem/attention.h"
#include "kvmem/debug/decode_trace.h"
#include "src/core/status_macros.h"

namespace kvmem {
namespace internal {
namespace {

// Calls f(KernelTag<T, head_dim>{}) for the storage type of `dtype`.
template <typename F>
absl::Status DispatchDecode(DType dtype, int head_dim, F&& f) {
  return DispatchKernel("decode", dtype, head_dim, std::forward<F>(f));
}

// Calls f(std::integral_constant<int, S>{}) for S = `stages`, one of the depths built for
// head_dim kDim (DecodeConfig); InvalidArgument for another.
template <int kDim, typename F>
absl::Status DispatchStages(int stages, F&& f) {
  using Cfg = DecodeConfig<kDim>;
  if (stages == Cfg::kStages) return f(std::integral_constant<int, Cfg::kStages>{});
  if (stages == Cfg::kDeepStages) return f(std::integral_constant<int, Cfg::kDeepStages>{});
  return absl::InvalidArgumentError(
      absl::StrCat("decode at head_dim ", kDim, " runs ", Cfg::kStages,
                   Cfg::kDeepStages != Cfg::kStages ? absl::StrCat(" or ", Cfg::kDeepStages) : "",
                   " pipeline stages (0: the device's choice), not ", stages));
}

// Whether the current device takes the deeper pipeline (DecodeConfig::kDeepStages): its
// peak memory bandwidth per SM exceeds kDeepStagesGbpsPerSm (the H200, not the H100). A
// driver that reports no memory clock gets the shallow one.
absl::StatusOr<bool> DeviceTakesDeepPipeline() {
  KVMEM_ASSIGN_OR_RETURN(const int sms, CurrentDeviceAttribute(cudaDevAttrMultiProcessorCount));
  KVMEM_ASSIGN_OR_RETURN(const int clock_khz, CurrentDeviceAttribute(cudaDevAttrMemoryClockRate));
  KVMEM_ASSIGN_OR_RETURN(const int bus_bits,
                         CurrentDeviceAttribute(cudaDevAttrGlobalMemoryBusWidth));
  // Double data rate: two transfers of bus_bits per memory clock.
  const double gbps_per_sm = 2.0 * clock_khz * 1e3 * (bus_bits / 8.0) / 1e9 / std::max(1, sms);
  return gbps_per_sm > kDeepStagesGbpsPerSm;
}

}  // namespace

absl::StatusOr<DecodeKernelInfo> PrepareDecodeKernel(Layout layout, DType dtype, int head_dim,
                                                     int stages) {
  DecodeKernelInfo info;
  bool deep = false;
  if (stages == 0) {
    KVMEM_ASSIGN_OR_RETURN(deep, DeviceTakesDeepPipeline());
  }
  auto prepare = [&](auto tag) -> absl::Status {
    using T = typename decltype(tag)::Type;
    constexpr int kDim = decltype(tag)::kDim;
    using Cfg = DecodeConfig<kDim>;
    if (stages == 0) stages = deep ? Cfg::kDeepStages : Cfg::kStages;
    return DispatchStages<kDim>(stages, [&](auto depth) -> absl::Status {
      constexpr int kStages = decltype(depth)::value;
      using Smem = DecodeSmem<T, kDim, kStages>;
      auto prepare_kernel = [&](auto kernel) -> absl::Status {
        // Shared memory above 48 KiB must be opted into, per kernel, before occupancy
        // queries and launches.
        KVMEM_RETURN_IF_ERROR(CudaStatus(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kBytes),
            "cudaFuncSetAttribute"));
        // The plan counts on ctas_per_sm CTAs per SM from the start of every launch: ask for
        // the whole carveout as shared memory, not whatever the driver last configured.
        KVMEM_RETURN_IF_ERROR(
            CudaStatus(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                            cudaSharedmemCarveoutMaxShared),
                       "cudaFuncSetAttribute"));
        KVMEM_RETURN_IF_ERROR(CudaStatus(
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                &info.ctas_per_sm, kernel, DecodeConfig<kDim>::kWarps * 32, Smem::kBytes),
            "cudaOccupancyMaxActiveBlocksPerMultiprocessor"));
        info.tile_tokens = Smem::kTile;
        info.stages = kStages;
        return absl::OkStatus();
      };
      if (layout == Layout::kPaged) return prepare_kernel(&DecodeKernel<PagedKv, T, kDim, kStages>);
      return prepare_kernel(&DecodeKernel<VirtualKv, T, kDim, kStages>);
    });
  };
  KVMEM_RETURN_IF_ERROR(DispatchDecode(dtype, head_dim, prepare));
  return info;
}

}  // namespace internal

absl::Status SetDecodeTrace(DecodeTraceRecord* device_buffer, int capacity) {
  if (device_buffer != nullptr && capacity <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("decode trace capacity ", capacity, " must be positive"));
  }
#if KVMEM_DECODE_TRACE
  const internal::DecodeTraceTarget target{device_buffer, device_buffer == nullptr ? 0 : capacity};
  return internal::CudaStatus(cudaMemcpyToSymbol(internal::g_decode_trace, &target, sizeof(target)),
                              "cudaMemcpyToSymbol(g_decode_trace)");
#else
  if (device_buffer == nullptr) return absl::OkStatus();  // off, as asked
  return absl::FailedPreconditionError(
      "the decode trace is not built in: configure kvmem with -DKVMEM_DECODE_TRACE=ON");
#endif
}

namespace {

// Checks that `kv` matches the workspace and that every 16-byte load is aligned.
absl::Status ValidateView(const DecodeWorkspace::Impl& w, const PagedKv& kv) {
  return internal::ValidatePagedView(w, kv);
}

absl::Status ValidateView(const DecodeWorkspace::Impl& w, const VirtualKv& kv) {
  KVMEM_RETURN_IF_ERROR(internal::ValidateVirtualBinding(w, kv));
  return internal::ValidateVirtualStrides(kv, int64_t{w.num_kv_heads} * w.head_dim);
}

}  // namespace

template <typename Kv>
absl::Status DecodeAttention(const DecodeWorkspace& ws, const Kv& kv, const void* q, void* out,
                             CudaStream stream) {
  const DecodeWorkspace::Impl& w = ws.impl();
  KVMEM_RETURN_IF_ERROR(ValidateView(w, kv));
  KVMEM_RETURN_IF_ERROR(internal::ValidateLaunchPointers(kv, q, out));
  const bool fixed = w.options.fixed_grid;
  if (!fixed && w.batch == 0) return absl::OkStatus();
  const int work_items = fixed ? w.max_work : w.num_work;

  internal::DecodeParams<Kv> params;
  params.kv = kv;
  params.q = q;
  params.out = out;
  params.partial_o = w.partial_o;
  params.partial_lse = w.partial_lse;
  params.work = w.work();
  params.work_begin = w.work_begin();
  params.header = w.header();
  params.counters = w.counters;
  params.num_kv_heads = w.num_kv_heads;
  params.group = w.group;
  params.scale_log2 = w.scale_log2;

  auto launch = [&](auto tag) -> absl::Status {
    using T = typename decltype(tag)::Type;
    constexpr int kDim = decltype(tag)::kDim;
    return internal::DispatchStages<kDim>(w.stages, [&](auto depth) -> absl::Status {
      constexpr int kStages = decltype(depth)::value;
      using Smem = internal::DecodeSmem<T, kDim, kStages>;
      const dim3 grid(static_cast<unsigned>(work_items * w.num_kv_heads));
      internal::DecodeKernel<Kv, T, kDim, kStages>
          <<<grid, internal::DecodeConfig<kDim>::kWarps * 32, Smem::kBytes, stream>>>(params);
      return internal::CudaStatus(cudaGetLastError(), "DecodeKernel launch");
    });
  };
  return internal::DispatchDecode(w.options.shape.kv_dtype, w.head_dim, launch);
}

template absl::Status DecodeAttention<PagedKv>(const DecodeWorkspace&, const PagedKv&, const void*,
                                               void*, CudaStream);
template absl::Status DecodeAttention<VirtualKv>(const DecodeWorkspace&, const VirtualKv&,
                                                 const void*, void*, CudaStream);

}  // namespace kvmem
