// DeviceRunningBatch: pinned staging (a ring of two, as DecodeWorkspace's) -> one
// cudaMemcpyAsync into a device staging block -> one kernel that applies it
// (running_batch_apply.cu). Host code; built only with CUDA (cuda_*.cc).
#include "kvmem/device_running_batch.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "attention/cuda_status.h"
#include "attention/running_batch_apply.h"
#include "src/core/int_math.h"
#include "src/core/logging.h"
#include "src/core/status_macros.h"

namespace kvmem {

struct DeviceRunningBatch::Impl {
  int32_t max_batch = 0;
  int64_t stride = 0;
  // Changes one staged upload holds; more go as a whole-table copy.
  int64_t max_changes = 0;
  // Staging block of an upload of `size` entries: seq_lens | row_ids | last_page_len
  // ([size] each, packed) | the changes (16-byte aligned), so that the one copy is the
  // used prefix.
  size_t stage_bytes = 0;
  void* stage[2] = {nullptr, nullptr};
  cudaEvent_t stage_done[2] = {nullptr, nullptr};
  int next_stage = 0;
  void* device_stage = nullptr;
  internal::RunningBatchArrays arrays;
  int32_t size = 0;
  int32_t max_seq_len = 0;

  ~Impl() {
    auto check = [](cudaError_t err, const char* what) {
      if (err != cudaSuccess) {
        internal::Logger()->error("DeviceRunningBatch: {} failed: {}", what,
                                  cudaGetErrorString(err));
      }
    };
    for (int i = 0; i < 2; ++i) {
      if (stage_done[i] != nullptr) {
        check(cudaEventSynchronize(stage_done[i]), "cudaEventSynchronize");
        check(cudaEventDestroy(stage_done[i]), "cudaEventDestroy");
      }
      if (stage[i] != nullptr) check(cudaFreeHost(stage[i]), "cudaFreeHost");
    }
    for (void* p : {device_stage, static_cast<void*>(arrays.seq_lens),
                    static_cast<void*>(arrays.page_table)}) {
      if (p != nullptr) check(cudaFree(p), "cudaFree");
    }
  }
  template <typename T>
  T* At(void* base, size_t off) const {
    return reinterpret_cast<T*>(static_cast<char*>(base) + off);
  }
};

absl::StatusOr<std::unique_ptr<DeviceRunningBatch>> DeviceRunningBatch::Create(
    int32_t max_batch, int64_t page_table_stride) {
  if (max_batch < 1 || page_table_stride < 0 ||
      page_table_stride > std::numeric_limits<int64_t>::max() / 4 / max_batch) {
    return absl::InvalidArgumentError(absl::StrCat("DeviceRunningBatch of ", max_batch,
                                                   " entries x ", page_table_stride, " pages"));
  }
  auto impl = std::make_unique<Impl>();
  impl->max_batch = max_batch;
  impl->stride = page_table_stride;
  // As KvCache's change log: beyond 4 an entry, a whole copy is cheaper.
  impl->max_changes = page_table_stride > 0 ? 4 * int64_t{max_batch} : 0;
  const size_t small = internal::Align16(3 * size_t(max_batch) * sizeof(int32_t));
  impl->stage_bytes = small + impl->max_changes * sizeof(internal::RunningBatchChange);
  for (int i = 0; i < 2; ++i) {
    KVMEM_RETURN_IF_ERROR(internal::CudaStatus(cudaMallocHost(&impl->stage[i], impl->stage_bytes),
                                               "cudaMallocHost"));
    KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
        cudaEventCreateWithFlags(&impl->stage_done[i], cudaEventDisableTiming),
        "cudaEventCreateWithFlags"));
  }
  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaMalloc(&impl->device_stage, impl->stage_bytes), "cudaMalloc"));
  // The three small arrays in one allocation (freed through seq_lens).
  void* small_arrays = nullptr;
  KVMEM_RETURN_IF_ERROR(internal::CudaStatus(cudaMalloc(&small_arrays, small), "cudaMalloc"));
  impl->arrays.seq_lens = static_cast<int32_t*>(small_arrays);
  impl->arrays.row_ids = impl->arrays.seq_lens + max_batch;
  impl->arrays.last_page_len = impl->arrays.row_ids + max_batch;
  // An empty batch until the first upload: lengths 0, rows -1.
  KVMEM_RETURN_IF_ERROR(internal::CudaStatus(cudaMemset(small_arrays, 0, small), "cudaMemset"));
  KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
      cudaMemset(impl->arrays.row_ids, 0xff, size_t(max_batch) * sizeof(int32_t)), "cudaMemset"));
  if (page_table_stride > 0) {
    const size_t table = size_t(max_batch) * page_table_stride * sizeof(int32_t);
    KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
        cudaMalloc(reinterpret_cast<void**>(&impl->arrays.page_table), table), "cudaMalloc"));
    KVMEM_RETURN_IF_ERROR(
        internal::CudaStatus(cudaMemset(impl->arrays.page_table, 0, table), "cudaMemset"));
  }
  return std::unique_ptr<DeviceRunningBatch>(new DeviceRunningBatch(std::move(impl)));
}

DeviceRunningBatch::DeviceRunningBatch(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
DeviceRunningBatch::~DeviceRunningBatch() = default;

absl::Status DeviceRunningBatch::Upload(const RunningBatchView& host,
                                        const RunningBatchChanges& changes, CudaStream stream) {
  Impl& m = *impl_;
  if (host.max_batch != m.max_batch || host.page_table_stride != m.stride ||
      host.size < 0 || host.size > m.max_batch || (m.stride > 0) != (host.page_table != nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DeviceRunningBatch::Upload: a running batch of ", host.max_batch, " entries x ",
        host.page_table_stride, " pages (size ", host.size, ") into a mirror of ", m.max_batch,
        " x ", m.stride));
  }
  const int64_t listed = static_cast<int64_t>(changes.page_table_entries.size());
  const bool whole = m.stride > 0 && (changes.all || listed > m.max_changes);
  const int64_t table_entries = int64_t{m.max_batch} * m.stride;
  if (!whole) {
    for (int64_t i : changes.page_table_entries) {
      if (i < 0 || i >= table_entries) {
        return absl::InvalidArgumentError(
            absl::StrCat("DeviceRunningBatch::Upload: page-table entry ", i, " outside [0, ",
                         table_entries, ")"));
      }
    }
  }
  const int slot = m.next_stage;
  // The buffer's previous copy (two uploads ago) must be done before it is rewritten.
  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaEventSynchronize(m.stage_done[slot]), "cudaEventSynchronize"));
  void* buf = m.stage[slot];
  const size_t n = static_cast<size_t>(host.size);
  auto* small = static_cast<int32_t*>(buf);
  std::memcpy(small, host.seq_lens, n * sizeof(int32_t));
  std::memcpy(small + n, host.row_ids, n * sizeof(int32_t));
  if (host.last_page_len != nullptr) {
    std::memcpy(small + 2 * n, host.last_page_len, n * sizeof(int32_t));
  } else {
    std::memset(small + 2 * n, 0, n * sizeof(int32_t));
  }
  const size_t off_changes = internal::Align16(3 * n * sizeof(int32_t));
  const int64_t count = whole || m.stride == 0 ? 0 : listed;
  auto* list = m.At<internal::RunningBatchChange>(buf, off_changes);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t at = changes.page_table_entries[i];
    list[i] = {at, host.page_table[at], 0};
  }
  // One copy of the used prefix.
  const size_t bytes = off_changes + count * sizeof(internal::RunningBatchChange);
  KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
      cudaMemcpyAsync(m.device_stage, buf, bytes, cudaMemcpyHostToDevice, stream),
      "cudaMemcpyAsync"));
  KVMEM_RETURN_IF_ERROR(
      internal::CudaStatus(cudaEventRecord(m.stage_done[slot], stream), "cudaEventRecord"));
  m.next_stage ^= 1;
  if (whole && n > 0) {
    KVMEM_RETURN_IF_ERROR(internal::CudaStatus(
        cudaMemcpyAsync(m.arrays.page_table, host.page_table, n * m.stride * sizeof(int32_t),
                        cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync (whole page table)"));
  }
  internal::RunningBatchUpdate u;
  u.max_batch = m.max_batch;
  u.size = host.size;
  u.changes = count;
  u.seq_lens = static_cast<const int32_t*>(m.device_stage);
  u.row_ids = u.seq_lens + n;
  u.last_page_len = u.row_ids + n;
  u.changes_list = m.At<internal::RunningBatchChange>(m.device_stage, off_changes);
  KVMEM_RETURN_IF_ERROR(internal::LaunchRunningBatchApply(u, m.arrays, stream));
  m.size = host.size;
  m.max_seq_len = host.max_seq_len;
  return absl::OkStatus();
}

RunningBatchView DeviceRunningBatch::view() const {
  RunningBatchView v;
  v.size = impl_->size;
  v.max_batch = impl_->max_batch;
  v.max_seq_len = impl_->max_seq_len;
  v.seq_lens = impl_->arrays.seq_lens;
  v.row_ids = impl_->arrays.row_ids;
  if (impl_->stride > 0) {
    v.page_table = impl_->arrays.page_table;
    v.page_table_stride = impl_->stride;
    v.last_page_len = impl_->arrays.last_page_len;
  }
  return v;
}

PagedKv DeviceRunningBatch::Bind(PagedKv view) const {
  view.page_table = impl_->arrays.page_table;
  view.page_table_stride = impl_->stride;
  return view;
}

VirtualKv DeviceRunningBatch::Bind(VirtualKv view) const {
  view.row_ids = impl_->arrays.row_ids;
  return view;
}

}  // namespace kvmem
