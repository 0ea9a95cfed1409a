// GPU tests of DecodeAttention (kvmem/attention.h) against the CPU reference
// (ReferenceDecode): paged pages of 1, 3, 16, 64 and 256 tokens, virtual all-layer and
// per-layer arrangements, head_dim 64/128/256, bf16 and fp16, GQA groups 1..16, lengths
// 0, 1, page and tile boundaries, split and unsplit plans, sliding windows, 131072 tokens,
// and one CUDA graph replayed over changed lengths and page tables.
//
// Memory no request owns is NaN, outputs are poisoned (NaN) before every launch, and
// inputs are fresh random values, so a stray read or an unwritten output fails.
// KVMEM_TEST_SMALL=1 skips the 131072-token case (for compute-sanitizer runs).
// Skips, saying so, where no GPU is present.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kvmem/attention.h"
#include "kvmem/debug/decode_trace.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/reference_attention.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::Kind;
using gpu_test::KindName;
using gpu_test::RandomQ;
using gpu_test::SmallRun;

struct Case {
  Kind kind = Kind::kPaged;
  int page_tokens = 16;
  DType dtype = DType::kBFloat16;
  int head_dim = 128;
  int kv_heads = 2;
  int group = 4;
  int window = -1;
  float scale = 0.f;
  float q_std = 1.f;
  int stages = 0;  // DecodeOptions::pipeline_stages: 0, the device's choice
  std::vector<int32_t> lens;

  std::string Name() const {
    return absl::StrCat(KindName(kind),
                        kind == Kind::kPaged ? absl::StrCat(" page ", page_tokens) : std::string(),
                        " ", std::string(DTypeName(dtype)), " D", head_dim, " H", kv_heads, " G",
                        group, " window ", window, " stages ", stages, " batch ", lens.size());
  }
  AttentionShape Shape() const {
    AttentionShape s;
    s.num_q_heads = kv_heads * group;
    s.num_kv_heads = kv_heads;
    s.head_dim = head_dim;
    s.kv_dtype = dtype;
    s.scale = scale;
    s.window_left = window;
    return s;
  }
};

// Allowed ||out - ref|| / ||ref|| per request. The kernel rounds the softmax weights to
// the storage type for the tensor-core P V product and the output to the storage type;
// each is a relative error of at most 2^-9 (bf16) or 2^-12 (fp16) per element, about
// 1.5e-3 / 2e-4 in norm. Wrong indexing or a missed key gives O(1e-1) and more.
double Tolerance(DType t) { return t == DType::kBFloat16 ? 6e-3 : 1.5e-3; }

using TestKv = gpu_test::TestKv<Case>;

DecodeOptions OptionsFor(const Case& c, int max_batch, int64_t max_context, bool fixed_grid) {
  DecodeOptions o;
  o.shape = c.Shape();
  o.layout = c.kind == Kind::kPaged ? Layout::kPaged : Layout::kVirtual;
  o.max_batch = max_batch;
  o.max_context = max_context;
  o.page_tokens = c.page_tokens;
  o.fixed_grid = fixed_grid;
  o.pipeline_stages = c.stages;
  return o;
}

absl::Status Plan(DecodeWorkspace& ws, const TestKv& kv, absl::Span<const int32_t> lens,
                  cudaStream_t stream) {
  if (ws.options().layout == Layout::kPaged) {
    return ws.PlanPaged(lens, kv.page_table(), kv.page_table_stride(), stream);
  }
  return ws.PlanVirtual(lens, kv.row_ids(), stream);
}

absl::Status Launch(const DecodeWorkspace& ws, const TestKv& kv, const void* q, void* out,
                    cudaStream_t stream) {
  if (ws.options().layout == Layout::kPaged) {
    return DecodeAttention(ws, ws.Bind(kv.DevicePaged()), q, out, stream);
  }
  return DecodeAttention(ws, ws.Bind(kv.DeviceVirtual()), q, out, stream);
}

// Compares the device output with ReferenceDecode on the host copy, request by request.
void ExpectMatchesReference(const Case& c, const TestKv& kv, absl::Span<const int32_t> lens,
                            const std::vector<float>& q, const std::vector<uint16_t>& out_bits) {
  const int64_t row = int64_t{c.kv_heads} * c.group * c.head_dim;
  std::vector<float> ref(lens.size() * row);
  const absl::Status st =
      c.kind == Kind::kPaged
          ? ReferenceDecode(c.Shape(), kv.HostPaged(), lens, q.data(), ref.data())
          : ReferenceDecode(c.Shape(), kv.HostVirtual(), lens, q.data(), ref.data());
  ASSERT_TRUE(st.ok()) << st;
  double worst = 0.0;
  for (size_t b = 0; b < lens.size(); ++b) {
    const auto [err2, ref2, bad] =
        gpu_test::CompareToReference(c.dtype, out_bits, ref, b * row, (b + 1) * row);
    ASSERT_EQ(bad, 0) << "request " << b << " (len " << lens[b] << "): " << bad
                      << " outputs not finite (unwritten or NaN read)";
    if (ref2 == 0.0) {
      EXPECT_EQ(err2, 0.0) << "request " << b << " (len " << lens[b] << ") must be all zeros";
      continue;
    }
    const double rel = std::sqrt(err2 / ref2);
    worst = std::max(worst, rel);
    EXPECT_LE(rel, Tolerance(c.dtype)) << "request " << b << " (len " << lens[b] << ")";
  }
  ::testing::Test::RecordProperty("worst_rel_error", absl::StrCat(worst));
}

struct RunInfo {
  int batch = 0;
  int num_work = 0;
};

// One case end to end: storage, plan, launch, compare. Returns what the plan did.
RunInfo RunCase(const Case& c) {
  SCOPED_TRACE(c.Name());
  RunInfo info;
  std::mt19937_64 rng(std::hash<std::string>{}(c.Name()));
  const int batch = static_cast<int>(c.lens.size());
  const int64_t max_len = *std::max_element(c.lens.begin(), c.lens.end());
  const int64_t max_context = std::max<int64_t>(max_len, 1) + 7;
  const int64_t total = std::accumulate(c.lens.begin(), c.lens.end(), int64_t{0});
  TestKv kv(c, batch, max_context, total);
  EXPECT_TRUE(kv.ok()) << "device allocation failed";
  if (!kv.ok()) return info;
  kv.Fill(c.lens, rng);

  std::vector<float> q;
  std::vector<uint16_t> q_bits;
  RandomQ(c, batch, rng, &q, &q_bits);
  DeviceBuffer q_dev(q_bits.size() * 2);
  DeviceBuffer out_dev(q_bits.size() * 2);
  EXPECT_EQ(cudaMemcpy(q_dev.get(), q_bits.data(), q_bits.size() * 2, cudaMemcpyHostToDevice),
            cudaSuccess);
  EXPECT_EQ(cudaMemset(out_dev.get(), 0xff, out_dev.bytes()), cudaSuccess);  // NaN poison

  auto ws = DecodeWorkspace::Create(OptionsFor(c, batch, max_context, false));
  EXPECT_TRUE(ws.ok()) << ws.status();
  if (!ws.ok()) return info;
  const absl::Status planned = Plan(**ws, kv, c.lens, nullptr);
  EXPECT_TRUE(planned.ok()) << planned;
  const absl::Status launched = Launch(**ws, kv, q_dev.get(), out_dev.get(), nullptr);
  EXPECT_TRUE(launched.ok()) << launched;
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  info.batch = (*ws)->batch();
  info.num_work = (*ws)->num_work();

  std::vector<uint16_t> out_bits(q_bits.size());
  EXPECT_EQ(cudaMemcpy(out_bits.data(), out_dev.get(), out_bits.size() * 2, cudaMemcpyDeviceToHost),
            cudaSuccess);
  ExpectMatchesReference(c, kv, c.lens, q, out_bits);
  return info;
}

// Lengths at and around page and tile (32 / 64 tokens) boundaries, plus 0 and 1 and a
// few long ones that the plan splits.
std::vector<int32_t> BoundaryLens(int page) {
  std::vector<int32_t> lens = {0, 1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000, 2049, 4100};
  for (int m : {1, 2, 3}) {
    for (int d : {-1, 0, 1}) {
      if (m * page + d >= 1) lens.push_back(m * page + d);
    }
  }
  return lens;
}

TEST(DecodeAttentionTest, PagedPageSizes) {
  SKIP_WITHOUT_GPU();
  for (int page : {1, 3, 16, 64, 256}) {
    Case c;
    c.kind = Kind::kPaged;
    c.page_tokens = page;
    c.lens = BoundaryLens(page);
    const RunInfo info = RunCase(c);
    EXPECT_GT(info.num_work, info.batch) << "a small batch of long requests must be split";
  }
}

TEST(DecodeAttentionTest, VirtualArrangements) {
  SKIP_WITHOUT_GPU();
  for (Kind kind : {Kind::kVirtualAllLayers, Kind::kVirtualPerLayer}) {
    Case c;
    c.kind = kind;
    c.lens = BoundaryLens(16);
    RunCase(c);
  }
  // Chunks of one token (shift 0 with a gap), smaller than, equal to and larger than a
  // 64-token tile.
  for (int chunk : {1, 2, 16, 64, 512}) {
    Case c;
    c.kind = Kind::kVirtualChunked;
    c.page_tokens = chunk;
    c.lens = BoundaryLens(chunk);
    RunCase(c);
  }
}

// Head_dim 128 is built with two pipeline depths and a device runs one of them unless told
// otherwise: both match the reference on every layout, at page and tile boundaries and in
// split requests, whichever the device would choose.
TEST(DecodeAttentionTest, BothPipelineDepths) {
  SKIP_WITHOUT_GPU();
  for (int stages : {2, 3}) {
    for (Kind kind :
         {Kind::kPaged, Kind::kVirtualAllLayers, Kind::kVirtualPerLayer, Kind::kVirtualChunked}) {
      Case c;
      c.kind = kind;
      c.stages = stages;
      c.lens = BoundaryLens(16);
      const RunInfo info = RunCase(c);
      EXPECT_GT(info.num_work, info.batch) << "a small batch of long requests must be split";
    }
  }
}

TEST(DecodeAttentionTest, HeadDimsAndDtypes) {
  SKIP_WITHOUT_GPU();
  for (int d : {64, 128, 256}) {
    for (DType t : {DType::kBFloat16, DType::kFloat16}) {
      for (Kind kind : {Kind::kPaged, Kind::kVirtualAllLayers, Kind::kVirtualChunked}) {
        Case c;
        c.kind = kind;
        c.page_tokens = 16;
        c.dtype = t;
        c.head_dim = d;
        c.lens = {0, 1, 31, 32, 33, 64, 200, 1500, 3000};
        RunCase(c);
      }
    }
  }
}

TEST(DecodeAttentionTest, GroupSizes) {
  SKIP_WITHOUT_GPU();
  std::vector<std::pair<int, int>> heads;  // (kv_heads, group)
  for (int g = 1; g <= 8; ++g) heads.push_back({2, g});
  heads.push_back({4, 7});   // 28 query heads over 4 KV heads
  heads.push_back({1, 16});  // the whole MMA
  heads.push_back({3, 12});
  for (auto [h, g] : heads) {
    Case c;
    c.kv_heads = h;
    c.group = g;
    c.page_tokens = 16;
    c.lens = {0, 1, 17, 100, 700, 2500};
    RunCase(c);
  }
}

TEST(DecodeAttentionTest, SlidingWindowAndScale) {
  SKIP_WITHOUT_GPU();
  for (int window : {0, 1, 70, 1000}) {
    for (Kind kind : {Kind::kPaged, Kind::kVirtualPerLayer, Kind::kVirtualChunked}) {
      Case c;
      c.kind = kind;
      c.page_tokens = kind == Kind::kVirtualChunked ? 32 : 3;
      c.window = window;
      c.scale = 0.2f;
      c.q_std = 3.f;  // peaked softmax: exercises the running max
      c.lens = {0, 1, 2, 70, 71, 72, 999, 1000, 1001, 1002, 5000};
      RunCase(c);
    }
  }
}

// A batch of n requests of random lengths in [0, max_len], 8 KV heads, pages of 16.
Case RandomBatch(int n, int max_len, int group, uint32_t seed) {
  Case c;
  c.kv_heads = 8;
  c.group = group;
  c.page_tokens = 16;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> len(0, max_len);
  for (int b = 0; b < n; ++b) c.lens.push_back(len(rng));
  return c;
}

// batch x kv_heads above the resident CTAs: one work item per request, no merge.
TEST(DecodeAttentionTest, LargeBatchUnsplit) {
  SKIP_WITHOUT_GPU();
  const RunInfo info = RunCase(RandomBatch(200, 600, 2, 7));
  EXPECT_EQ(info.num_work, info.batch);
}

// A batch that fills the device with one long request among short ones: the plan cuts
// the long one into pieces no longer than half a slot's share and dispatches them first,
// so its pieces' partial results merge from slots out of dispatch order.
TEST(DecodeAttentionTest, LongRequestAmongShortOnesIsSplit) {
  SKIP_WITHOUT_GPU();
  for (Kind kind :
       {Kind::kPaged, Kind::kVirtualAllLayers, Kind::kVirtualPerLayer, Kind::kVirtualChunked}) {
    Case c = RandomBatch(60, 300, 4, 11);
    c.kind = kind;
    c.lens[37] = 20000;
    const RunInfo info = RunCase(c);
    EXPECT_GT(info.num_work, info.batch) << "the long request must be split";
  }
}

TEST(DecodeAttentionTest, LongContext) {
  SKIP_WITHOUT_GPU();
  if (SmallRun()) GTEST_SKIP() << "KVMEM_TEST_SMALL: 131072-token case skipped";
  for (Kind kind : {Kind::kPaged, Kind::kVirtualPerLayer, Kind::kVirtualChunked}) {
    Case c;
    c.kind = kind;
    c.page_tokens = kind == Kind::kVirtualChunked ? 512 : 16;
    c.lens = {131072, 65537};
    const RunInfo info = RunCase(c);
    EXPECT_GT(info.num_work, info.batch);
  }
}

// A step captured once (fixed_grid) replays over new lengths, batch sizes, page tables
// and row ids, and K/V contents: split and unsplit plans alike.
TEST(DecodeAttentionTest, GraphReplayWithNewLengthsAndTables) {
  SKIP_WITHOUT_GPU();
  const std::vector<std::vector<int32_t>> steps = {{5000, 3, 0, 700},
                                                   {17, 64, 1, 2000, 129, 4000, 0, 9},
                                                   {6000},
                                                   std::vector<int32_t>(24, 100),
                                                   {}};
  for (Kind kind : {Kind::kPaged, Kind::kVirtualAllLayers, Kind::kVirtualChunked}) {
    Case c;
    c.kind = kind;
    c.page_tokens = 16;
    const int max_batch = 24;
    const int64_t max_context = 6000;
    SCOPED_TRACE(c.Name());
    std::mt19937_64 rng(11);
    TestKv kv(c, max_batch, max_context, 12000);
    ASSERT_TRUE(kv.ok());
    const int64_t q_elems = int64_t{max_batch} * c.kv_heads * c.group * c.head_dim;
    DeviceBuffer q_dev(q_elems * 2);
    DeviceBuffer out_dev(q_elems * 2);
    auto ws = DecodeWorkspace::Create(OptionsFor(c, max_batch, max_context, true));
    ASSERT_TRUE(ws.ok()) << ws.status();
    cudaStream_t stream;
    CUDA_ASSERT(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CUDA_ASSERT(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    const absl::Status captured = Launch(**ws, kv, q_dev.get(), out_dev.get(), stream);
    CUDA_ASSERT(cudaStreamEndCapture(stream, &graph));
    ASSERT_TRUE(captured.ok()) << captured;
    CUDA_ASSERT(cudaGraphInstantiate(&exec, graph, 0));
    for (size_t s = 0; s < steps.size(); ++s) {
      SCOPED_TRACE(absl::StrCat("step ", s));
      const std::vector<int32_t>& lens = steps[s];
      kv.Fill(lens, rng);
      std::vector<float> q;
      std::vector<uint16_t> q_bits;
      RandomQ(c, static_cast<int>(lens.size()), rng, &q, &q_bits);
      CUDA_ASSERT(
          cudaMemcpy(q_dev.get(), q_bits.data(), q_bits.size() * 2, cudaMemcpyHostToDevice));
      CUDA_ASSERT(cudaMemset(out_dev.get(), 0xff, out_dev.bytes()));
      const absl::Status planned = Plan(**ws, kv, lens, stream);
      ASSERT_TRUE(planned.ok()) << planned;
      CUDA_ASSERT(cudaGraphLaunch(exec, stream));
      CUDA_ASSERT(cudaStreamSynchronize(stream));
      std::vector<uint16_t> out_bits(q_bits.size());
      CUDA_ASSERT(
          cudaMemcpy(out_bits.data(), out_dev.get(), out_bits.size() * 2, cudaMemcpyDeviceToHost));
      ExpectMatchesReference(c, kv, lens, q, out_bits);
      if (lens.empty()) {
        // Nothing planned: the graph must leave the (poisoned) output alone.
        std::vector<uint16_t> all(q_elems);
        CUDA_ASSERT(cudaMemcpy(all.data(), out_dev.get(), all.size() * 2, cudaMemcpyDeviceToHost));
        EXPECT_EQ(all[0], 0xffff);
      }
    }
    CUDA_ASSERT(cudaGraphExecDestroy(exec));
    CUDA_ASSERT(cudaGraphDestroy(graph));
    CUDA_ASSERT(cudaStreamDestroy(stream));
  }
}

// SetDecodeTrace: every CTA of a traced launch writes its record (block, SM, start <= end,
// cycles at an SM clock) and the output still matches the reference; once off, launches leave the
// buffer alone.
TEST(DecodeAttentionTest, TraceRecordsEveryCtaOfALaunch) {
  SKIP_WITHOUT_GPU();
  DecodeTraceRecord dummy;
  EXPECT_EQ(SetDecodeTrace(&dummy, 0).code(), absl::StatusCode::kInvalidArgument);
#if !KVMEM_DECODE_TRACE
  // Not built in: asking for a trace says so, and turning it off is harmless.
  EXPECT_EQ(SetDecodeTrace(&dummy, 1).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(SetDecodeTrace(nullptr, 0).ok());
  GTEST_SKIP() << "the decode trace is not built in (configure with -DKVMEM_DECODE_TRACE=ON)";
#endif
  constexpr int kCapacity = 4096;
  const size_t bytes = kCapacity * sizeof(DecodeTraceRecord);
  DeviceBuffer buffer(bytes);
  ASSERT_NE(buffer.get(), nullptr);
  auto* records = static_cast<DecodeTraceRecord*>(buffer.get());
  std::vector<DecodeTraceRecord> host(kCapacity);

  Case c;
  c.kind = Kind::kPaged;
  c.page_tokens = 16;
  c.lens = {4000, 1, 2049, 0, 300};
  ASSERT_EQ(cudaMemset(buffer.get(), 0, bytes), cudaSuccess);
  ASSERT_TRUE(SetDecodeTrace(records, kCapacity).ok());
  const RunInfo info = RunCase(c);
  ASSERT_TRUE(SetDecodeTrace(nullptr, 0).ok());
  ASSERT_EQ(cudaMemcpy(host.data(), buffer.get(), bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  const int ctas = info.num_work * c.kv_heads;  // the grid of a launch without fixed_grid
  ASSERT_GT(ctas, 0);
  ASSERT_LE(ctas, kCapacity);
  for (int i = 0; i < kCapacity; ++i) {
    const DecodeTraceRecord& r = host[i];
    if (i >= ctas) {
      EXPECT_EQ(r.start_ns, 0u) << "block " << i << " is past the grid";
      continue;
    }
    EXPECT_EQ(r.block, static_cast<uint32_t>(i));
    EXPECT_GT(r.start_ns, 0u) << "block " << i;
    EXPECT_GE(r.end_ns, r.start_ns) << "block " << i;
    EXPECT_LT(r.smid, 1024u) << "block " << i;
    EXPECT_GT(r.start_clock, 0u) << "block " << i;
    EXPECT_GT(r.end_clock, r.start_clock) << "block " << i;  // it ran some cycles
    // Over a few microseconds the cycles per ns are an SM clock (Hopper: 0.3-2 GHz).
    if (r.end_ns > r.start_ns + 4000) {
      const double mhz = 1e3 * static_cast<double>(r.end_clock - r.start_clock) /
                         static_cast<double>(r.end_ns - r.start_ns);
      EXPECT_GT(mhz, 100.0) << "block " << i;
      EXPECT_LT(mhz, 5000.0) << "block " << i;
    }
  }

  ASSERT_EQ(cudaMemset(buffer.get(), 0, bytes), cudaSuccess);
  RunCase(c);  // trace off
  ASSERT_EQ(cudaMemcpy(host.data(), buffer.get(), bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  for (int i = 0; i < ctas; ++i) EXPECT_EQ(host[i].start_ns, 0u) << "block " << i;
}

TEST(DecodeAttentionTest, RejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  Case c;
  DecodeOptions o = OptionsFor(c, 4, 1024, false);

  DecodeOptions bad = o;
  bad.shape.num_q_heads = 17 * bad.shape.num_kv_heads;  // group 17
  EXPECT_EQ(DecodeWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.shape.head_dim = 96;
  EXPECT_EQ(DecodeWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.shape.kv_dtype = DType::kFloat32;
  EXPECT_EQ(DecodeWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.max_batch = 0;
  EXPECT_EQ(DecodeWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  for (int stages : {-1, 1, 4}) {  // head_dim 128 is built with 2 and 3
    bad = o;
    bad.pipeline_stages = stages;
    EXPECT_EQ(DecodeWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument)
        << stages;
  }
  bad = o;
  bad.shape.head_dim = 64;  // one depth, 4
  bad.pipeline_stages = 2;
  EXPECT_EQ(DecodeWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  for (int stages : {0, 2, 3}) {
    DecodeOptions good = o;
    good.pipeline_stages = stages;
    auto w = DecodeWorkspace::Create(good);
    ASSERT_TRUE(w.ok()) << w.status();
    if (stages != 0) EXPECT_EQ((*w)->pipeline_stages(), stages);
    EXPECT_TRUE((*w)->pipeline_stages() == 2 || (*w)->pipeline_stages() == 3);
  }

  auto ws = DecodeWorkspace::Create(o);
  ASSERT_TRUE(ws.ok()) << ws.status();
  const std::vector<int32_t> table(4 * 64, 0);
  const std::vector<int32_t> too_long = {1025};
  EXPECT_EQ((*ws)->PlanPaged(too_long, table, 64, nullptr).code(), absl::StatusCode::kOutOfRange);
  const std::vector<int32_t> five(5, 1);
  EXPECT_EQ((*ws)->PlanPaged(five, table, 64, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // over max_batch
  const std::vector<int32_t> negative_page(4 * 64, -1);
  const std::vector<int32_t> one = {1};
  EXPECT_EQ((*ws)->PlanPaged(one, negative_page, 64, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*ws)->PlanVirtual(one, one, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);  // paged workspace

  // A virtual view on a paged workspace, and a misaligned q.
  VirtualKv vkv;
  vkv.k = vkv.v = reinterpret_cast<void*>(256);
  vkv.token_stride = 256;
  vkv.row_stride = 256 * 1024;
  vkv.max_context = 1024;
  int32_t rows[1] = {0};
  vkv.row_ids = rows;
  EXPECT_EQ(DecodeAttention(**ws, vkv, vkv.k, vkv.k, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  PagedKv pkv = (*ws)->Bind(PagedKv{});
  pkv.k = pkv.v = reinterpret_cast<void*>(256);
  pkv.page_tokens = 16;
  pkv.token_stride = 256;
  pkv.page_stride = 16 * 256;
  EXPECT_EQ(DecodeAttention(**ws, pkv, reinterpret_cast<void*>(258), pkv.k, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  pkv.page_tokens = 8;  // not the workspace's
  EXPECT_EQ(DecodeAttention(**ws, pkv, pkv.k, pkv.k, nullptr).code(),
            absl::StatusCode::kInvalidArgument);

  // Chunk fields a 16-byte copy cannot follow, on a virtual workspace.
  DecodeOptions vo = o;
  vo.layout = Layout::kVirtual;
  auto vws = DecodeWorkspace::Create(vo);
  ASSERT_TRUE(vws.ok()) << vws.status();
  VirtualKv chunked = (*vws)->Bind(vkv);
  chunked.chunk_shift = 4;
  chunked.chunk_gap = 3 * 16 * 256;
  chunked.row_stride = 64 * 4 * 16 * 256;
  // Valid: accepted (nothing planned, so nothing launches).
  EXPECT_TRUE(DecodeAttention(**vws, chunked, chunked.k, chunked.k, nullptr).ok());
  for (auto [shift, gap] : {std::pair{4, int64_t{4}}, std::pair{-1, int64_t{0}},
                            std::pair{31, int64_t{0}}, std::pair{4, int64_t{-8}}}) {
    VirtualKv bad_view = chunked;
    bad_view.chunk_shift = shift;
    bad_view.chunk_gap = gap;
    EXPECT_EQ(DecodeAttention(**vws, bad_view, bad_view.k, bad_view.k, nullptr).code(),
              absl::StatusCode::kInvalidArgument)
        << shift << " " << gap;
  }
}

}  // namespace
}  // namespace kvmem
