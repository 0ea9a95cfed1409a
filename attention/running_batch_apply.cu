#include <cuda_runtime.h>

#include "attention/cuda_status.h"
#include "attention/running_batch_apply.h"

namespace kvmem::internal {
namespace {

__global__ void RunningBatchApplyKernel(RunningBatchUpdate u, RunningBatchArrays a) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (int64_t b = first; b < u.max_batch; b += stride) {
    const bool in = b < u.size;
    a.seq_lens[b] = in ? u.seq_lens[b] : 0;
    a.row_ids[b] = in ? u.row_ids[b] : -1;
    a.last_page_len[b] = in ? u.last_page_len[b] : 0;
  }
  if (a.page_table == nullptr) return;
  for (int64_t i = first; i < u.changes; i += stride) {
    const RunningBatchChange c = u.changes_list[i];
    a.page_table[c.index] = c.value;
  }
}

}  // namespace

absl::Status LaunchRunningBatchApply(const RunningBatchUpdate& update,
                                     const RunningBatchArrays& arrays, CudaStream stream) {
  constexpr int kThreads = 256;
  const int64_t work = update.max_batch > update.changes ? update.max_batch : update.changes;
  // A few blocks cover a step's changes; the grid-stride loop takes any more.
  const int blocks = static_cast<int>((work + kThreads - 1) / kThreads < 64
                                          ? (work + kThreads - 1) / kThreads
                                          : 64);
  RunningBatchApplyKernel<<<blocks < 1 ? 1 : blocks, kThreads, 0, stream>>>(update, arrays);
  return CudaStatus(cudaGetLastError(), "RunningBatchApplyKernel launch");
}

}  // namespace kvmem::internal
