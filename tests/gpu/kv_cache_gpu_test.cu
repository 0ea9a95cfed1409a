// Both KV layouts on the GPU (KvCacheConfig.device = kCuda, the CudaVmm backend): K/V
// written and read back by device kernels through PagedView / VirtualView (the batch
// metadata copied to device memory), extend, fork with aliasing, copy on write done by
// the device, truncate, free, fault injection on every backend call of an Extend, Trim of
// the elastic paged pool, and fenced reuse: memory freed behind a CUDA event is not handed
// out while a kernel still reads it. CheckInvariants runs after every step. Skips, saying
// why, where there is no driver or no GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/kv_cache.h"
#include "kvmem/stats.h"
#include "kvmem/testing/fault_injecting_vmm.h"
#include "kvmem/vmm.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem {
namespace {

#define EXPECT_OK(expr)                          \
  do {                                           \
    const ::absl::Status s_ = (expr);            \
    EXPECT_TRUE(s_.ok()) << #expr << ": " << s_; \
  } while (0)
#define ASSERT_OK_AND_ASSIGN(lhs, expr) \
  ASSERT_OK_AND_ASSIGN_IMPL_(CONCAT_(so_, __LINE__), lhs, expr)
#define CONCAT_INNER_(a, b) a##b
#define CONCAT_(a, b) CONCAT_INNER_(a, b)
#define ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr)        \
  auto tmp = (expr);                                      \
  ASSERT_TRUE(tmp.ok()) << #expr << ": " << tmp.status(); \
  lhs = std::move(*tmp)

constexpr int kMaxLayers = 8;

// ---- The data pattern: every element of every token is a function of its tag --------

// 16-bit element `e` = h * head_dim + d of K (kv 0) or V (kv 1) of a token written with
// `tag` in `layer`. Never zero, so unwritten (zeroed) memory never matches.
__host__ __device__ inline uint16_t Val(uint32_t tag, int layer, int kv, int e) {
  uint32_t x = tag * 0x9E3779B1u ^ static_cast<uint32_t>(layer) * 0x85EBCA77u ^
               static_cast<uint32_t>(kv) * 0xC2B2AE3Du ^ static_cast<uint32_t>(e) * 0x27D4EB2Fu;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  x ^= x >> 12;
  return static_cast<uint16_t>(x | 1u);
}

// One term of a request's checksum (wrapping sum over every element it holds).
__host__ __device__ inline uint32_t Term(uint16_t v, int64_t pos, int layer, int kv, int e) {
  return (static_cast<uint32_t>(v) + 1u) *
         (static_cast<uint32_t>(pos) * 2654435761u + static_cast<uint32_t>(layer) * 40503u +
          static_cast<uint32_t>(kv) * 7919u + static_cast<uint32_t>(e) * 2u + 1u);
}

template <typename View>
struct LayerViews {
  View layer[kMaxLayers];
  int num_layers = 0;
};

// Block i writes token i (slot slots[i], tag tags[i]) into every layer.
template <typename View>
__global__ void WriteTokensKernel(LayerViews<View> views, const int64_t* slots,
                                  const uint32_t* tags, int token_elems) {
  const int i = blockIdx.x;
  for (int l = 0; l < views.num_layers; ++l) {
    const View& kv = views.layer[l];
    const int64_t off = kv.SlotOffset(slots[i]);
    for (int e = threadIdx.x; e < token_elems; e += blockDim.x) {
      static_cast<uint16_t*>(kv.k)[off + e] = Val(tags[i], l, 0, e);
      static_cast<uint16_t*>(kv.v)[off + e] = Val(tags[i], l, 1, e);
    }
  }
}

// Batch entry blockIdx.y: compares every token (through the batch's page table / row
// ids) with the pattern of tags[b * tag_stride + pos]; counts what it checked and what
// differed.
template <typename View>
__global__ void CheckTokensKernel(LayerViews<View> views, const int32_t* seq_lens,
                                  const uint32_t* tags, int64_t tag_stride, int token_elems,
                                  unsigned long long* checked, unsigned long long* mismatched) {
  const int b = blockIdx.y;
  unsigned long long n = 0, bad = 0;
  for (int64_t pos = blockIdx.x; pos < seq_lens[b]; pos += gridDim.x) {
    const uint32_t tag = tags[b * tag_stride + pos];
    for (int l = 0; l < views.num_layers; ++l) {
      const View& kv = views.layer[l];
      const int64_t off = kv.Offset(b, pos);
      for (int e = threadIdx.x; e < token_elems; e += blockDim.x) {
        bad += static_cast<const uint16_t*>(kv.k)[off + e] != Val(tag, l, 0, e);
        bad += static_cast<const uint16_t*>(kv.v)[off + e] != Val(tag, l, 1, e);
        n += 2;
      }
    }
  }
  atomicAdd(checked, n);
  atomicAdd(mismatched, bad);
}

__device__ inline uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// One block re-reads batch entry 0 (every layer, K and V) again and again for at least
// `spin_ns`, storing the checksum of each pass: a long reader of a request's pages.
template <typename View>
__global__ void SpinChecksumKernel(LayerViews<View> views, int64_t len, int token_elems,
                                   int64_t spin_ns, uint32_t* sums, int max_passes, int* passes) {
  __shared__ uint32_t acc;
  __shared__ bool stop;
  const uint64_t t0 = GlobalTimerNs();
  for (int pass = 0;; ++pass) {
    if (threadIdx.x == 0) acc = 0;
    __syncthreads();
    uint32_t local = 0;
    for (int l = 0; l < views.num_layers; ++l) {
      const View& kv = views.layer[l];
      for (int64_t pos = 0; pos < len; ++pos) {
        const int64_t off = kv.Offset(0, pos);
        for (int e = threadIdx.x; e < token_elems; e += blockDim.x) {
          // __ldcv: fetched again on every pass, never served from an earlier load.
          local += Term(__ldcv(static_cast<const unsigned short*>(kv.k) + off + e), pos, l, 0, e);
          local += Term(__ldcv(static_cast<const unsigned short*>(kv.v) + off + e), pos, l, 1, e);
        }
      }
    }
    atomicAdd(&acc, local);
    __syncthreads();
    if (threadIdx.x == 0) {
      if (pass < max_passes) sums[pass] = acc;
      *passes = pass + 1;
      stop = GlobalTimerNs() - t0 >= static_cast<uint64_t>(spin_ns);
    }
    __syncthreads();
    if (stop) break;
  }
}

// ---- Device buffers -------------------------------------------------------------------

template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n = 1) : n_(std::max<size_t>(n, 1)) {
    if (cudaMalloc(&p_, n_ * sizeof(T)) != cudaSuccess) p_ = nullptr;
    if (p_ != nullptr) cudaMemset(p_, 0, n_ * sizeof(T));
  }
  explicit DeviceArray(const std::vector<T>& v) : DeviceArray(v.size()) {
    if (p_ != nullptr && !v.empty()) {
      cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
    }
  }
  ~DeviceArray() {
    if (p_ != nullptr) cudaFree(p_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  T* get() const { return p_; }
  std::vector<T> ToHost() const {
    std::vector<T> v(n_);
    cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }

 private:
  size_t n_;
  T* p_ = nullptr;
};

// Forwards to another backend, recording the ranges unmapped and mapped while armed: the
// fenced-reuse test proves with it that no freed page was unmapped before its fence.
class RecordingVmm : public Vmm {
 public:
  explicit RecordingVmm(std::shared_ptr<Vmm> inner) : inner_(std::move(inner)) {}
  void Arm(bool on) {
    std::lock_guard<std::mutex> lock(mu_);
    armed_ = on;
  }
  // (address, bytes) of every Unmap and Map while armed.
  std::vector<std::pair<uintptr_t, int64_t>> Touched() const {
    std::lock_guard<std::mutex> lock(mu_);
    return touched_;
  }

  std::string_view name() const override { return inner_->name(); }
  int64_t granularity() const override { return inner_->granularity(); }
  bool is_device() const override { return inner_->is_device(); }
  absl::StatusOr<uintptr_t> Reserve(int64_t bytes) override { return inner_->Reserve(bytes); }
  absl::Status FreeReservation(uintptr_t addr, int64_t bytes) override {
    return inner_->FreeReservation(addr, bytes);
  }
  absl::StatusOr<PhysHandle> Create() override { return inner_->Create(); }
  absl::Status Release(PhysHandle handle) override { return inner_->Release(handle); }
  absl::Status Map(uintptr_t addr, PhysHandle handle) override {
    Record(addr, inner_->granularity());
    return inner_->Map(addr, handle);
  }
  absl::Status SetAccess(uintptr_t addr, int64_t bytes) override {
    return inner_->SetAccess(addr, bytes);
  }
  absl::Status Unmap(uintptr_t addr, int64_t bytes) override {
    Record(addr, bytes);
    return inner_->Unmap(addr, bytes);
  }
  absl::Status Copy(uintptr_t dst, uintptr_t src, int64_t bytes) override {
    return inner_->Copy(dst, src, bytes);
  }
  bool FenceComplete(const Fence& fence) override { return inner_->FenceComplete(fence); }
  VmmCounters counters() const override { return inner_->counters(); }
  absl::StatusOr<MappingState> Query(uintptr_t addr) const override { return inner_->Query(addr); }

 private:
  void Record(uintptr_t addr, int64_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    if (armed_) touched_.emplace_back(addr, bytes);
  }
  std::shared_ptr<Vmm> inner_;
  mutable std::mutex mu_;
  bool armed_ = false;
  std::vector<std::pair<uintptr_t, int64_t>> touched_;
};

// Holds a stream at a host function until Open(). A watchdog opens it after a while, so
// that a backend call that (wrongly) waits for the device ends as a test failure, not a
// hang.
class HostGate {
 public:
  HostGate() = default;
  ~HostGate() { Open(); }
  HostGate(const HostGate&) = delete;
  HostGate& operator=(const HostGate&) = delete;

  void* flag() { return &open_; }
  static void CUDART_CB Wait(void* flag) {
    const auto* open = static_cast<const std::atomic<bool>*>(flag);
    while (!open->load()) std::this_thread::yield();
  }
  void StartWatchdog(std::chrono::milliseconds after) {
    watchdog_ = std::thread([this, after] {
      std::unique_lock<std::mutex> lock(mu_);
      if (!cv_.wait_for(lock, after, [this] { return stop_; })) {
        fired_ = true;
        open_ = true;
      }
    });
  }
  // Opens the gate and stops the watchdog. True if the watchdog had to open it.
  bool Open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    open_ = true;
    return fired_;
  }

 private:
  std::atomic<bool> open_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;   // guarded by mu_
  bool fired_ = false;  // written by the watchdog, read after joining it
  std::thread watchdog_;
};

// ---- The cache under test and a model of what each request holds ---------------------

struct LayoutCase {
  std::string name;
  Layout layout;
  Arrangement arrangement;
  int page_tokens;
  int chunk_tokens = 0;  // virtual all-layer: KvCacheConfig::chunk_tokens
};

// ctest shows the parameter by name, not as raw bytes.
void PrintTo(const LayoutCase& c, std::ostream* os) { *os << c.name; }

// 4 layers, 4 KV heads, head_dim 128, bf16: 1 KiB per token and layer, 8 KiB per token
// over all layers; with 2 MiB granules a virtual all-layer row maps chunks of 1024 tokens
// (8 MiB, each page one layer's K and V), a per-layer page holds 2048 tokens; a paged
// chunk (one granule of each of the 8 pools) 2048 tokens.
KvCacheConfig DeviceConfig(const LayoutCase& c, int64_t budget) {
  KvCacheConfig config;
  config.num_layers = 4;
  config.num_kv_heads = 4;
  config.head_dim = 128;
  config.dtype = DType::kBFloat16;
  config.layout = c.layout;
  config.arrangement = c.arrangement;
  config.page_tokens = c.page_tokens;
  config.chunk_tokens = c.chunk_tokens;
  config.max_requests = 16;
  config.max_context = 2048;
  config.memory_budget_bytes = budget;
  config.device = DeviceKind::kCuda;
  config.device_ordinal = 0;
  config.elastic_pool = true;
  config.map_ahead_tokens = 0;
  return config;
}

class KvCacheGpuTest : public ::testing::TestWithParam<LayoutCase> {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Vmm>> vmm = MakeCudaVmm(0);
    SKIP_WITHOUT_CUDA_VMM(vmm);
    vmm_ = std::shared_ptr<Vmm>(std::move(*vmm));
    ASSERT_CUDA(cudaSetDevice(0));
  }

  void TearDown() override {
    cache_.reset();
    if (vmm_ != nullptr) {
      // Everything the cache took from the driver went back with it.
      const VmmCounters c = vmm_->counters();
      EXPECT_EQ(c.live_reservations, 0);
      EXPECT_EQ(c.live_handles, 0);
      EXPECT_EQ(c.mapped_granules, 0);
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
  }

  // Creates the cache over `backend` (the plain CudaVmm unless given).
  void MakeCache(int64_t budget, std::shared_ptr<Vmm> backend = nullptr) {
    KvCacheConfig config = DeviceConfig(GetParam(), budget);
    config.vmm = backend != nullptr ? backend : vmm_;
    absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = std::move(*cache);
    config_ = cache_->config();
    token_elems_ = config_.num_kv_heads * config_.head_dim;
    const Stats s = cache_->GetStats();
    std::printf("[   INFO   ] %s: %s; pool_create_nanos=%lld (%lld handles up front)\n",
                GetParam().name.c_str(), s.ToString().c_str(),
                static_cast<long long>(s.pool_create_nanos),
                static_cast<long long>(s.vmm.calls[static_cast<int>(VmmOp::kCreate)]));
  }

  bool paged() const { return config_.layout == Layout::kPaged; }
  // Pages of one token are never partly filled, so nothing is ever copied on write.
  bool CopiesOnWrite() const { return !paged() || config_.page_tokens > 1; }

  template <typename View>
  absl::StatusOr<LayerViews<View>> Views(const BatchMetadata& meta, const int32_t* d_table,
                                         const int32_t* d_rows) const {
    LayerViews<View> v;
    v.num_layers = config_.num_layers;
    for (int l = 0; l < config_.num_layers; ++l) {
      if constexpr (std::is_same_v<View, PagedKv>) {
        absl::StatusOr<PagedKv> view = cache_->PagedView(l, meta);
        if (!view.ok()) return view.status();
        v.layer[l] = *view;
        v.layer[l].page_table = d_table;  // the kernels read the device copy
      } else {
        absl::StatusOr<VirtualKv> view = cache_->VirtualView(l, meta);
        if (!view.ok()) return view.status();
        v.layer[l] = *view;
        v.layer[l].row_ids = d_rows;
      }
    }
    return v;
  }

  // Writes new tags for `slots` (the result of an Extend of `id` from position `from`)
  // with a device kernel on `stream`, and records them in the model.
  void Write(RequestId id, int64_t from, const std::vector<int64_t>& slots,
             cudaStream_t stream = 0) {
    std::vector<uint32_t>& tags = model_[id];
    ASSERT_EQ(static_cast<int64_t>(tags.size()), from);
    std::vector<uint32_t> fresh(slots.size());
    for (auto& t : fresh) t = next_tag_++;
    tags.insert(tags.end(), fresh.begin(), fresh.end());
    if (slots.empty()) return;
    // Freed only after the kernel: the arrays live until the stream is synchronised.
    auto d_slots = std::make_shared<DeviceArray<int64_t>>(slots);
    auto d_tags = std::make_shared<DeviceArray<uint32_t>>(fresh);
    const BatchMetadata none;
    if (paged()) {
      ASSERT_OK_AND_ASSIGN(LayerViews<PagedKv> v, Views<PagedKv>(none, nullptr, nullptr));
      WriteTokensKernel<<<slots.size(), 256, 0, stream>>>(v, d_slots->get(), d_tags->get(),
                                                          token_elems_);
    } else {
      ASSERT_OK_AND_ASSIGN(LayerViews<VirtualKv> v, Views<VirtualKv>(none, nullptr, nullptr));
      WriteTokensKernel<<<slots.size(), 256, 0, stream>>>(v, d_slots->get(), d_tags->get(),
                                                          token_elems_);
    }
    ASSERT_CUDA(cudaGetLastError());
    ASSERT_CUDA(cudaStreamSynchronize(stream));
  }

  // Extends `id` by n tokens and writes them.
  void ExtendAndWrite(RequestId id, int64_t n) {
    ASSERT_OK_AND_ASSIGN(int64_t len, cache_->Length(id));
    ASSERT_OK_AND_ASSIGN(std::vector<int64_t> slots, cache_->Extend(id, n));
    ASSERT_EQ(static_cast<int64_t>(slots.size()), n);
    Write(id, len, slots);
  }

  // Reads every live request's tokens with a kernel through the views; all must match
  // the model. Then CheckInvariants.
  void CheckAll(const char* step) {
    SCOPED_TRACE(step);
    std::vector<RequestId> ids;
    int64_t max_len = 1, total = 0;
    for (const auto& [id, tags] : model_) {
      ids.push_back(id);
      max_len = std::max<int64_t>(max_len, tags.size());
      total += tags.size();
    }
    ASSERT_OK(cache_->CheckInvariants());
    if (ids.empty()) return;
    for (RequestId id : ids) {
      ASSERT_OK_AND_ASSIGN(int64_t len, cache_->Length(id));
      ASSERT_EQ(len, static_cast<int64_t>(model_[id].size())) << "request " << id;
    }
    BatchMetadata meta;
    ASSERT_OK(cache_->BuildBatchMetadata(ids, &meta));
    std::vector<uint32_t> tags(ids.size() * max_len, 0);
    for (size_t b = 0; b < ids.size(); ++b) {
      std::copy(model_[ids[b]].begin(), model_[ids[b]].end(), tags.begin() + b * max_len);
    }
    DeviceArray<int32_t> d_table(meta.page_table), d_rows(meta.row_ids), d_lens(meta.seq_lens);
    DeviceArray<uint32_t> d_tags(tags);
    DeviceArray<unsigned long long> d_checked(1), d_bad(1);
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(max_len, 512)),
                    static_cast<unsigned>(ids.size()));
    if (paged()) {
      ASSERT_OK_AND_ASSIGN(LayerViews<PagedKv> v,
                           Views<PagedKv>(meta, d_table.get(), d_rows.get()));
      CheckTokensKernel<<<grid, 256>>>(v, d_lens.get(), d_tags.get(), max_len, token_elems_,
                                       d_checked.get(), d_bad.get());
    } else {
      ASSERT_OK_AND_ASSIGN(LayerViews<VirtualKv> v,
                           Views<VirtualKv>(meta, d_table.get(), d_rows.get()));
      CheckTokensKernel<<<grid, 256>>>(v, d_lens.get(), d_tags.get(), max_len, token_elems_,
                                       d_checked.get(), d_bad.get());
    }
    ASSERT_CUDA(cudaGetLastError());
    ASSERT_CUDA(cudaDeviceSynchronize());
    EXPECT_EQ(d_checked.ToHost()[0],
              static_cast<unsigned long long>(total) * 2 * config_.num_layers * token_elems_);
    EXPECT_EQ(d_bad.ToHost()[0], 0u) << "elements that differ from what was written";
  }

  // Everything a caller can observe without the data (which CheckAll compares).
  struct Snapshot {
    std::map<RequestId, std::vector<int32_t>> index;
    int64_t held = 0, mapped = 0, physical = 0, used = 0, free = 0, stored = 0;
    int64_t live_handles = 0, mapped_granules = 0, live_reservations = 0;
    bool operator==(const Snapshot&) const = default;
  };
  Snapshot Snap() const {
    Snapshot s;
    for (const auto& [id, tags] : model_) {
      if (!cache_->ReqToToken(id, &s.index[id]).ok()) s.index[id] = {-42};
    }
    const Stats st = cache_->GetStats();
    s.held = st.held_bytes;
    s.mapped = st.mapped_bytes;
    s.physical = st.physical_bytes;
    s.used = st.pages_used;
    s.free = st.pages_free;
    s.stored = st.stored_tokens;
    const VmmCounters c = vmm_->counters();
    s.live_handles = c.live_handles;
    s.mapped_granules = c.mapped_granules;
    s.live_reservations = c.live_reservations;
    return s;
  }

  void Free(RequestId id, Fence fence = {}) {
    ASSERT_OK(cache_->Free(id, fence));
    model_.erase(id);
  }

  std::shared_ptr<Vmm> vmm_;
  std::unique_ptr<KvCache> cache_;
  KvCacheConfig config_;
  int token_elems_ = 0;
  std::map<RequestId, std::vector<uint32_t>> model_;
  uint32_t next_tag_ = 1;
};

constexpr int64_t kMiB = int64_t{1} << 20;

TEST_P(KvCacheGpuTest, ExtendForkCopyOnWriteTruncateFree) {
  MakeCache(256 * kMiB);
  ASSERT_OK(cache_->AddRequest(1).status());
  model_[1];
  ExtendAndWrite(1, 700);  // virtual all-layer: 3 pages, the last one partly filled
  CheckAll("extend 700");
  ExtendAndWrite(1, 1);
  ExtendAndWrite(1, 15);
  CheckAll("extend 1 + 15");

  // Fork: the child reads the parent's tokens through its own row / block table.
  ASSERT_OK(cache_->Fork(1, 2).status());
  model_[2] = model_[1];
  CheckAll("fork");
  const Stats after_fork = cache_->GetStats();
  EXPECT_GT(after_fork.pages_shared, 0);

  // Aliasing: a token of a full, shared page rewritten through the parent's row is seen
  // through the child's (same physical memory, no copy).
  {
    std::vector<int32_t> slots;
    ASSERT_OK(cache_->ReqToToken(1, &slots));
    const int64_t pos = 5;
    const uint32_t tag = next_tag_++;
    DeviceArray<int64_t> d_slot(std::vector<int64_t>{slots[pos]});
    DeviceArray<uint32_t> d_tag(std::vector<uint32_t>{tag});
    const BatchMetadata none;
    if (paged()) {
      ASSERT_OK_AND_ASSIGN(LayerViews<PagedKv> v, Views<PagedKv>(none, nullptr, nullptr));
      WriteTokensKernel<<<1, 256>>>(v, d_slot.get(), d_tag.get(), token_elems_);
    } else {
      ASSERT_OK_AND_ASSIGN(LayerViews<VirtualKv> v, Views<VirtualKv>(none, nullptr, nullptr));
      WriteTokensKernel<<<1, 256>>>(v, d_slot.get(), d_tag.get(), token_elems_);
    }
    ASSERT_CUDA(cudaDeviceSynchronize());
    model_[1][pos] = tag;
    model_[2][pos] = tag;  // the child sees it too
    CheckAll("write through the parent's row, read through both");
  }

  // Copy on write: both sides append into the shared, partly filled last page; the
  // device copies it and each side then sees only its own new tokens.
  const int64_t len = static_cast<int64_t>(model_[1].size());
  ExtendAndWrite(2, 50);
  ExtendAndWrite(1, 30);
  CheckAll("both append after the fork");
  const Stats after_cow = cache_->GetStats();
  if (CopiesOnWrite()) {
    EXPECT_GT(after_cow.cow_copies, 0);
    EXPECT_GT(after_cow.vmm.calls[static_cast<int>(VmmOp::kCopy)], 0);
  }
  EXPECT_EQ(static_cast<int64_t>(model_[2].size()), len + 50);

  // Truncate (speculative rewind) and grow again over the dropped range.
  ASSERT_OK(cache_->Truncate(1, 300));
  model_[1].resize(300);
  CheckAll("truncate to 300");
  ExtendAndWrite(1, 100);
  CheckAll("extend after truncate");
  ASSERT_OK(cache_->Truncate(2, 0));
  model_[2].clear();
  CheckAll("truncate to 0");
  ExtendAndWrite(2, 257);
  CheckAll("extend after truncate to 0");

  // More requests, then free them in an order that leaves holes.
  for (RequestId id = 3; id < 8; ++id) {
    ASSERT_OK(cache_->AddRequest(id).status());
    model_[id];
    ExtendAndWrite(id, 100 * static_cast<int64_t>(id));
  }
  CheckAll("8 requests");
  Free(4);
  Free(2);
  CheckAll("free 2 and 4");
  ASSERT_OK(cache_->AddRequest(9).status());
  model_[9];
  ExtendAndWrite(9, 1500);
  CheckAll("reuse freed memory");
  for (RequestId id : {1, 3, 5, 6, 7, 9}) Free(id);
  CheckAll("all freed");
  EXPECT_EQ(cache_->GetStats().num_requests, 0);
}

// The elastic paged pool maps chunks as it grows and Trim gives free ones back to the
// device; the virtual layout gives idle rows' pages back to its pool.
TEST_P(KvCacheGpuTest, TrimGivesMemoryBack) {
  MakeCache(256 * kMiB);
  for (RequestId id = 1; id <= 6; ++id) {
    ASSERT_OK(cache_->AddRequest(id).status());
    model_[id];
    ExtendAndWrite(id, 2000);
  }
  CheckAll("six long requests");
  const Stats grown = cache_->GetStats();
  for (RequestId id = 2; id <= 6; ++id) Free(id);
  CheckAll("five freed");
  size_t free_before = 0, free_after = 0, total = 0;
  ASSERT_CUDA(cudaMemGetInfo(&free_before, &total));
  ASSERT_OK_AND_ASSIGN(int64_t trimmed, cache_->Trim());
  ASSERT_CUDA(cudaMemGetInfo(&free_after, &total));
  CheckAll("trimmed");
  const Stats after = cache_->GetStats();
  std::printf(
      "[   INFO   ] %s: trim gave back %lld bytes; mapped %lld -> %lld, physical %lld -> "
      "%lld, device free +%lld bytes\n",
      GetParam().name.c_str(), static_cast<long long>(trimmed),
      static_cast<long long>(grown.mapped_bytes), static_cast<long long>(after.mapped_bytes),
      static_cast<long long>(grown.physical_bytes), static_cast<long long>(after.physical_bytes),
      static_cast<long long>(free_after) - static_cast<long long>(free_before));
  EXPECT_GT(trimmed, 0);
  EXPECT_LT(after.mapped_bytes, grown.mapped_bytes);
  if (paged()) {
    // The elastic pool released the handles: the device has the memory back.
    EXPECT_LT(after.physical_bytes, grown.physical_bytes);
    EXPECT_GE(static_cast<int64_t>(free_after) - static_cast<int64_t>(free_before),
              trimmed - 8 * kMiB);
  }
  ExtendAndWrite(1, 40);
  CheckAll("grow after trim");
}

// Every backend call an Extend makes fails in turn; each failure leaves the cache (and
// the driver) exactly as before, data included. Then the same for the Extend that copies
// a shared page on write.
TEST_P(KvCacheGpuTest, FaultInjectionOnEveryCallOfAnExtend) {
  auto faulty = std::make_shared<FaultInjectingVmm>(vmm_);
  MakeCache(256 * kMiB, faulty);
  ASSERT_OK(cache_->AddRequest(1).status());
  model_[1];
  ExtendAndWrite(1, 100);
  CheckAll("start");

  struct Case {
    const char* what;
    RequestId id;
    int64_t n;
    bool expect_calls;
  };
  auto run = [&](const Case& c) {
    SCOPED_TRACE(c.what);
    int64_t injected = 0;
    for (int64_t i = 1; i < 10000; ++i) {
      const Snapshot before = Snap();
      const int64_t len = static_cast<int64_t>(model_[c.id].size());
      faulty->FailNthAny(i);
      absl::StatusOr<std::vector<int64_t>> slots = cache_->Extend(c.id, c.n);
      faulty->DisarmAll();
      if (slots.ok()) {
        Write(c.id, len, *slots);
        break;
      }
      ++injected;
      EXPECT_EQ(slots.status().code(), absl::StatusCode::kResourceExhausted) << slots.status();
      EXPECT_TRUE(Snap() == before) << "state changed by a failed Extend (call " << i << ")";
      CheckAll("after an injected failure");
      if (::testing::Test::HasFailure()) return;
    }
    if (c.expect_calls) EXPECT_GT(injected, 0) << "the Extend made no backend call to fail";
    std::printf("[   INFO   ] %s / %s: %lld backend calls failed in turn, state unchanged\n",
                GetParam().name.c_str(), c.what, static_cast<long long>(injected));
    CheckAll("after the successful Extend");
  };
  // A second request beyond what is mapped: virtual maps new pages under its row, paged
  // maps a new chunk (request 1 left too little of the first).
  ASSERT_OK(cache_->AddRequest(3).status());
  model_[3];
  run({"growth", 3, 1990, true});
  // Fork, then the child writes into the shared, partly filled last page: copy on write.
  ASSERT_OK(cache_->Fork(3, 2).status());
  model_[2] = model_[3];
  CheckAll("fork");
  run({"copy on write", 2, 1, CopiesOnWrite()});
  if (CopiesOnWrite()) EXPECT_GT(cache_->GetStats().cow_copies, 0);
}

// A kernel still reading a freed request's pages: until its event completes no other
// request gets that memory (paged: none of its pages; virtual: nothing unmapped from its
// row), and the kernel sees the data unchanged throughout.
//
// The reader's stream is: spin kernel (~50 ms of passes over A) -> host function held
// until the test opens it -> event. So the event is certainly pending while the test
// allocates, however the kernel is scheduled (compute-sanitizer may run launches
// synchronously), and no GPU work is issued while the gate is closed (a serialising tool
// would queue it behind the gate). A watchdog opens the gate if a call blocks.
TEST_P(KvCacheGpuTest, FencedReuseWaitsForTheReadersEvent) {
  auto recorder = std::make_shared<RecordingVmm>(vmm_);
  MakeCache(64 * kMiB, recorder);
  // A holds one max_context request's worth; fillers take the rest, then go.
  ASSERT_OK(cache_->AddRequest(1).status());
  model_[1];
  ExtendAndWrite(1, config_.max_context);
  for (RequestId id = 100;; ++id) {
    ASSERT_LT(id, 115) << "the budget never ran out";
    ASSERT_OK(cache_->AddRequest(id).status());
    model_[id];
    bool full = false;
    while (static_cast<int64_t>(model_[id].size()) + 64 <= config_.max_context) {
      ASSERT_OK_AND_ASSIGN(int64_t len, cache_->Length(id));
      absl::StatusOr<std::vector<int64_t>> slots = cache_->Extend(id, 64);
      if (!slots.ok()) {
        ASSERT_EQ(slots.status().code(), absl::StatusCode::kResourceExhausted) << slots.status();
        full = true;
        break;
      }
      Write(id, len, *slots);
    }
    if (full) break;
  }
  CheckAll("memory full");
  for (RequestId id = 100; id < 116; ++id) {
    if (model_.contains(id)) Free(id);
  }
  CheckAll("fillers freed");

  // What A holds: its checksum (from the pattern), its pages (paged) or the address
  // ranges of its row (virtual).
  uint32_t want = 0;
  {
    const std::vector<uint32_t>& tags = model_[1];
    for (int l = 0; l < config_.num_layers; ++l) {
      for (int64_t pos = 0; pos < static_cast<int64_t>(tags.size()); ++pos) {
        for (int e = 0; e < token_elems_; ++e) {
          for (int kv = 0; kv < 2; ++kv) want += Term(Val(tags[pos], l, kv, e), pos, l, kv, e);
        }
      }
    }
  }
  BatchMetadata meta;
  ASSERT_OK(cache_->BuildBatchMetadata(std::vector<RequestId>{1}, &meta));
  std::vector<int32_t> pages_a;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges_a;  // [begin, end) of A's row
  if (paged()) {
    ASSERT_OK_AND_ASSIGN(pages_a, cache_->BlockTable(1));
  } else {
    for (int l = 0; l < config_.num_layers; ++l) {
      ASSERT_OK_AND_ASSIGN(VirtualKv v, cache_->VirtualView(l, meta));
      const int64_t row_bytes = v.row_stride * 2;  // the whole row, chunked or not
      for (void* base : {v.k, v.v}) {
        const uintptr_t b = reinterpret_cast<uintptr_t>(base) +
                            static_cast<uintptr_t>(int64_t{meta.row_ids[0]} * v.row_stride * 2);
        ranges_a.emplace_back(b, b + row_bytes);
      }
    }
  }
  DeviceArray<int32_t> d_table(meta.page_table), d_rows(meta.row_ids);
  constexpr int kMaxPasses = 1 << 16;
  DeviceArray<uint32_t> d_sums(kMaxPasses);
  DeviceArray<int> d_passes(1);
  const int64_t len_a = static_cast<int64_t>(model_[1].size());
  cudaStream_t reader, writer;
  ASSERT_CUDA(cudaStreamCreateWithFlags(&reader, cudaStreamNonBlocking));
  ASSERT_CUDA(cudaStreamCreateWithFlags(&writer, cudaStreamNonBlocking));
  cudaEvent_t done;
  ASSERT_CUDA(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));

  HostGate gate;
  gate.StartWatchdog(std::chrono::seconds(20));
  constexpr int64_t kSpinNs = 50'000'000;  // ~50 ms
  if (paged()) {
    ASSERT_OK_AND_ASSIGN(LayerViews<PagedKv> v, Views<PagedKv>(meta, d_table.get(), d_rows.get()));
    SpinChecksumKernel<<<1, 1024, 0, reader>>>(v, len_a, token_elems_, kSpinNs, d_sums.get(),
                                               kMaxPasses, d_passes.get());
  } else {
    ASSERT_OK_AND_ASSIGN(LayerViews<VirtualKv> v,
                         Views<VirtualKv>(meta, d_table.get(), d_rows.get()));
    SpinChecksumKernel<<<1, 1024, 0, reader>>>(v, len_a, token_elems_, kSpinNs, d_sums.get(),
                                               kMaxPasses, d_passes.get());
  }
  ASSERT_CUDA(cudaGetLastError());
  ASSERT_CUDA(cudaLaunchHostFunc(reader, &HostGate::Wait, gate.flag()));
  ASSERT_CUDA(cudaEventRecord(done, reader));
  const Fence fence{static_cast<void*>(done)};
  const int64_t physical_before = cache_->GetStats().physical_bytes;
  recorder->Arm(true);
  ASSERT_OK(cache_->Free(1, fence));
  model_.erase(1);
  ASSERT_OK(cache_->CheckInvariants());
  const Stats quarantined = cache_->GetStats();
  EXPECT_GT(quarantined.idle_bytes, 0);
  if (paged()) EXPECT_GT(quarantined.pages_quarantined, 0);

  // New requests take all the memory they can while the fence is pending: they must run
  // out without any of A's.
  int64_t got_while_pending = 0;
  bool exhausted = false;
  std::vector<std::pair<RequestId, std::vector<int64_t>>> news;
  for (RequestId id = 200; id < 200 + 15 && !exhausted; ++id) {
    ASSERT_OK(cache_->AddRequest(id).status());
    news.emplace_back(id, std::vector<int64_t>{});
    std::vector<int64_t>& slots = news.back().second;
    while (static_cast<int64_t>(slots.size()) + 64 <= config_.max_context) {
      absl::Status s = cache_->ExtendInto(id, 64, &slots);
      if (!s.ok()) {
        ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
        exhausted = true;
        break;
      }
      got_while_pending += 64;
    }
    ASSERT_OK(cache_->CheckInvariants());
  }
  EXPECT_TRUE(exhausted) << "new requests got " << got_while_pending
                         << " tokens while A's memory was fenced";
  EXPECT_EQ(cache_->GetStats().physical_bytes, physical_before);
  if (paged()) {
    const std::set<int32_t> a(pages_a.begin(), pages_a.end());
    for (const auto& [id, slots] : news) {
      ASSERT_OK_AND_ASSIGN(std::vector<int32_t> table, cache_->BlockTable(id));
      for (int32_t p : table) EXPECT_FALSE(a.contains(p)) << "request " << id << " got page " << p;
    }
  } else {
    for (const auto& [addr, bytes] : recorder->Touched()) {
      for (const auto& [b, e] : ranges_a) {
        EXPECT_FALSE(addr < e && addr + bytes > b)
            << "mapped or unmapped [" << addr << ", +" << bytes << ") inside the freed row";
      }
    }
  }
  ASSERT_EQ(cudaEventQuery(done), cudaErrorNotReady) << "the gate should hold the event";
  std::printf(
      "[   INFO   ] %s: %lld tokens admitted while the fence was pending, then "
      "ResourceExhausted\n",
      GetParam().name.c_str(), static_cast<long long>(got_while_pending));

  // Still pending (the gate): a new request is refused again.
  const RequestId growing = 300;
  ASSERT_OK(cache_->AddRequest(growing).status());
  model_[growing];
  EXPECT_EQ(cache_->Extend(growing, 64).status().code(), absl::StatusCode::kResourceExhausted);
  recorder->Arm(false);
  EXPECT_FALSE(gate.Open()) << "a call blocked until the reader's stream could go on";
  ASSERT_CUDA(cudaEventSynchronize(done));

  const int passes = d_passes.ToHost()[0];
  const std::vector<uint32_t> sums = d_sums.ToHost();
  ASSERT_GE(passes, 1);
  int differing = 0;
  for (int p = 0; p < std::min(passes, kMaxPasses); ++p) differing += sums[p] != want;
  EXPECT_EQ(differing, 0) << "of " << passes << " passes over the freed request's pages";
  std::printf(
      "[   INFO   ] %s: the reader made %d passes over %lld tokens, each with the "
      "checksum of the data before the free\n",
      GetParam().name.c_str(), passes, static_cast<long long>(len_a));

  // The new requests' data, and A's memory reusable now that the event has completed.
  for (auto& [id, slots] : news) {
    model_[id];
    Write(id, 0, slots, writer);
  }
  CheckAll("new requests' data");
  ExtendAndWrite(growing, 64);
  CheckAll("reuse after the fence");
  ASSERT_CUDA(cudaEventDestroy(done));
  ASSERT_CUDA(cudaStreamDestroy(reader));
  ASSERT_CUDA(cudaStreamDestroy(writer));
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, KvCacheGpuTest,
    ::testing::Values(LayoutCase{"Paged16", Layout::kPaged, Arrangement::kAllLayers, 16},
                      LayoutCase{"Paged1", Layout::kPaged, Arrangement::kAllLayers, 1},
                      LayoutCase{"VirtualAllLayers", Layout::kVirtual, Arrangement::kAllLayers, 16},
                      LayoutCase{"VirtualAllLayersUnchunked", Layout::kVirtual,
                                 Arrangement::kAllLayers, 16, 1},
                      LayoutCase{"VirtualPerLayer", Layout::kVirtual, Arrangement::kPerLayer, 16}),
    [](const ::testing::TestParamInfo<LayoutCase>& info) { return info.param.name; });

}  // namespace
}  // namespace kvmem
