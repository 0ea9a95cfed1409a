// RunningBatch: the kernel metadata of the requests an engine runs step after step,
// kept by the KvCache and updated as they grow, shrink and end, so that a step costs
// the pages it changes, not the batch times its longest request (which rebuilding a
// BatchMetadata costs).
//
//   cache->SetRunningBatch(ids);                 // when the batch's membership changes
//   cache->ExtendBatch(ids, counts, out_loc);     // every step: updates the entries
//   RunningBatchView v = cache->RunningBatch();   // the same addresses on every call
//
// The arrays have fixed capacity (KvCacheConfig::max_batch entries) and keep their
// addresses for the cache's lifetime, so a CUDA graph captured over them (or over a
// device mirror of them, attention.h's DeviceBatch) replays with the current values.
#ifndef KVMEM_RUNNING_BATCH_H_
#define KVMEM_RUNNING_BATCH_H_

#include <cstdint>
#include <vector>

namespace kvmem {

// Host arrays of the running batch. Entry b describes the request at position b of the
// last SetRunningBatch; entries at or past `size` (and entries of requests freed since)
// have seq_len 0. Valid until the cache is destroyed; the contents change with every
// call that changes a member, so read them between calls, not during one.
struct RunningBatchView {
  int32_t size = 0;        // requests in the batch
  int32_t max_batch = 0;   // capacity of every array
  int32_t max_seq_len = 0; // longest member
  const int32_t* seq_lens = nullptr;  // [max_batch] tokens of each entry (cache_seqlens)
  const int32_t* row_ids = nullptr;   // [max_batch] index row of each entry (-1: none)
  // Paged: [max_batch][page_table_stride] page ids (vLLM / FlashAttention block table);
  // entries past a request's ceil(len / page_tokens) pages are unspecified (kernels stop
  // at seq_len). Null for the virtual layout.
  const int32_t* page_table = nullptr;
  int64_t page_table_stride = 0;
  // Paged: [max_batch] tokens in each entry's last page (FlashInfer's last_page_len: 1
  // to page_tokens, 0 for an empty entry). Null for the virtual layout.
  const int32_t* last_page_len = nullptr;
};

// FlashInfer's CSR form of the running batch's pages: entry b's pages are
// indices[indptr[b], indptr[b + 1]). The pages are packed, so one entry that gains a
// page moves every later entry's: materialising it costs the pages from the first
// entry that changed to the end (KvCache::PackRunningBatch), unlike the padded table.
struct RunningBatchCsr {
  int32_t size = 0;
  const int32_t* indptr = nullptr;   // [max_batch + 1]
  const int32_t* indices = nullptr;  // [max_batch * page_table_stride]
  const int32_t* last_page_len = nullptr;
};

// What changed in the running batch since the last KvCache::TakeRunningBatchChanges, for
// a copy of it elsewhere (a device mirror: DeviceRunningBatch in device_running_batch.h).
// seq_lens, row_ids and last_page_len are small (12 bytes an entry): a mirror copies
// their first `size` entries every time. The padded page table is large: only the
// entries listed changed, unless `all`.
struct RunningBatchChanges {
  // Every entry of the page table may have changed (the first call, or more changes
  // than a list is worth): copy rows [0, size) whole.
  bool all = false;
  // Indices into page_table (b * page_table_stride + k) written since (an index may
  // repeat); the values are the host table's current ones.
  std::vector<int64_t> page_table_entries;
};

}  // namespace kvmem

#endif  // KVMEM_RUNNING_BATCH_H_
