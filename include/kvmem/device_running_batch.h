// DeviceRunningBatch: a device copy of a KvCache's running batch (running_batch.h) at
// fixed device addresses, brought up to date each step by one asynchronous copy of what
// changed and one small kernel, ordered on the caller's stream with no host wait, so a
// CUDA graph captured over its arrays replays with the current step's values. Built
// only with CUDA (KVMEM_WITH_CUDA).
//
//   auto mirror = DeviceRunningBatch::Create(view.max_batch, view.page_table_stride);
//   per step:
//     cache->ExtendBatch(ids, counts, out_loc);
//     cache->TakeRunningBatchChanges(&changes);
//     mirror->Upload(cache->RunningBatch(), changes, stream);
//     ws->Plan(cache->RunningBatch(), stream);           // lengths only (attention.h)
//     DecodeAttention(*ws, mirror->Bind(layer_view), q, out, stream);
//
// Thread safety: none; use it from one thread, with one stream (or order the streams).
#ifndef KVMEM_DEVICE_RUNNING_BATCH_H_
#define KVMEM_DEVICE_RUNNING_BATCH_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvmem/attention.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/platform.h"
#include "kvmem/running_batch.h"

namespace kvmem {

class KVMEM_EXPORT DeviceRunningBatch {
 public:
  // For a running batch of `max_batch` entries and `page_table_stride` pages each (the
  // RunningBatchView's; stride 0 for the virtual layout). Device memory: max_batch x
  // (stride + 3) int32. InvalidArgument for max_batch < 1 or stride < 0; CUDA errors as
  // Internal. Uses the current device.
  static absl::StatusOr<std::unique_ptr<DeviceRunningBatch>> Create(int32_t max_batch,
                                                                    int64_t page_table_stride);
  ~DeviceRunningBatch();
  DeviceRunningBatch(const DeviceRunningBatch&) = delete;
  DeviceRunningBatch& operator=(const DeviceRunningBatch&) = delete;

  // Enqueues on `stream` the update to `host` (the cache's RunningBatch()), given what
  // changed since the last upload (KvCache::TakeRunningBatchChanges): the first
  // host.size entries of seq_lens, row_ids and last_page_len (later ones become 0 / -1)
  // and the listed page-table entries, staged in pinned memory and copied at once;
  // with changes.all, the page table's rows [0, host.size) whole (a second copy, from
  // pageable memory). The host data are read before it returns. It waits on the host
  // only for the copy of two uploads before, which reuses the same staging buffer.
  // InvalidArgument when `host` does not match the capacity given to Create.
  absl::Status Upload(const RunningBatchView& host, const RunningBatchChanges& changes,
                      CudaStream stream);

  // Device pointers (fixed for the object's lifetime); size and max_seq_len are the last
  // upload's.
  RunningBatchView view() const;
  // `view` reading its batch index from this mirror: the page table (paged) or row ids.
  PagedKv Bind(PagedKv view) const;
  VirtualKv Bind(VirtualKv view) const;

  struct Impl;  // internal

 private:
  explicit DeviceRunningBatch(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvmem

#endif  // KVMEM_DEVICE_RUNNING_BATCH_H_
