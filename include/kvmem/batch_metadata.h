// BatchMetadata: what the kernels of one step need to know about the requests in the
// batch, filled by KvCache::BuildBatchMetadata and read by the attention entry points.
// Its own header so that the kernels' API does not depend on the cache facade.
#ifndef KVMEM_BATCH_METADATA_H_
#define KVMEM_BATCH_METADATA_H_

#include <cstdint>
#include <vector>

namespace kvmem {

// Host-side metadata of a batch, in the order of the ids given. Paged: page_table rows
// of page_table_stride entries (padded with 0). Virtual: row_ids.
struct BatchMetadata {
  std::vector<int32_t> seq_lens;  // cache_seqlens: tokens of each entry
  std::vector<int32_t> row_ids;   // index row of each entry
  std::vector<int32_t> page_table;
  int64_t page_table_stride = 0;
  int32_t max_seq_len = 0;
};

}  // namespace kvmem

#endif  // KVMEM_BATCH_METADATA_H_
