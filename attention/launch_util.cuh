// Host-side launch helpers shared by the attention launchers (decode_attention.cu,
// extend_attention.cu): the (dtype, head_dim) dispatch onto kernel instantiations, and
// the checks of a K/V view and the launch pointers against a workspace. Internal.
#ifndef KVMEM_ATTENTION_LAUNCH_UTIL_CUH_
#define KVMEM_ATTENTION_LAUNCH_UTIL_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvmem/config.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_accessor.h"

namespace kvmem::internal {

template <typename T, int kHeadDim>
struct KernelTag {
  using Type = T;
  static constexpr int kDim = kHeadDim;
};

// Calls f(KernelTag<T, head_dim>{}) for head_dim 64, 128 or 256; `what` names the
// kernel in the error.
template <typename T, typename F>
absl::Status DispatchHeadDim(const char* what, int head_dim, F& f) {
  switch (head_dim) {
    case 64:
      return f(KernelTag<T, 64>{});
    case 128:
      return f(KernelTag<T, 128>{});
    case 256:
      return f(KernelTag<T, 256>{});
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(what, " supports head_dim 64, 128 and 256, not ", head_dim));
  }
}

// Calls f(KernelTag<T, head_dim>{}) for the storage type of `dtype` (bf16 or fp16).
template <typename F>
absl::Status DispatchKernel(const char* what, DType dtype, int head_dim, F&& f) {
  switch (dtype) {
    case DType::kBFloat16:
      return DispatchHeadDim<__nv_bfloat16>(what, head_dim, f);
    case DType::kFloat16:
      return DispatchHeadDim<__half>(what, head_dim, f);
    default:
      return absl::InvalidArgumentError(absl::StrCat(what, " supports bf16 and fp16 storage, not ",
                                                     std::string(DTypeName(dtype))));
  }
}

inline bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Checks that a paged view matches the workspace `w` (its options' layout and
// page_tokens, its index_stride, num_kv_heads and head_dim) and that every 16-byte
// access is aligned.
template <typename Impl>
absl::Status ValidatePagedView(const Impl& w, const PagedKv& kv) {
  const auto& o = w.options;
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

// Checks the layout, row ids and max_context of a virtual view against the workspace
// `w`; its strides are checked by each launcher.
template <typename Impl>
absl::Status ValidateVirtualBinding(const Impl& w, const VirtualKv& kv) {
  const auto& o = w.options;
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
  return absl::OkStatus();
}

// Checks the strides of a virtual view (elements) for the kernels' 16-byte copies: a
// token holds `row` elements, token, row and chunk steps are multiples of 8, and a row
// holds max_context tokens.
inline absl::Status ValidateVirtualStrides(const VirtualKv& kv, int64_t row) {
  if (kv.token_stride < row || kv.token_stride % 8 != 0 || kv.row_stride % 8 != 0 ||
      kv.chunk_gap < 0 || kv.chunk_gap % 8 != 0 || kv.chunk_shift < 0 || kv.chunk_shift > 30) {
    return absl::InvalidArgumentError(absl::StrCat(
        "virtual strides (token ", kv.token_stride, ", row ", kv.row_stride, ", chunk gap ",
        kv.chunk_gap, ", chunk shift ", kv.chunk_shift,
        ") must cover kv_heads * head_dim per token and be multiples of 8 elements (shift "
        "0..30)"));
  }
  if (kv.row_stride < kv.InRow(kv.max_context)) {
    return absl::InvalidArgumentError(absl::StrCat("virtual row stride ", kv.row_stride, " < the ",
                                                   kv.InRow(kv.max_context),
                                                   " elements of max_context tokens"));
  }
  return absl::OkStatus();
}

// Checks that k, v, q and out are set and 16-byte aligned.
template <typename Kv>
absl::Status ValidateLaunchPointers(const Kv& kv, const void* q, const void* out) {
  if (kv.k == nullptr || kv.v == nullptr || q == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("null k, v, q or out");
  }
  if (!Aligned16(kv.k) || !Aligned16(kv.v) || !Aligned16(q) || !Aligned16(out)) {
    return absl::InvalidArgumentError("k, v, q and out must be 16-byte aligned");
  }
  return absl::OkStatus();
}

}  // namespace kvmem::internal

#endif  // KVMEM_ATTENTION_LAUNCH_UTIL_CUH_
