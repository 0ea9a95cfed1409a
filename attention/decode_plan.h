// Internal to the decode kernels: the plan records uploaded to the device (shared by the
// host planner in cuda_decode_workspace.cc and the kernels in decode_kernel.cuh), the
// workspace's private state, and the per-kernel set-up that only the .cu can do.
// Plain C++ (no CUDA headers), so the planner compiles with the host compiler.
#ifndef KVMEM_ATTENTION_DECODE_PLAN_H_
#define KVMEM_ATTENTION_DECODE_PLAN_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kvmem/attention.h"

struct CUevent_st;

namespace kvmem {
namespace internal {

// Tokens [start, end) of request b, one of the `chunks` work items of b (32 bytes: two
// vector loads in one round trip in the kernel). meta packs chunks (low 16 bits) and this
// item's index among them (high 16 bits): a split request's partial results live in slots
// work_begin[b] + index, whatever the order the items are dispatched in.
struct alignas(16) DecodeWork {
  int32_t b;
  int32_t start;
  int32_t end;
  int32_t meta;
  // The virtual layout's row id of request b, so that a CTA's first copies wait on one
  // load (this item) instead of two (the item, then the row id); 0 for the paged layout.
  int32_t index;
  int32_t pad[3];
};

// Most work items one request is cut into (the width of DecodeWork's fields).
inline constexpr int kMaxDecodePieces = 1 << 15;

constexpr int32_t PackDecodeMeta(int32_t chunks, int32_t index) { return chunks | (index << 16); }
constexpr int32_t DecodeChunks(int32_t meta) { return meta & 0xffff; }
constexpr int32_t DecodeIndex(int32_t meta) { return meta >> 16; }

struct alignas(16) DecodePlanHeader {
  int32_t batch;
  int32_t num_work;
  int32_t pad[2];
};

// Query heads per KV head a CTA takes: the 16 rows of one m16n8k16 MMA.
inline constexpr int kMaxDecodeGroup = 16;
// Smallest chunk a request is split into, in tiles: shorter chunks cost more in
// pipeline fill and merge traffic than they gain in parallelism.
inline constexpr int kMinChunkTiles = 2;

// Sets the decode kernel of (layout, dtype, head_dim) with `stages` pipeline stages up for
// launch (dynamic shared memory limit) and reports its tile (tokens), its stages (the
// device's choice when `stages` is 0, DecodeOptions::pipeline_stages) and how many of its
// CTAs one SM holds. InvalidArgument for an unsupported dtype, head_dim or stage count.
// Defined in decode_attention.cu.
struct DecodeKernelInfo {
  int tile_tokens = 0;
  int stages = 0;
  int ctas_per_sm = 0;
};
absl::StatusOr<DecodeKernelInfo> PrepareDecodeKernel(Layout layout, DType dtype, int head_dim,
                                                     int stages);

// How BuildDecodePlan cuts the requests of a batch that fills the device (see there).
// The default is the measured one (docs/kernels.md); the field exists for tests and
// comparisons.
struct DecodeSplitPolicy {
  // No piece longer than this share of a resident slot's average load (0: no cap; at
  // least kMinPieceLoad otherwise).
  double piece_load = 0.5;
};
// The smallest piece_load honoured. It bounds the pieces the cap adds to 1 / kMinPieceLoad
// waves (MaxDecodeWork), and so the capacity grid of a fixed_grid launch, whose CTAs
// beyond the plan start, read the plan header and exit.
inline constexpr double kMinPieceLoad = 0.5;

// Splits `lens` into work items (see DecodeWorkspace) and writes them in dispatch order.
// When batch * kv_heads fills the resident CTA slots, one per request but for requests
// longer than policy.piece_load of a slot's average load, which are cut to it (no
// straggler); otherwise each request is cut into equal pieces of whole tiles, with the
// smallest chunk for which all pieces x kv_heads fit in one wave of resident_ctas.
// Longest pieces first. Writes work_begin[batch + 1] (the first partial slot of each
// request; slots are per request, in request order) and work[]; returns the number of
// work items, or Internal if more than max_work would be needed.
absl::StatusOr<int> BuildDecodePlan(absl::Span<const int32_t> lens, int window_left,
                                    int num_kv_heads, int tile_tokens, int resident_ctas,
                                    int max_work, const DecodeSplitPolicy& policy,
                                    int32_t* work_begin, DecodeWork* work);

// Copies each work item's row id (row_ids[item.b], the virtual layout) into item.index.
void SetDecodeRowIds(absl::Span<const int32_t> row_ids, absl::Span<DecodeWork> work);

// Capacity of the work list that BuildDecodePlan never exceeds for max_batch requests.
int MaxDecodeWork(int max_batch, int num_kv_heads, int resident_ctas);

}  // namespace internal

struct DecodeWorkspace::Impl {
  DecodeOptions options;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int group = 0;
  int head_dim = 0;
  float scale_log2 = 0.f;  // softmax scale * log2(e)
  int tile_tokens = 0;
  int stages = 0;            // the kernel's pipeline stages (DecodeKernelInfo)
  int resident_ctas = 0;     // decode CTAs the device runs at once (occupancy x SMs)
  int max_work = 0;          // capacity of the work list
  int64_t index_stride = 0;  // device index entries per request: pages (paged) or 1

  // One device block, uploaded by one copy per Plan():
  //   header | work_begin[max_batch + 1] | work[max_work] | index[max_batch][index_stride]
  size_t off_work_begin = 0;
  size_t off_work = 0;
  size_t off_index = 0;
  size_t block_bytes = 0;
  void* block = nullptr;
  float* partial_o = nullptr;    // [max_work][num_q_heads][head_dim]
  float* partial_lse = nullptr;  // [max_work][num_q_heads]
  // Per (request, KV head): finished pieces of a split request; the CTA that finishes
  // last merges and resets it to 0 (so a replayed graph finds zeros).
  int32_t* counters = nullptr;  // [max_batch][num_kv_heads]

  // Pinned staging ring: a buffer is refilled only after its last upload completed.
  void* stage[2] = {nullptr, nullptr};
  CUevent_st* stage_done[2] = {nullptr, nullptr};
  int next_stage = 0;

  // Of the last Plan().
  int batch = 0;
  int num_work = 0;

  ~Impl();

  template <typename P>
  static P* At(void* base, size_t off) {
    return reinterpret_cast<P*>(static_cast<char*>(base) + off);
  }
  const internal::DecodePlanHeader* header() const {
    return At<const internal::DecodePlanHeader>(block, 0);
  }
  const int32_t* work_begin() const { return At<const int32_t>(block, off_work_begin); }
  const internal::DecodeWork* work() const {
    return At<const internal::DecodeWork>(block, off_work);
  }
  int32_t* index() const { return At<int32_t>(block, off_index); }
};

}  // namespace kvmem

#endif  // KVMEM_ATTENTION_DECODE_PLAN_H_
