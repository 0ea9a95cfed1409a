// kvstress's scheduler on tiny hand-checked traces, every policy, with the cache's
// invariants checked after every step: the exact counts (admissions, preemptions,
// finished, steps, peak running) and held bytes at chosen steps, derived by hand below.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "tools/kvstress/policies.h"
#include "tools/kvstress/scheduler.h"
#include "tools/kvstress/trace.h"
#include "tools/kvstress/workload.h"

namespace kvstress {
namespace {

constexpr int64_t kKiB = 1024;

// 1 layer x 1 KV head x head_dim 256 x fp32: a token is 1 KiB per layer for K and for V,
// 2 KiB in all. Host pages of 4 KiB. max_context 128. Budget 512 KiB = 256 tokens:
//   paged: 2 pools (K, V) x 64 granules of 4 KiB = 256 tokens, so
//     static (page_tokens = max_context = 128): 2 pages; paged-1: 256 pages;
//     paged-16: 16 pages (32 KiB each); paged-64: 4 pages (128 KiB each);
//   virtual all-layer: 128 handles of 4 KiB, 2 tokens each (a 2-token page);
//   virtual per-layer: K and V pages of 4 KiB hold 4 tokens each, so a 4-token unit
//     costs 2 handles (8 KiB): 64 units.
kvmem::KvCacheConfig TinyConfig() {
  kvmem::KvCacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = 1;
  c.head_dim = 256;
  c.dtype = kvmem::DType::kFloat32;
  c.max_context = 128;
  c.max_requests = 4;
  c.memory_budget_bytes = 512 * kKiB;
  c.host_granularity = 4 * kKiB;
  return c;
}

Policy Named(const std::string& name) {
  absl::StatusOr<std::vector<Policy>> p = ParsePolicies(name);
  EXPECT_TRUE(p.ok()) << p.status();
  return p->front();
}

SimResult MustSimulate(const Workload& w, const std::string& policy) {
  SimOptions opt;
  opt.check_invariants_every = 1;
  const Policy p = Named(policy);
  absl::StatusOr<SimResult> r = Simulate(w, p, PolicyConfig(p, TinyConfig()), opt);
  EXPECT_TRUE(r.ok()) << policy << ": " << r.status();
  return r.ok() ? *std::move(r) : SimResult{};
}

struct Expected {
  std::string policy;
  int64_t steps, admissions, preemptions, recomputed, peak_running;
  // held bytes after step `at[i]` is `held[i]`.
  std::vector<int64_t> at, held;
};

// A: arrives 0, prompt 100, output 4 (finishes at 104 tokens)
// B: arrives 0, prompt  60, output 8 (68)
// C: arrives 1, prompt  90, output 3 (93)
// D: arrives 2, prompt  20, output 2 (22)
// A step: decode (+1 each, oldest first; preempt the newest on failure; finish at the
// target), then admission FIFO unless the step preempted. Lengths after each step:
//
// paged-1 (256 one-token pages; held = tokens x 2 KiB):
//   s0 admit A 100, B 60                              = 160, running 2
//   s1 A 101 B 61; admit C 90                         = 252, running 3  -> held 504 KiB
//   s2 A 102 B 62 C 91 = 255; D (20) does not fit
//   s3 A 103 = 256, B needs 257: preempt C (91) -> B 63 = 166, no admission  -> 332 KiB
//   s4 A 104 finishes; B 64; admit C 91 (90 + 1 generated), D 20 = 175, running 3
//   s5 B 65 C 92 D 21; s6 B 66, C 93 and D 22 finish; s7 B 67; s8 B 68 finishes.
//   => 9 steps, 5 admissions, 1 preemption, peak 3.
// paged-16 (16 pages; pages = ceil(len / 16), 32 KiB each):
//   s0 A 7 + B 4 = 11 pages (352 KiB); s1-s3 C needs 6 more: 17 > 16, waits (D behind it)
//   s4 A finishes; B 64 = 4 pages; admit C 6, D 2 = 12; s5 B 65 -> 5 pages = 13 (416 KiB)
//   s6 D finishes; s7 C finishes; s8 B finishes.  => 9 steps, 4 admissions, 0, peak 3.
// paged-64 (4 pages of 128 KiB):
//   s0 A 2 + B 1 = 3 pages (384 KiB); s1-s3 C needs 2: waits
//   s4 A finishes; B 64 still 1 page; admit C 2, D 1 = 4 pages
//   s5 B 65 needs a 2nd page: preempt D -> B 2 + C 2 = 4 pages (512 KiB), no admission
//   s6 D does not fit; s7 C finishes, admit D; s8 B finishes; s9 D finishes.
//   => 10 steps, 5 admissions, 1 preemption, peak 3.
// static (2 reservations of 128 tokens, 256 KiB each):
//   s0 A, B (512 KiB); s4 A finishes, admit C (D waits); s7 C finishes, admit D;
//   s8 B finishes (256 KiB); s9 D finishes.  => 10 steps, 4 admissions, 0, peak 2.
// virtual (128 two-token pages, 4 KiB each; pages = ceil(len / 2)):
//   s0 A 50 + B 30 = 80 pages (320 KiB); s1 A 51 B 31, admit C 45 = 127 (508 KiB)
//   s2 A 51 B 31 C 46 = 128; D (10) does not fit
//   s3 A 103 needs page 52: preempt C -> A 52 B 32; s4 A finishes, admit C 46, D 10
//   s5..s8 as paged-1.  => 9 steps, 5 admissions, 1 preemption, peak 3.
//   (Held bytes after the first Free depend on which idle row a request reuses, so
//   they are checked only before it.)
// virtual-layer (64 four-token units, 8 KiB each; units = ceil(len / 4)):
//   s0 A 25 + B 15 = 40 units (320 KiB); s1 A 26 B 16 = 42 (336 KiB), C needs 23: 65 > 64
//   s2, s3 C waits; s4 A finishes, admit C 23, D 5; s6 D, s7 C, s8 B finish.
//   => 9 steps, 4 admissions, 0 preemptions, peak 3.
TEST(KvstressSchedulerTest, HandCheckedTraceEveryPolicy) {
  absl::StatusOr<Workload> w = ParseTrace(
      "arrival_step,prompt_len,output_len\n0,100,4\n0,60,8\n1,90,3\n2,20,2\n", "tiny", 128, 0);
  ASSERT_TRUE(w.ok()) << w.status();
  const std::vector<Expected> expected = {
      // C is preempted with 1 generated token, D with none.
      {"paged-1", 9, 5, 1, 1, 3, {1, 3}, {504 * kKiB, 332 * kKiB}},
      {"paged-16", 9, 4, 0, 0, 3, {0, 5}, {352 * kKiB, 416 * kKiB}},
      {"paged-64", 10, 5, 1, 0, 3, {0, 5}, {384 * kKiB, 512 * kKiB}},
      {"static", 10, 4, 0, 0, 2, {0, 8}, {512 * kKiB, 256 * kKiB}},
      {"virtual", 9, 5, 1, 1, 3, {0, 1}, {320 * kKiB, 508 * kKiB}},
      {"virtual-layer", 9, 4, 0, 0, 3, {0, 1}, {320 * kKiB, 336 * kKiB}},
  };
  for (const Expected& e : expected) {
    SCOPED_TRACE(e.policy);
    const SimResult r = MustSimulate(*w, e.policy);
    EXPECT_TRUE(r.drained);
    EXPECT_EQ(r.steps, e.steps);
    EXPECT_EQ(r.finished, 4);
    EXPECT_EQ(r.admissions, e.admissions);
    EXPECT_EQ(r.preemptions, e.preemptions);
    EXPECT_EQ(r.peak_running, e.peak_running);
    EXPECT_EQ(r.output_tokens, 4 + 8 + 3 + 2);
    // A preempted request recomputes its prompt and the tokens it had generated.
    EXPECT_EQ(r.recomputed_tokens, e.recomputed);
    ASSERT_EQ(r.series.size(), static_cast<size_t>(e.steps));
    for (size_t i = 0; i < e.at.size(); ++i) {
      EXPECT_EQ(r.series[e.at[i]].held_bytes, e.held[i]) << "after step " << e.at[i];
    }
    // Step 0 holds A and B whole: 160 live tokens whatever the layout.
    EXPECT_EQ(r.series[0].live_bytes, 160 * 2 * kKiB);
    EXPECT_EQ(r.series.back().held_bytes, 0);
    EXPECT_EQ(r.final_stats.num_requests, 0);
    // Every scheduled call was counted and timed.
    EXPECT_GE(r.kvmem_calls, 2 * r.admissions + r.output_tokens + r.finished);
  }
}

// Two requests of one prefix group (prefix 32 tokens), prompt 40 each, outputs 2 and 3.
// Sharing policies prefill a holder of 32 tokens once and Fork both requests from it:
//   paged-16: holder 2 full pages, each request 1 page of its own = 4 pages (128 KiB)
//     after steps 0 and 1; live = 32 + 8 + 8 = 48 tokens (96 KiB). s2 the first request
//     finishes (3 pages, 96 KiB); s3 the second, and with it the holder (0).
//   virtual: holder 16 two-token pages, aliased under both rows, + 4 + 4 = 24 pages
//     (96 KiB) after step 0.
//   static cannot share: 2 reservations (512 KiB), live 80 tokens (160 KiB).
TEST(KvstressSchedulerTest, SharedPrefixForksFromOneHolder) {
  absl::StatusOr<Workload> w = ParseTrace(
      "arrival_step,prompt_len,output_len,prefix_group\n0,40,2,0\n0,40,3,0\n", "shared", 128, 32);
  ASSERT_TRUE(w.ok()) << w.status();

  const SimResult paged = MustSimulate(*w, "paged-16");
  EXPECT_EQ(paged.holders_created, 1);
  EXPECT_EQ(paged.prefix_forks, 2);
  EXPECT_EQ(paged.steps, 4);
  EXPECT_EQ(paged.prefill_tokens, 32 + 8 + 8);
  ASSERT_EQ(paged.series.size(), 4u);
  EXPECT_EQ(paged.series[0].held_bytes, 128 * kKiB);
  EXPECT_EQ(paged.series[0].live_bytes, 96 * kKiB);
  EXPECT_EQ(paged.series[1].held_bytes, 128 * kKiB);
  EXPECT_EQ(paged.series[2].held_bytes, 96 * kKiB);
  EXPECT_EQ(paged.series[3].held_bytes, 0);
  EXPECT_EQ(paged.final_stats.num_requests, 0);  // the holder went with the last member

  const SimResult virt = MustSimulate(*w, "virtual");
  EXPECT_EQ(virt.prefix_forks, 2);
  EXPECT_EQ(virt.series[0].held_bytes, 96 * kKiB);
  EXPECT_EQ(virt.series[0].live_bytes, 96 * kKiB);
  EXPECT_EQ(virt.final_stats.num_requests, 0);

  const SimResult fixed = MustSimulate(*w, "static");
  EXPECT_EQ(fixed.prefix_forks, 0);
  EXPECT_EQ(fixed.prefill_tokens, 80);
  EXPECT_EQ(fixed.series[0].held_bytes, 512 * kKiB);
  EXPECT_EQ(fixed.series[0].live_bytes, 160 * kKiB);
}

// A budget that cannot hold one request at max_context is an error naming the policy.
TEST(KvstressSchedulerTest, ImpossibleBudgetIsAnError) {
  kvmem::KvCacheConfig c = TinyConfig();
  c.max_context = 512;  // more than the 256 tokens the budget holds
  Workload w;
  w.name = "big";
  w.requests.push_back({0, 300, 10, -1});
  const Policy p = Named("paged-16");
  absl::StatusOr<SimResult> r = Simulate(w, p, PolicyConfig(p, c), SimOptions{});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("policy paged-16: cannot create the cache"),
            std::string::npos)
      << r.status();
}

// --steps stops the run early and says so.
TEST(KvstressSchedulerTest, MaxStepsStopsUndrained) {
  absl::StatusOr<Workload> w =
      ParseTrace("arrival_step,prompt_len,output_len\n0,10,50\n", "one", 128, 0);
  ASSERT_TRUE(w.ok());
  SimOptions opt;
  opt.max_steps = 5;
  const Policy p = Named("paged-16");
  absl::StatusOr<SimResult> r = Simulate(*w, p, PolicyConfig(p, TinyConfig()), opt);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->drained);
  EXPECT_EQ(r->steps, 5);
  EXPECT_EQ(r->finished, 0);
  EXPECT_EQ(r->output_tokens, 4);  // admitted at step 0, grew in steps 1-4
}

}  // namespace
}  // namespace kvstress
