// Decode attention launcher: validates a launch on the host and starts the kernels of
// attention/decode_kernel.cuh over the plan a DecodeWorkspace uploaded (the workspace
// itself is host code, in cuda_decode_workspace.cc). Instantiates one decode kernel per
// (layout, dtype, head_dim): 2 x 2 x 3.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "attention/decode_kernel.cuh"
#include "attention/decode_plan.h"
#include "attention/device_utils.cuh"
#include "kvmem/attention.h"
#include "src/status_macros.h"

namespace kvmem {
namespace internal {
namespace {

template <typename T, int kHeadDim>
struct KernelTag {
  using Type = T;
  static constexpr int kDim = kHeadDim;
};

template <typename T, typename F>
absl::Status DispatchHeadDim(int head_dim, F& f) {
  switch (head_dim) {
    case 64:
      return f(KernelTag<T, 64>{});
    case 128:
      return f(KernelTag<T, 128>{});
    case 256:
      return f(KernelTag<T, 256>{});
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("decode supports head_dim 64, 128 and 256, not ", head_dim));
  }
}

// Calls f(KernelTag<T, head_dim>{}) for the storage type of `dtype`.
template <typename F>
absl::Status DispatchDecode(DType dtype, int head_dim, F&& f) {
  switch (dtype) {
    case DType::kBFloat16:
      return DispatchHeadDim<__nv_bfloat16>(head_dim, f);
    case DType::kFloat16:
      return DispatchHeadDim<__half>(head_dim, f);
    default:
      return absl::InvalidArgumentError(absl::StrCat("decode supports bf16 and fp16 storage, not ",
                                                     std::string(DTypeName(dtype))));
  }
}

}  // namespace

absl::StatusOr<DecodeKernelInfo> PrepareDecodeKernel(Layout layout, DType dtype, int head_dim) {
  DecodeKernelInfo info;
  auto prepare = [&](auto tag) -> absl::Status {
    using T = typename decltype(tag)::Type;
    constexpr int kDim = decltype(tag)::kDim;
    using Smem = DecodeSmem<T, kDim>;
    auto prepare_kernel = [&](auto kernel) -> absl::Status {
      // Shared memory above 48 KiB must be opted into, per kernel, before occupancy
      // queries and launches.
      KVMEM_RETURN_IF_ERROR(CudaStatus(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kBytes),
          "cudaFuncSetAttribute"));
      KVMEM_RETURN_IF_ERROR(
          CudaStatus(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                         &info.ctas_per_sm, kernel, DecodeConfig<kDim>::kWarps * 32, Smem::kBytes),
                     "cudaOccupancyMaxActiveBlocksPerMultiprocessor"));
      info.tile_tokens = Smem::kTile;
      return absl::OkStatus();
    };
    if (layout == Layout::kPaged) return prepare_kernel(&DecodeKernel<PagedKv, T, kDim>);
    return prepare_kernel(&DecodeKernel<VirtualKv, T, kDim>);
  };
  KVMEM_RETURN_IF_ERROR(DispatchDecode(dtype, head_dim, prepare));
  return info;
}

}  // namespace internal

namespace {
bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Checks that `kv` matches the workspace and that every 16-byte load is aligned.
absl::Status ValidateView(const DecodeWorkspace::Impl& w, const PagedKv& kv) {
  const DecodeOptions& o = w.options;
  if (o.layout != Layout::kPaged) {
    return absl::InvalidArgumentError("a PagedKv view on a workspace for the virtual layout");
  }
  if (kv.page_tokens != o.page_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("view has page_tokens ", kv.page_tokens, ", the workspace ", o.page_tokens));
  }
  if (kv.page_table == nullptr || kv.page_table_stride < w.index_stride) {
    return absl::InvalidArgumentError(absl::StrCat(
        "view needs a device page table of stride >= ", w.index_stride, " (use Bind)"));
  }
  const int64_t row = int64_t{w.num_kv_heads} * w.head_dim;
  if (kv.token_stride < row || kv.token_stride % 8 != 0 ||
      kv.page_stride < kv.token_stride * kv.page_tokens || kv.page_stride % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("paged strides (token ", kv.token_stride, ", page ", kv.page_stride,
                     ") must cover kv_heads * head_dim per token and be multiples of 8 elements"));
  }
  return absl::OkStatus();
}

absl::Status ValidateView(const DecodeWorkspace::Impl& w, const VirtualKv& kv) {
  const DecodeOptions& o = w.options;
  if (o.layout != Layout::kVirtual) {
    return absl::InvalidArgumentError("a VirtualKv view on a workspace for the paged layout");
  }
  if (kv.row_ids == nullptr) {
    return absl::InvalidArgumentError("view needs device row_ids (use Bind)");
  }
  if (kv.max_context < o.max_context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "view holds ", kv.max_context, " positions per row, the workspace allows ", o.max_context));
  }
  const int64_t row = int64_t{w.num_kv_heads} * w.head_dim;
  if (kv.token_stride < row || kv.token_stride % 8 != 0 || kv.row_stride % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("virtual strides (token ", kv.token_stride, ", row ", kv.row_stride,
                     ") must cover kv_heads * head_dim per token and be multiples of 8 elements"));
  }
  return absl::OkStatus();
}

}  // namespace

template <typename Kv>
absl::Status DecodeAttention(const DecodeWorkspace& ws, const Kv& kv, const void* q, void* out,
                             CudaStream stream) {
  const DecodeWorkspace::Impl& w = ws.impl();
  KVMEM_RETURN_IF_ERROR(ValidateView(w, kv));
  if (kv.k == nullptr || kv.v == nullptr || q == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("null k, v, q or out");
  }
  if (!Aligned16(kv.k) || !Aligned16(kv.v) || !Aligned16(q) || !Aligned16(out)) {
    return absl::InvalidArgumentError("k, v, q and out must be 16-byte aligned");
  }
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
    using Smem = internal::DecodeSmem<T, kDim>;
    const dim3 grid(static_cast<unsigned>(work_items * w.num_kv_heads));
    internal::DecodeKernel<Kv, T, kDim>
        <<<grid, internal::DecodeConfig<kDim>::kWarps * 32, Smem::kBytes, stream>>>(params);
    return internal::CudaStatus(cudaGetLastError(), "DecodeKernel launch");
  };
  return internal::DispatchDecode(w.options.shape.kv_dtype, w.head_dim, launch);
}

template absl::Status DecodeAttention<PagedKv>(const DecodeWorkspace&, const PagedKv&, const void*,
                                               void*, CudaStream);
template absl::Status DecodeAttention<VirtualKv>(const DecodeWorkspace&, const VirtualKv&,
                                                 const void*, void*, CudaStream);

}  // namespace kvmem
