// The running batch on the GPU: a KvCache on the CUDA backend, its running batch mirrored
// by DeviceRunningBatch and read by the decode kernel directly. After every step
// (ExtendBatch with a copy on write, TruncateBatch, Free of a member, a new order) the
// mirror's arrays equal the host's, the decode output over the mirror equals, bit for bit,
// the output over BuildBatchMetadata's table planned the old way, and a decode captured
// once in a CUDA graph over the mirror replays with each step's values. Skips, saying
// why, where there is no GPU.
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kvmem/attention.h"
#include "kvmem/device_running_batch.h"
#include "kvmem/kv_cache.h"
#include "kvmem/running_batch.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem {
namespace {

using gpu_test::DeviceBuffer;

constexpr int kKvHeads = 2;
constexpr int kGroup = 4;
constexpr int kHeadDim = 128;
constexpr int kMaxRequests = 8;
constexpr int64_t kMaxContext = 2048;

AttentionShape Shape() {
  AttentionShape s;
  s.num_q_heads = kKvHeads * kGroup;
  s.num_kv_heads = kKvHeads;
  s.head_dim = kHeadDim;
  s.kv_dtype = DType::kBFloat16;
  return s;
}

class RunningBatchGpuTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    KvCacheConfig config;
    config.num_layers = 1;
    config.num_kv_heads = kKvHeads;
    config.head_dim = kHeadDim;
    config.dtype = DType::kBFloat16;
    config.layout = Layout::kPaged;
    config.page_tokens = GetParam();
    config.max_requests = kMaxRequests;
    config.max_context = kMaxContext;
    config.memory_budget_bytes = int64_t{256} << 20;
    config.device = DeviceKind::kCuda;
    absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
    CUDA_ASSERT(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  DecodeOptions Options(bool fixed_grid) const {
    DecodeOptions o;
    o.shape = Shape();
    o.layout = Layout::kPaged;
    o.max_batch = kMaxRequests;
    o.max_context = kMaxContext;
    o.page_tokens = GetParam();
    o.fixed_grid = fixed_grid;
    return o;
  }

  // Random K/V for the tokens at `slots` (one layer).
  void WriteTokens(const std::vector<int64_t>& slots, std::mt19937_64& rng) {
    if (slots.empty()) return;
    const int64_t elems = int64_t(slots.size()) * kKvHeads * kHeadDim;
    std::vector<uint16_t> k(elems), v(elems);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (int64_t i = 0; i < elems; ++i) {
      k[i] = FloatToBf16Bits(u(rng));
      v[i] = FloatToBf16Bits(u(rng));
    }
    DeviceBuffer kd(elems * 2), vd(elems * 2), sd(slots.size() * 8);
    ASSERT_EQ(cudaMemcpy(kd.get(), k.data(), elems * 2, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(vd.get(), v.data(), elems * 2, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(sd.get(), slots.data(), slots.size() * 8, cudaMemcpyHostToDevice),
              cudaSuccess);
    BatchMetadata none;
    absl::StatusOr<PagedKv> view = cache_->PagedView(0, none);
    ASSERT_TRUE(view.ok()) << view.status();
    NewKv src;
    src.k = kd.get();
    src.v = vd.get();
    src.slots = static_cast<const int64_t*>(sd.get());
    src.num_tokens = static_cast<int64_t>(slots.size());
    ASSERT_OK(AppendKv<PagedKv>(Shape(), {&*view, 1}, src, stream_));
    CUDA_ASSERT(cudaStreamSynchronize(stream_));
  }

  // The mirror's arrays, read back, equal the host's.
  void ExpectMirrorEqualsHost(const DeviceRunningBatch& mirror) {
    const RunningBatchView host = cache_->RunningBatch();
    const RunningBatchView dev = mirror.view();
    ASSERT_EQ(dev.size, host.size);
    EXPECT_EQ(dev.max_seq_len, host.max_seq_len);
    const size_t n = kMaxRequests;
    std::vector<int32_t> lens(n), rows(n), last(n);
    CUDA_ASSERT(cudaMemcpy(lens.data(), dev.seq_lens, n * 4, cudaMemcpyDeviceToHost));
    CUDA_ASSERT(cudaMemcpy(rows.data(), dev.row_ids, n * 4, cudaMemcpyDeviceToHost));
    CUDA_ASSERT(cudaMemcpy(last.data(), dev.last_page_len, n * 4, cudaMemcpyDeviceToHost));
    EXPECT_EQ(lens, std::vector<int32_t>(host.seq_lens, host.seq_lens + n));
    EXPECT_EQ(rows, std::vector<int32_t>(host.row_ids, host.row_ids + n));
    EXPECT_EQ(last, std::vector<int32_t>(host.last_page_len, host.last_page_len + n));
    std::vector<int32_t> table(n * host.page_table_stride);
    CUDA_ASSERT(
        cudaMemcpy(table.data(), dev.page_table, table.size() * 4, cudaMemcpyDeviceToHost));
    for (int32_t b = 0; b < host.size; ++b) {
      const int64_t pages = (host.seq_lens[b] + GetParam() - 1) / GetParam();
      for (int64_t k = 0; k < pages; ++k) {
        ASSERT_EQ(table[b * host.page_table_stride + k], host.page_table[b * host.page_table_stride + k])
            << "entry " << b << " page " << k;
      }
    }
  }

  std::unique_ptr<KvCache> cache_;
  cudaStream_t stream_ = nullptr;
};

TEST_P(RunningBatchGpuTest, MirrorAndDecodeFollowEveryStep) {
  std::mt19937_64 rng(GetParam());
  const int pt = GetParam();
  std::vector<RequestId> ids = {1, 2, 3, 4};
  for (RequestId id : ids) {
    ASSERT_OK(cache_->AddRequest(id).status());
    absl::StatusOr<std::vector<int64_t>> slots =
        cache_->Extend(id, std::uniform_int_distribution<int64_t>(1, 300)(rng));
    ASSERT_TRUE(slots.ok()) << slots.status();
    WriteTokens(*slots, rng);
  }
  // 5 shares 2's partly filled last page: its first write copies it.
  ASSERT_OK(cache_->Fork(2, 5).status());
  ids.push_back(5);
  ASSERT_OK(cache_->SetRunningBatch(ids));

  absl::StatusOr<std::unique_ptr<DeviceRunningBatch>> mirror =
      DeviceRunningBatch::Create(kMaxRequests, cache_->RunningBatch().page_table_stride);
  ASSERT_TRUE(mirror.ok()) << mirror.status();
  auto ws = DecodeWorkspace::Create(Options(false));
  auto ws_ref = DecodeWorkspace::Create(Options(false));
  auto ws_graph = DecodeWorkspace::Create(Options(true));
  ASSERT_TRUE(ws.ok() && ws_ref.ok() && ws_graph.ok());
  const int64_t q_elems = int64_t{kMaxRequests} * kKvHeads * kGroup * kHeadDim;
  DeviceBuffer q(q_elems * 2), out(q_elems * 2), out_ref(q_elems * 2), out_graph(q_elems * 2);
  BatchMetadata none;
  absl::StatusOr<PagedKv> layer = cache_->PagedView(0, none);
  ASSERT_TRUE(layer.ok()) << layer.status();

  // The graph: one decode over the mirror's table, captured before any step.
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_ASSERT(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  const absl::Status captured = DecodeAttention(**ws_graph, (*mirror)->Bind(*layer), q.get(),
                                                out_graph.get(), stream_);
  CUDA_ASSERT(cudaStreamEndCapture(stream_, &graph));
  ASSERT_TRUE(captured.ok()) << captured;
  CUDA_ASSERT(cudaGraphInstantiate(&exec, graph, 0));

  RunningBatchChanges changes;
  for (int step = 0; step < 12; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    // Changes of membership and rewinds between decode steps.
    if (step == 4) {
      const RequestId back[] = {1, 3};
      const int64_t lens[] = {cache_->Length(1).value() - 3, cache_->Length(3).value() - pt - 1};
      ASSERT_OK(cache_->TruncateBatch(back, lens));
    }
    if (step == 6) {
      ASSERT_OK(cache_->Free(3));  // its entry empties
      ids.erase(ids.begin() + 2);
    }
    if (step == 9) {  // a new order, and the empty entry goes
      ids = {5, 4, 1, 2};
      ASSERT_OK(cache_->SetRunningBatch(ids));
    }
    std::vector<int64_t> counts(ids.size(), 1);
    if (step == 2) counts[0] = 2 * pt + 1;  // a prefill-sized piece
    int64_t total = 0;
    for (int64_t c : counts) total += c;
    std::vector<int64_t> loc(total);
    ASSERT_OK(cache_->ExtendBatch(ids, counts, absl::MakeSpan(loc)));
    WriteTokens(loc, rng);
    ASSERT_OK(cache_->CheckInvariants());

    ASSERT_OK(cache_->TakeRunningBatchChanges(&changes));
    const RunningBatchView host = cache_->RunningBatch();
    ASSERT_OK((*mirror)->Upload(host, changes, stream_));
    CUDA_ASSERT(cudaStreamSynchronize(stream_));
    ExpectMirrorEqualsHost(**mirror);

    std::vector<uint16_t> qh(q_elems);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto& x : qh) x = FloatToBf16Bits(u(rng));
    CUDA_ASSERT(cudaMemcpy(q.get(), qh.data(), qh.size() * 2, cudaMemcpyHostToDevice));
    for (void* o : {out.get(), out_ref.get(), out_graph.get()}) {
      CUDA_ASSERT(cudaMemset(o, 0xff, q_elems * 2));
    }
    // Over the mirror, planned from the running batch.
    ASSERT_OK((*ws)->Plan(host, stream_));
    ASSERT_OK(DecodeAttention(**ws, (*mirror)->Bind(*layer), q.get(), out.get(), stream_));
    // The graph, replayed after a plan of this step.
    ASSERT_OK((*ws_graph)->Plan(host, stream_));
    CUDA_ASSERT(cudaGraphLaunch(exec, stream_));
    // The old way: a table built afresh and uploaded with the plan. Entries of freed
    // members are planned as empty (seq_len 0) there too.
    std::vector<int32_t> lens(host.seq_lens, host.seq_lens + host.size);
    BatchMetadata meta;
    std::vector<RequestId> live;
    for (RequestId id : ids) {
      if (cache_->Contains(id)) live.push_back(id);
    }
    ASSERT_OK(cache_->BuildBatchMetadata(live, &meta));
    std::vector<int32_t> table(host.size * meta.page_table_stride, 0);
    for (int32_t b = 0, j = 0; b < host.size; ++b) {
      if (lens[b] == 0) continue;
      std::copy(meta.page_table.begin() + j * meta.page_table_stride,
                meta.page_table.begin() + (j + 1) * meta.page_table_stride,
                table.begin() + b * meta.page_table_stride);
      ++j;
    }
    ASSERT_OK((*ws_ref)->PlanPaged(lens, table, meta.page_table_stride, stream_));
    ASSERT_OK(DecodeAttention(**ws_ref, (*ws_ref)->Bind(*layer), q.get(), out_ref.get(), stream_));
    CUDA_ASSERT(cudaStreamSynchronize(stream_));

    const int64_t used = int64_t{host.size} * kKvHeads * kGroup * kHeadDim;
    std::vector<uint16_t> a(used), b(used), g(used);
    CUDA_ASSERT(cudaMemcpy(a.data(), out.get(), used * 2, cudaMemcpyDeviceToHost));
    CUDA_ASSERT(cudaMemcpy(b.data(), out_ref.get(), used * 2, cudaMemcpyDeviceToHost));
    CUDA_ASSERT(cudaMemcpy(g.data(), out_graph.get(), used * 2, cudaMemcpyDeviceToHost));
    EXPECT_EQ(a, b) << "decode over the mirror differs from the rebuilt table's";
    EXPECT_EQ(g, a) << "the graph's replay differs";
  }
  CUDA_ASSERT(cudaGraphExecDestroy(exec));
  CUDA_ASSERT(cudaGraphDestroy(graph));
}

TEST_P(RunningBatchGpuTest, BadUploadIsRejected) {
  absl::StatusOr<std::unique_ptr<DeviceRunningBatch>> mirror =
      DeviceRunningBatch::Create(kMaxRequests - 1, 4);
  ASSERT_TRUE(mirror.ok()) << mirror.status();
  ASSERT_OK(cache_->AddRequest(1).status());
  ASSERT_OK(cache_->SetRunningBatch({1}));
  RunningBatchChanges changes;
  ASSERT_OK(cache_->TakeRunningBatchChanges(&changes));
  EXPECT_EQ((*mirror)->Upload(cache_->RunningBatch(), changes, stream_).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DeviceRunningBatch::Create(0, 4).status().code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(PageTokens, RunningBatchGpuTest, ::testing::Values(1, 16),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return absl::StrCat("page", info.param);
                         });

}  // namespace
}  // namespace kvmem
