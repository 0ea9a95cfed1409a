// GPU tests of ExtendAttention (kvmem/extend_attention.h) against the CPU reference
// (ReferenceExtend): paged pages of 1, 3, 8, 16, 48, 64 and 256 tokens, virtual all-layer and
// per-layer arrangements, head_dim 64/128/256, bf16 and fp16, GQA groups 1..64, prefixes
// 0, 1, page boundaries and long, new-token counts 1 to 8192, mixed batches (with
// requests of no new tokens), sliding windows, and one CUDA graph replayed over changed
// lengths and page tables.
//
// Memory no request owns is NaN, outputs are poisoned (NaN) before every launch (rows
// past the batch too, which must stay untouched), and inputs are fresh random values, so
// a stray read or an unwritten output fails. KVMEM_TEST_SMALL=1 skips the long cases
// (for compute-sanitizer runs). Skips, saying so, where no GPU is present.
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
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/types/span.h"
#include "gtest/gtest.h"
#include "kvmem/dtype.h"
#include "kvmem/extend_attention.h"
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

// One request of a batch: cached tokens and new tokens.
struct Req {
  int32_t prefix;
  int32_t fresh;
};

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
  ExtendKernel kernel = ExtendKernel::kAuto;
  int max_ctas = 0;
  std::vector<Req> reqs;

  std::string Name() const {
    return absl::StrCat(kernel == ExtendKernel::kMmaSync ? "[mma.sync] " : "", KindName(kind),
                        kind == Kind::kPaged ? absl::StrCat(" page ", page_tokens) : std::string(),
                        " ", std::string(DTypeName(dtype)), " D", head_dim, " H", kv_heads, " G",
                        group, " window ", window, " batch ", reqs.size(),
                        max_ctas > 0 ? absl::StrCat(" max_ctas ", max_ctas) : std::string());
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

std::vector<int32_t> Prefixes(absl::Span<const Req> reqs) {
  std::vector<int32_t> v;
  for (const Req& r : reqs) v.push_back(r.prefix);
  return v;
}
std::vector<int32_t> News(absl::Span<const Req> reqs) {
  std::vector<int32_t> v;
  for (const Req& r : reqs) v.push_back(r.fresh);
  return v;
}
int64_t TotalNew(absl::Span<const Req> reqs) {
  int64_t n = 0;
  for (const Req& r : reqs) n += r.fresh;
  return n;
}

// Allowed ||out - ref|| / ||ref|| per request. The kernel rounds the softmax weights P to
// the storage type for the tensor-core P V product, and the output to the storage type;
// the reference does neither (fp32 throughout). Unit roundoff u is 2^-8 = 3.9e-3 (bf16)
// and 2^-11 = 4.9e-4 (fp16); a rounding's relative error is at most u and about u / 3
// in RMS, so output rounding gives ~1.3e-3 / 1.6e-4 in norm, and the (independent,
// averaged over keys) P rounding adds less. The bounds leave about 3x margin over that
// and stay far below what a wrong index, a missed or an extra key gives (1e-1 and more:
// keys are N(0, 1), so attention outputs differ at O(1) per element).
double Tolerance(DType t) { return t == DType::kBFloat16 ? 6e-3 : 1.5e-3; }

// Page-table rows wider than needed.
using TestKv = gpu_test::TestKv<Case>;
constexpr int64_t kExtraTableColumns = 2;

ExtendOptions OptionsFor(const Case& c, int max_batch, int64_t max_new, int64_t max_context,
                         bool fixed_grid) {
  ExtendOptions o;
  o.shape = c.Shape();
  o.layout = c.kind == Kind::kPaged ? Layout::kPaged : Layout::kVirtual;
  o.max_batch = max_batch;
  o.max_new_tokens = max_new;
  o.max_context = max_context;
  o.page_tokens = c.page_tokens;
  o.fixed_grid = fixed_grid;
  o.kernel = c.kernel;
  o.max_ctas = c.max_ctas;
  return o;
}

absl::Status Plan(ExtendWorkspace& ws, const TestKv& kv, absl::Span<const Req> reqs,
                  cudaStream_t stream) {
  const std::vector<int32_t> prefix = Prefixes(reqs);
  const std::vector<int32_t> fresh = News(reqs);
  if (ws.options().layout == Layout::kPaged) {
    return ws.PlanPaged(prefix, fresh, kv.page_table(), kv.page_table_stride(), stream);
  }
  return ws.PlanVirtual(prefix, fresh, kv.row_ids(), stream);
}

absl::Status Launch(const ExtendWorkspace& ws, const TestKv& kv, const void* q, void* out,
                    cudaStream_t stream) {
  if (ws.options().layout == Layout::kPaged) {
    return ExtendAttention(ws, ws.Bind(kv.DevicePaged()), q, out, stream);
  }
  return ExtendAttention(ws, ws.Bind(kv.DeviceVirtual()), q, out, stream);
}

// ReferenceExtend of the whole batch, split into chunks of queries run on all host
// cores (the reference is scalar; 8192 new tokens would take minutes on one core). A
// chunk [i0, i1) of request b is the extend of i1 - i0 tokens on a prefix of
// prefix + i0: the same semantics, query by query.
std::vector<float> Reference(const Case& c, const TestKv& kv, absl::Span<const Req> reqs,
                             const std::vector<float>& q) {
  const int64_t row = int64_t{c.kv_heads} * c.group * c.head_dim;
  std::vector<float> ref(TotalNew(reqs) * row);
  struct Chunk {
    int32_t b;
    int32_t prefix;
    int32_t n;
    int64_t q_row;
  };
  std::vector<Chunk> chunks;
  int64_t q_row = 0;
  constexpr int32_t kChunk = 256;
  for (size_t b = 0; b < reqs.size(); ++b) {
    for (int32_t i = 0; i < reqs[b].fresh; i += kChunk) {
      chunks.push_back({static_cast<int32_t>(b), reqs[b].prefix + i,
                        std::min(kChunk, reqs[b].fresh - i), q_row + i});
    }
    q_row += reqs[b].fresh;
  }
  const unsigned threads = std::max(1u, std::min(32u, std::thread::hardware_concurrency()));
  std::vector<absl::Status> status(threads);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (size_t i = t; i < chunks.size(); i += threads) {
        const Chunk& ch = chunks[i];
        const int32_t prefix[1] = {ch.prefix};
        const int32_t fresh[1] = {ch.n};
        const float* qp = q.data() + ch.q_row * row;
        float* rp = ref.data() + ch.q_row * row;
        const absl::Status st =
            c.kind == Kind::kPaged
                ? ReferenceExtend(c.Shape(), kv.HostPaged(ch.b), prefix, fresh, qp, rp)
                : ReferenceExtend(c.Shape(), kv.HostVirtual(ch.b), prefix, fresh, qp, rp);
        status[t].Update(st);
      }
    });
  }
  for (std::thread& th : pool) th.join();
  for (const absl::Status& st : status) EXPECT_TRUE(st.ok()) << st;
  return ref;
}

// Compares the device output with the reference request by request; rows past the
// batch (out_bits is longer) must still hold the poison.
void ExpectMatchesReference(const Case& c, const TestKv& kv, absl::Span<const Req> reqs,
                            const std::vector<float>& q, const std::vector<uint16_t>& out_bits) {
  const int64_t row = int64_t{c.kv_heads} * c.group * c.head_dim;
  const std::vector<float> ref = Reference(c, kv, reqs, q);
  double worst = 0.0;
  int64_t q_row = 0;
  for (size_t b = 0; b < reqs.size(); ++b) {
    const auto [err2, ref2, bad] = gpu_test::CompareToReference(c.dtype, out_bits, ref, q_row * row,
                                                                (q_row + reqs[b].fresh) * row);
    q_row += reqs[b].fresh;
    ASSERT_EQ(bad, 0) << "request " << b << " (prefix " << reqs[b].prefix << ", new "
                      << reqs[b].fresh << "): " << bad
                      << " outputs not finite (unwritten or NaN read)";
    if (reqs[b].fresh == 0) continue;
    ASSERT_GT(ref2, 0.0);
    const double rel = std::sqrt(err2 / ref2);
    worst = std::max(worst, rel);
    EXPECT_LE(rel, Tolerance(c.dtype))
        << "request " << b << " (prefix " << reqs[b].prefix << ", new " << reqs[b].fresh << ")";
  }
  int64_t touched = 0;
  for (size_t i = q_row * row; i < out_bits.size(); ++i) touched += out_bits[i] != 0xffff;
  EXPECT_EQ(touched, 0) << "elements written past the batch's " << q_row << " rows";
  ::testing::Test::RecordProperty("worst_rel_error", absl::StrCat(worst));
}

// Extra poisoned rows after the batch's outputs: none may be written.
constexpr int64_t kGuardRows = 3;

// One case end to end with c.kernel: storage, plan, launch, compare. Returns the
// workspace's work-item count; *wgmma tells whether the Hopper kernel ran.
int RunOne(const Case& c, bool* wgmma) {
  SCOPED_TRACE(c.Name());
  std::mt19937_64 rng(std::hash<std::string>{}(c.Name()) ^ c.reqs.size());
  const int batch = static_cast<int>(c.reqs.size());
  std::vector<int32_t> lens;
  int64_t max_len = 1;
  int64_t total = 0;
  for (const Req& r : c.reqs) {
    lens.push_back(r.prefix + r.fresh);
    max_len = std::max<int64_t>(max_len, r.prefix + r.fresh);
    total += r.prefix + r.fresh;
  }
  const int64_t max_context = max_len + 5;
  const int64_t total_new = TotalNew(c.reqs);
  TestKv kv(c, batch, max_context, total, kExtraTableColumns);
  EXPECT_TRUE(kv.ok()) << "device allocation failed";
  if (!kv.ok()) return 0;
  kv.Fill(lens, rng);

  std::vector<float> q;
  std::vector<uint16_t> q_bits;
  RandomQ(c, total_new, rng, &q, &q_bits);
  const int64_t row = int64_t{c.kv_heads} * c.group * c.head_dim;
  const size_t out_elems = (total_new + kGuardRows) * row;
  DeviceBuffer q_dev(q_bits.size() * 2);
  DeviceBuffer out_dev(out_elems * 2);
  EXPECT_EQ(cudaMemcpy(q_dev.get(), q_bits.data(), q_bits.size() * 2, cudaMemcpyHostToDevice),
            cudaSuccess);
  EXPECT_EQ(cudaMemset(out_dev.get(), 0xff, out_dev.bytes()), cudaSuccess);  // NaN poison

  auto ws = ExtendWorkspace::Create(
      OptionsFor(c, batch, std::max<int64_t>(total_new, 1), max_context, false));
  EXPECT_TRUE(ws.ok()) << ws.status();
  if (!ws.ok()) return 0;
  *wgmma = (*ws)->uses_wgmma();
  const absl::Status planned = Plan(**ws, kv, c.reqs, nullptr);
  EXPECT_TRUE(planned.ok()) << planned;
  const absl::Status launched = Launch(**ws, kv, q_dev.get(), out_dev.get(), nullptr);
  EXPECT_TRUE(launched.ok()) << launched;
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);

  std::vector<uint16_t> out_bits(out_elems);
  EXPECT_EQ(cudaMemcpy(out_bits.data(), out_dev.get(), out_elems * 2, cudaMemcpyDeviceToHost),
            cudaSuccess);
  ExpectMatchesReference(c, kv, c.reqs, q, out_bits);
  return (*ws)->num_work();
}

// RunOne with the kernel kAuto picks and, where that is the Hopper kernel, again with
// the portable one, so both kernels meet every case on an H100.
int RunCase(const Case& c) {
  bool wgmma = false;
  const int work = RunOne(c, &wgmma);
  if (wgmma) {
    Case portable = c;
    portable.kernel = ExtendKernel::kMmaSync;
    bool unused = false;
    EXPECT_EQ(RunOne(portable, &unused), work) << "both kernels run one plan";
  }
  return work;
}

// Prefixes 0, 1, at and around page boundaries and long; new-token counts around the
// CTA tile (32 tokens at group 4) and KV tile (64) boundaries.
std::vector<Req> BoundaryReqs(int page) {
  std::vector<Req> reqs = {{0, 1},     {1, 1},  {0, 2},  {0, 31},  {1, 32},    {0, 33},
                           {2, 63},    {0, 64}, {5, 65}, {0, 129}, {300, 300}, {1000, 17},
                           {2049, 70}, {0, 0},  {3, 0},  {64, 1},  {127, 129}, {4000, 3}};
  for (int m : {1, 2, 3}) {
    for (int d : {-1, 0, 1}) {
      const int prefix = m * page + d;
      if (prefix >= 0) reqs.push_back({prefix, 1 + (m * 37 + d) % 50});
    }
  }
  reqs.push_back({page, page + 1});
  return reqs;
}

// On the Hopper kernel, pages 1 and 3 go by cp.async only; 8, 16, 64 and 256 by TMA
// boxes of 8, 16, 64 and 128 tokens; 48 by boxes of 16 in pages that straddle tiles.
TEST(ExtendAttentionTest, PagedPageSizes) {
  SKIP_WITHOUT_GPU();
  for (int page : {1, 3, 8, 16, 48, 64, 256}) {
    Case c;
    c.kind = Kind::kPaged;
    c.page_tokens = page;
    c.reqs = BoundaryReqs(page);
    RunCase(c);
  }
}

TEST(ExtendAttentionTest, VirtualArrangements) {
  SKIP_WITHOUT_GPU();
  for (Kind kind : {Kind::kVirtualAllLayers, Kind::kVirtualPerLayer}) {
    Case c;
    c.kind = kind;
    c.reqs = BoundaryReqs(16);
    RunCase(c);
  }
  // Chunks of one token (shift 0 with a gap: whole-tile boxes at the gapped stride), below
  // a TMA box (cp.async only), of 16 and 64 tokens (boxes of one chunk), and of 512
  // (128-token boxes inside a chunk).
  for (int chunk : {1, 4, 16, 64, 512}) {
    Case c;
    c.kind = Kind::kVirtualChunked;
    c.page_tokens = chunk;
    c.reqs = BoundaryReqs(chunk);
    RunCase(c);
  }
}

TEST(ExtendAttentionTest, HeadDimsAndDtypes) {
  SKIP_WITHOUT_GPU();
  for (int d : {64, 128, 256}) {
    for (DType t : {DType::kBFloat16, DType::kFloat16}) {
      for (Kind kind : {Kind::kPaged, Kind::kVirtualAllLayers, Kind::kVirtualChunked}) {
        Case c;
        c.kind = kind;
        c.page_tokens = 16;
        c.dtype = t;
        c.head_dim = d;
        c.reqs = {{0, 1}, {5, 33}, {64, 64}, {0, 200}, {700, 130}, {31, 1}};
        RunCase(c);
      }
    }
  }
}

TEST(ExtendAttentionTest, GroupSizes) {
  SKIP_WITHOUT_GPU();
  // (kv_heads, group, head_dim): every group up to 8, odd ones (28 / 4 = 7, 12), groups
  // that fill or nearly fill a CTA (32 and 64 rows of 128; 64 of 64 at head_dim 256).
  const std::vector<std::tuple<int, int, int>> heads = {
      {2, 1, 128}, {2, 2, 128},  {2, 3, 128},  {2, 5, 128},  {2, 6, 128},  {2, 8, 128}, {4, 7, 128},
      {1, 16, 64}, {3, 12, 128}, {1, 32, 128}, {1, 64, 128}, {1, 64, 256}, {2, 3, 256}};
  for (auto [h, g, d] : heads) {
    Case c;
    c.kv_heads = h;
    c.group = g;
    c.head_dim = d;
    c.page_tokens = 16;
    c.reqs = {{0, 1}, {17, 40}, {100, 3}, {0, 150}, {333, 77}};
    RunCase(c);
  }
}

TEST(ExtendAttentionTest, SlidingWindowAndScale) {
  SKIP_WITHOUT_GPU();
  for (int window : {0, 1, 70, 1000}) {
    for (Kind kind : {Kind::kPaged, Kind::kVirtualPerLayer, Kind::kVirtualChunked}) {
      Case c;
      c.kind = kind;
      c.page_tokens = kind == Kind::kVirtualChunked ? 256 : 3;
      c.window = window;
      c.scale = 0.2f;
      c.q_std = 3.f;  // peaked softmax: exercises the running max
      c.reqs = {{0, 1}, {0, 100}, {70, 2}, {999, 5}, {1000, 300}, {3, 1200}, {2000, 64}};
      RunCase(c);
    }
  }
}

// Batches where some or all requests bring no new tokens: nothing of theirs is read or
// written, and an empty plan launches nothing.
TEST(ExtendAttentionTest, RequestsWithoutNewTokens) {
  SKIP_WITHOUT_GPU();
  for (Kind kind : {Kind::kPaged, Kind::kVirtualAllLayers}) {
    Case c;
    c.kind = kind;
    c.reqs = {{10, 0}, {0, 5}, {100, 0}, {7, 9}, {0, 0}};
    EXPECT_GT(RunCase(c), 0);
    c.reqs = {{10, 0}, {0, 0}};
    EXPECT_EQ(RunCase(c), 0);
  }
}

// The Hopper kernel's persistent CTAs: capped at 1, 2 or 5, each CTA runs many query
// tiles of different requests in turn, so the K/V ring's phases (2 stages at head_dim
// 128, 3 at 64), the two Q buffers and the consumers' turns carry over from tile to tile,
// through cp.async-only ranges (page 3), TMA ones (page 16, virtual) and windows. On
// other devices the cap is ignored and the same cases run on the mma.sync kernel.
TEST(ExtendAttentionTest, PersistentCtasRunManyTiles) {
  SKIP_WITHOUT_GPU();
  const std::vector<std::pair<Kind, int>> layouts = {{Kind::kPaged, 3},
                                                     {Kind::kPaged, 16},
                                                     {Kind::kVirtualAllLayers, 16},
                                                     {Kind::kVirtualChunked, 32}};
  for (int max_ctas : {1, 2, 5}) {
    for (int d : {64, 128}) {
      for (auto [kind, page] : layouts) {
        Case c;
        c.kind = kind;
        c.page_tokens = page;
        c.head_dim = d;
        c.max_ctas = max_ctas;
        c.window = max_ctas == 2 ? 100 : -1;
        c.reqs = {{0, 1}, {5, 300}, {700, 130}, {0, 64}, {31, 1}, {129, 77}};
        RunCase(c);
      }
    }
  }
}

TEST(ExtendAttentionTest, LongPrefillAndExtend) {
  SKIP_WITHOUT_GPU();
  if (SmallRun()) GTEST_SKIP() << "KVMEM_TEST_SMALL: long cases skipped";
  {
    Case c;  // one 8192-token prefill
    c.kind = Kind::kPaged;
    c.kv_heads = 1;
    c.group = 2;
    c.reqs = {{0, 8192}};
    RunCase(c);
  }
  for (Kind kind : {Kind::kVirtualAllLayers, Kind::kVirtualChunked}) {
    Case c;  // P1's extend shape, and a mixed chunked-prefill batch
    c.kind = kind;
    c.page_tokens = 512;
    c.kv_heads = 1;
    c.group = 4;
    c.reqs = {{4096, 512}, {0, 3000}, {5000, 1}, {1, 4095}};
    RunCase(c);
  }
  {
    Case c;  // long prefix with a window, page 256
    c.kind = Kind::kPaged;
    c.page_tokens = 256;
    c.kv_heads = 1;
    c.group = 8;
    c.window = 2047;
    c.reqs = {{6000, 2500}, {0, 1}};
    RunCase(c);
  }
}

// A step captured once (fixed_grid) replays over new lengths, batch sizes, page tables
// and row ids, and K/V contents.
TEST(ExtendAttentionTest, GraphReplayWithNewLengthsAndTables) {
  SKIP_WITHOUT_GPU();
  const std::vector<std::vector<Req>> steps = {{{0, 300}, {17, 5}},
                                               {{100, 1}, {0, 64}, {5, 0}, {2000, 200}, {1, 1}},
                                               {{1500, 512}},
                                               std::vector<Req>(12, Req{40, 40}),
                                               {}};
  for (auto [kind, kernel] : {std::pair{Kind::kPaged, ExtendKernel::kAuto},
                              std::pair{Kind::kVirtualAllLayers, ExtendKernel::kAuto},
                              std::pair{Kind::kVirtualChunked, ExtendKernel::kAuto},
                              std::pair{Kind::kPaged, ExtendKernel::kMmaSync}}) {
    Case c;
    c.kind = kind;
    c.kernel = kernel;
    c.page_tokens = 16;
    const int max_batch = 12;
    const int64_t max_new = 512;
    const int64_t max_context = 2300;
    SCOPED_TRACE(c.Name());
    std::mt19937_64 rng(11);
    TestKv kv(c, max_batch, max_context, 6000, kExtraTableColumns);
    ASSERT_TRUE(kv.ok());
    const int64_t row = int64_t{c.kv_heads} * c.group * c.head_dim;
    const int64_t out_elems = (max_new + kGuardRows) * row;
    DeviceBuffer q_dev(max_new * row * 2);
    DeviceBuffer out_dev(out_elems * 2);
    auto ws = ExtendWorkspace::Create(OptionsFor(c, max_batch, max_new, max_context, true));
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
      const std::vector<Req>& reqs = steps[s];
      std::vector<int32_t> lens;
      for (const Req& r : reqs) lens.push_back(r.prefix + r.fresh);
      kv.Fill(lens, rng);
      std::vector<float> q;
      std::vector<uint16_t> q_bits;
      RandomQ(c, TotalNew(reqs), rng, &q, &q_bits);
      CUDA_ASSERT(
          cudaMemcpy(q_dev.get(), q_bits.data(), q_bits.size() * 2, cudaMemcpyHostToDevice));
      CUDA_ASSERT(cudaMemset(out_dev.get(), 0xff, out_dev.bytes()));
      const absl::Status planned = Plan(**ws, kv, reqs, stream);
      ASSERT_TRUE(planned.ok()) << planned;
      CUDA_ASSERT(cudaGraphLaunch(exec, stream));
      CUDA_ASSERT(cudaStreamSynchronize(stream));
      std::vector<uint16_t> out_bits(out_elems);
      CUDA_ASSERT(
          cudaMemcpy(out_bits.data(), out_dev.get(), out_elems * 2, cudaMemcpyDeviceToHost));
      ExpectMatchesReference(c, kv, reqs, q, out_bits);
    }
    CUDA_ASSERT(cudaGraphExecDestroy(exec));
    CUDA_ASSERT(cudaGraphDestroy(graph));
    CUDA_ASSERT(cudaStreamDestroy(stream));
  }
}

// On an H100 / H200 an sm_90a build (the default) runs head_dim 64 and 128 on the wgmma
// kernel; head_dim 256 has only the portable one, and asking for wgmma there fails.
TEST(ExtendAttentionTest, KernelSelection) {
  SKIP_WITHOUT_GPU();
#if defined(KVMEM_HAS_SM90A)
  constexpr bool kBuilt = true;
#else
  constexpr bool kBuilt = false;
#endif
  int major = 0;
  int minor = 0;
  CUDA_ASSERT(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  CUDA_ASSERT(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
  Case c;
  for (int d : {64, 128, 256}) {
    c.head_dim = d;
    ExtendOptions o = OptionsFor(c, 2, 100, 100, false);
    auto ws = ExtendWorkspace::Create(o);
    ASSERT_TRUE(ws.ok()) << ws.status();
    const bool hopper = kBuilt && major == 9 && minor == 0 && d != 256;
    EXPECT_EQ((*ws)->uses_wgmma(), hopper) << "head_dim " << d;
    o.kernel = ExtendKernel::kMmaSync;
    auto portable = ExtendWorkspace::Create(o);
    ASSERT_TRUE(portable.ok()) << portable.status();
    EXPECT_FALSE((*portable)->uses_wgmma());
    o.kernel = ExtendKernel::kWgmma;
    if (hopper) {
      EXPECT_TRUE(ExtendWorkspace::Create(o).ok());
    } else {
      EXPECT_EQ(ExtendWorkspace::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
    }
  }
  {
    ExtendOptions o = OptionsFor(c, 2, 100, 100, false);
    o.kernel = static_cast<ExtendKernel>(7);
    EXPECT_EQ(ExtendWorkspace::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(ExtendAttentionTest, RejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  Case c;
  const ExtendOptions o = OptionsFor(c, 4, 1000, 1024, false);

  ExtendOptions bad = o;
  bad.shape.num_q_heads = 129 * bad.shape.num_kv_heads;  // group over a CTA's rows
  EXPECT_EQ(ExtendWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.shape.head_dim = 96;
  EXPECT_EQ(ExtendWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.shape.kv_dtype = DType::kFloat32;
  EXPECT_EQ(ExtendWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.max_new_tokens = 0;
  EXPECT_EQ(ExtendWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = o;
  bad.max_ctas = -1;
  EXPECT_EQ(ExtendWorkspace::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);

  auto ws = ExtendWorkspace::Create(o);
  ASSERT_TRUE(ws.ok()) << ws.status();
  const std::vector<int32_t> table(4 * 64, 0);
  const std::vector<int32_t> one = {1};
  const std::vector<int32_t> zero = {0};
  const std::vector<int32_t> big = {1000};
  const std::vector<int32_t> long_prefix = {100};
  EXPECT_EQ((*ws)->PlanPaged(long_prefix, {950}, table, 64, nullptr).code(),
            absl::StatusCode::kOutOfRange);  // 1050 > max_context
  const std::vector<int32_t> two_prefix = {0, 0};
  const std::vector<int32_t> two_new = {600, 600};
  EXPECT_EQ((*ws)->PlanPaged(two_prefix, two_new, table, 64, nullptr).code(),
            absl::StatusCode::kOutOfRange);  // 1200 > max_new_tokens
  const std::vector<int32_t> five(5, 1);
  EXPECT_EQ((*ws)->PlanPaged(five, five, table, 64, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // over max_batch
  EXPECT_EQ((*ws)->PlanPaged(two_prefix, one, table, 64, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // prefix_lens / new_lens sizes differ
  const std::vector<int32_t> negative_page(4 * 64, -1);
  EXPECT_EQ((*ws)->PlanPaged(zero, big, negative_page, 64, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*ws)->PlanPaged(zero, big, table, 8, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // 63 pages needed, stride 8
  EXPECT_EQ((*ws)->PlanVirtual(zero, one, one, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);  // paged workspace

  // A virtual view on a paged workspace, a misaligned q, a foreign page size.
  VirtualKv vkv;
  vkv.k = vkv.v = reinterpret_cast<void*>(256);
  vkv.token_stride = 256;
  vkv.row_stride = 256 * 1024;
  vkv.max_context = 1024;
  int32_t rows[1] = {0};
  vkv.row_ids = rows;
  EXPECT_EQ(ExtendAttention(**ws, vkv, vkv.k, vkv.k, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  PagedKv pkv = (*ws)->Bind(PagedKv{});
  pkv.k = pkv.v = reinterpret_cast<void*>(256);
  pkv.page_tokens = 16;
  pkv.token_stride = 256;
  pkv.page_stride = 16 * 256;
  EXPECT_EQ(ExtendAttention(**ws, pkv, reinterpret_cast<void*>(258), pkv.k, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  pkv.page_tokens = 8;
  EXPECT_EQ(ExtendAttention(**ws, pkv, pkv.k, pkv.k, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvmem
