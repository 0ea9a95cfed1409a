// EncodeKvTensorMaps (kv_tensor_map.h): cuTensorMapEncodeTiled, reached through the
// runtime's driver entry-point query, so the library still never links libcuda.
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "attention/kv_tensor_map.h"

namespace kvmem::internal {
namespace {

constexpr int64_t kMaxIndex = std::numeric_limits<int32_t>::max();

using EncodeFn = decltype(&cuTensorMapEncodeTiled);

// The driver's cuTensorMapEncodeTiled (CUDA 12.0 ABI), looked up once.
absl::StatusOr<EncodeFn> Encoder() {
  static const auto* const result = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                             cudaEnableDefault, &found);
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) {
      return new absl::StatusOr<EncodeFn>(absl::InternalError(absl::StrCat(
          "cuTensorMapEncodeTiled not available from the driver: ", cudaGetErrorName(err))));
    }
    return new absl::StatusOr<EncodeFn>(reinterpret_cast<EncodeFn>(fn));
  }();
  return *result;
}

// One map (head_dim, heads, tokens, outer...) over `base`: 4-D with one outer stride, 5-D
// with two (chunks, rows). Strides and extents in elements; the last extent is the
// largest int32 index (kv_tensor_map.h).
absl::StatusOr<CUtensorMap> EncodeOne(const void* base, DType dtype, int head_dim, int heads,
                                      int64_t tokens, int64_t token_stride,
                                      absl::Span<const int64_t> outer_strides,
                                      absl::Span<const int64_t> outer_extents, int box_rows) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) {
    return absl::InvalidArgumentError("tensor maps are built for bf16 and fp16 only");
  }
  auto encode = Encoder();
  if (!encode.ok()) return encode.status();
  constexpr int64_t kElem = 2;
  const int rank = 3 + static_cast<int>(outer_strides.size());
  cuuint64_t dims[5] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(heads),
                        static_cast<cuuint64_t>(tokens)};
  cuuint64_t strides[4] = {static_cast<cuuint64_t>(head_dim * kElem),
                           static_cast<cuuint64_t>(token_stride * kElem)};
  cuuint32_t box[5] = {64, 1, static_cast<cuuint32_t>(box_rows)};
  cuuint32_t element_strides[5] = {1, 1, 1, 1, 1};
  for (size_t i = 0; i < outer_strides.size(); ++i) {
    dims[3 + i] = static_cast<cuuint64_t>(outer_extents[i]);
    strides[2 + i] = static_cast<cuuint64_t>(outer_strides[i] * kElem);
    box[3 + i] = 1;
  }
  CUtensorMap map;
  const CUresult r =
      (*encode)(&map,
                dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                          : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                rank, const_cast<void*>(base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    return absl::InternalError(absl::StrCat(
        "cuTensorMapEncodeTiled failed (CUresult ", static_cast<int>(r), ") for head_dim ",
        head_dim, ", ", heads, " heads, ", tokens, " tokens, strides ", token_stride, " / ",
        absl::StrJoin(outer_strides, " / "), " elements, box rows ", box_rows));
  }
  return map;
}

absl::StatusOr<KvTensorMaps> EncodePair(const void* k, const void* v, DType dtype, int head_dim,
                                        int heads, int64_t tokens, int64_t token_stride,
                                        absl::Span<const int64_t> outer_strides,
                                        absl::Span<const int64_t> outer_extents, int box_rows) {
  KvTensorMaps maps;
  auto km = EncodeOne(k, dtype, head_dim, heads, tokens, token_stride, outer_strides, outer_extents,
                      box_rows);
  if (!km.ok()) return km.status();
  auto vm = EncodeOne(v, dtype, head_dim, heads, tokens, token_stride, outer_strides, outer_extents,
                      box_rows);
  if (!vm.ok()) return vm.status();
  maps.k = *km;
  maps.v = *vm;
  return maps;
}

}  // namespace

absl::StatusOr<KvTensorMaps> EncodeKvTensorMaps(const PagedKv& kv, DType dtype, int head_dim,
                                                int num_kv_heads, int box_rows) {
  const int64_t strides[] = {kv.page_stride};
  const int64_t extents[] = {kMaxIndex};
  return EncodePair(kv.k, kv.v, dtype, head_dim, num_kv_heads, kv.page_tokens, kv.token_stride,
                    strides, extents, box_rows);
}

absl::StatusOr<KvTensorMaps> EncodeKvTensorMaps(const VirtualKv& kv, DType dtype, int head_dim,
                                                int num_kv_heads, int box_rows) {
  // Chunks of 2^chunk_shift tokens, each chunk_gap elements past the previous one's last
  // token. With shift 0 every token is a chunk (token_stride + chunk_gap apart), and the
  // row is described as one chunk of max_context tokens at that stride.
  const bool chunked = kv.chunk_shift > 0;
  const int64_t chunk = chunked ? int64_t{1} << kv.chunk_shift : kv.max_context;
  const int64_t token_stride = chunked ? kv.token_stride : kv.token_stride + kv.chunk_gap;
  const int64_t strides[] = {chunked ? chunk * kv.token_stride + kv.chunk_gap : kv.row_stride,
                             kv.row_stride};
  const int64_t extents[] = {chunked ? (kv.max_context + chunk - 1) / chunk : 1, kMaxIndex};
  return EncodePair(kv.k, kv.v, dtype, head_dim, num_kv_heads, chunk, token_stride, strides,
                    extents, box_rows);
}

}  // namespace kvmem::internal
