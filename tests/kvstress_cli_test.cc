// kvstress's input handling: trace parsing (errors name the line), flag checking (errors
// name the flag), the check of the host's mapping limit, the pieces of the output, and
// the binary end to end: bad input exits non-zero with one clear message, a good tiny run
// writes its table, JSON and SVG.
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tools/kvstress/host_mappings.h"
#include "tools/kvstress/json_writer.h"
#include "tools/kvstress/options.h"
#include "tools/kvstress/policies.h"
#include "tools/kvstress/report.h"
#include "tools/kvstress/run.h"
#include "tools/kvstress/scheduler.h"
#include "tools/kvstress/svg_plot.h"
#include "tools/kvstress/trace.h"

namespace kvstress {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// ---- trace parsing ---------------------------------------------------------

std::string TraceError(const std::string& text, int64_t max_context = 100, int64_t prefix_len = 8) {
  absl::StatusOr<Workload> w = ParseTrace(text, "t.csv", max_context, prefix_len);
  EXPECT_FALSE(w.ok()) << "accepted:\n" << text;
  return w.ok() ? "" : std::string(w.status().message());
}

TEST(KvstressTraceTest, ParsesAndSortsByArrival) {
  absl::StatusOr<Workload> w = ParseTrace(
      "# comment\narrival_step,prompt_len,output_len,prefix_group\n\n5,20,3,1\n0,10,4,\n"
      "0,12,2,-1\n",
      "t.csv", 100, 8);
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_EQ(w->requests.size(), 3u);
  EXPECT_EQ(w->requests[0].prompt_len, 10);  // stable: file order within a step
  EXPECT_EQ(w->requests[0].prefix_group, -1);
  EXPECT_EQ(w->requests[1].prompt_len, 12);
  EXPECT_EQ(w->requests[2].arrival_step, 5);
  EXPECT_EQ(w->requests[2].prefix_group, 1);
  EXPECT_EQ(w->prefix_len, 8);
}

TEST(KvstressTraceTest, ErrorsNameTheLine) {
  EXPECT_THAT(TraceError(""), HasSubstr("empty trace"));
  EXPECT_THAT(TraceError("a,b,c\n"), HasSubstr("t.csv:1: expected the header"));
  const std::string h = "arrival_step,prompt_len,output_len\n";
  EXPECT_THAT(TraceError(h + "0,10,5\n1,x,5\n"), HasSubstr("t.csv:3: prompt_len 'x' is not"));
  EXPECT_THAT(TraceError(h + "0,10\n"), HasSubstr("t.csv:2: expected 3 comma-separated"));
  EXPECT_THAT(TraceError(h + "0,10,5,1\n"), HasSubstr("t.csv:2: expected 3"));
  EXPECT_THAT(TraceError(h + "-1,10,5\n"), HasSubstr("t.csv:2: arrival_step -1"));
  EXPECT_THAT(TraceError(h + "0,0,5\n"), HasSubstr("prompt_len 0 must be >= 1"));
  EXPECT_THAT(TraceError(h + "0,10,0\n"), HasSubstr("output_len 0 must be >= 1"));
  EXPECT_THAT(TraceError(h + "0,90,11\n"), HasSubstr("t.csv:2: prompt_len + output_len = 101"));
  EXPECT_THAT(TraceError(h + "0,99999999999999999999,1\n"), HasSubstr("not an integer"));
  const std::string g = "arrival_step,prompt_len,output_len,prefix_group\n";
  EXPECT_THAT(TraceError(g + "0,8,5,0\n"), HasSubstr("must exceed the shared prefix"));
  EXPECT_THAT(TraceError(g + "0,20,5,-2\n"), HasSubstr("prefix_group -2"));
}

// Group numbers are labels: a trace whose only group is 2 has one group, not three.
TEST(KvstressTraceTest, CountsTheDistinctPrefixGroups) {
  const std::string g = "arrival_step,prompt_len,output_len,prefix_group\n";
  absl::StatusOr<Workload> one = ParseTrace(g + "0,20,3,2\n1,30,3,2\n", "t.csv", 100, 8);
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_THAT(one->description, HasSubstr(", 1 prefix group sharing 8 tokens"));
  absl::StatusOr<Workload> two =
      ParseTrace(g + "0,20,3,7\n0,20,3,\n1,30,3,0\n2,30,3,7\n", "t.csv", 100, 8);
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_THAT(two->description, HasSubstr(", 2 prefix groups sharing 8 tokens"));
}

// A binary file must not write raw bytes (terminal escapes) into the error, nor a
// megabyte line.
TEST(KvstressTraceTest, GarbageIsEscapedAndCut) {
  const std::string h = "arrival_step,prompt_len,output_len\n";
  const std::string garbage("\x1b[2J\x07\xff\xfe\x00zz", 10);
  const std::string e = TraceError(h + "0," + garbage + ",5\n");
  EXPECT_THAT(e, HasSubstr("t.csv:2: prompt_len '\\x1b[2J\\x07\\xff\\xfe\\x00zz' is not"));
  EXPECT_TRUE(std::none_of(e.begin(), e.end(), [](char c) {
    return static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f;
  })) << e;
  const std::string header = TraceError(std::string(5000, '\x01') + "\n");
  EXPECT_THAT(header, HasSubstr("... (5000 bytes in all)"));
  EXPECT_LT(header.size(), 400u);
  EXPECT_EQ(Printable("a\\b\tc"), "a\\\\b\\x09c");
  EXPECT_EQ(Printable("abcdef", 3), "abc... (6 bytes in all)");
}

TEST(KvstressTraceTest, MissingFileIsNotFound) {
  absl::StatusOr<Workload> w = LoadTrace("/nonexistent/kvstress.csv", 100, 8);
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(w.status().message()), HasSubstr("/nonexistent/kvstress.csv"));
}

// ---- flags -------------------------------------------------------------------

std::string FlagError(const FlagValues& f) {
  absl::StatusOr<RunConfig> rc = BuildRunConfig(f);
  EXPECT_FALSE(rc.ok());
  return rc.ok() ? "" : std::string(rc.status().message());
}

TEST(KvstressFlagsTest, DefaultsAreValid) {
  absl::StatusOr<RunConfig> rc = BuildRunConfig(FlagValues{});
  ASSERT_TRUE(rc.ok()) << rc.status();
  EXPECT_EQ(rc->policies.size(), AllPolicies().size());
  EXPECT_EQ(rc->base.TokenBytes(), 128 * 1024);  // Llama-3-8B: 32 x 8 x 128 x bf16 x K,V
  EXPECT_EQ(rc->base.memory_budget_bytes, int64_t{64} << 30);
  EXPECT_EQ(rc->mix.arrival_rate, DefaultArrivalRate(Mix::kChat));
  EXPECT_FALSE(rc->sim.keep_series);  // no --json / --plot: no series kept
}

TEST(KvstressFlagsTest, ScaleMultipliesSizeTogether) {
  FlagValues f;
  f.scale = 0.5;
  absl::StatusOr<RunConfig> rc = BuildRunConfig(f);
  ASSERT_TRUE(rc.ok()) << rc.status();
  EXPECT_EQ(rc->base.memory_budget_bytes, int64_t{32} << 30);
  EXPECT_EQ(rc->base.max_requests, 512);
  EXPECT_EQ(rc->mix.num_requests, 1000);
  EXPECT_DOUBLE_EQ(rc->mix.arrival_rate, DefaultArrivalRate(Mix::kChat) / 2);
}

TEST(KvstressFlagsTest, BadValuesNameTheFlag) {
  auto with = [](auto set) {
    FlagValues f;
    set(f);
    return FlagError(f);
  };
  EXPECT_THAT(with([](FlagValues& f) { f.device = "tpu"; }), HasSubstr("--device"));
  EXPECT_THAT(with([](FlagValues& f) { f.device = "cuda:x"; }), HasSubstr("--device"));
  EXPECT_THAT(with([](FlagValues& f) { f.dtype = "int8"; }), HasSubstr("--dtype"));
  EXPECT_THAT(with([](FlagValues& f) { f.layers = 0; }), HasSubstr("--layers"));
  EXPECT_THAT(with([](FlagValues& f) { f.head_dim = -5; }), HasSubstr("--head_dim"));
  EXPECT_THAT(with([](FlagValues& f) { f.budget_gib = 0; }), HasSubstr("--budget_gib"));
  EXPECT_THAT(with([](FlagValues& f) { f.budget_gib = 0.5; }),
              HasSubstr("less than one request at --max_context=8192"));
  EXPECT_THAT(with([](FlagValues& f) { f.max_context = 0; }), HasSubstr("--max_context"));
  EXPECT_THAT(with([](FlagValues& f) { f.max_requests = 0; }), HasSubstr("--max_requests"));
  EXPECT_THAT(with([](FlagValues& f) { f.scale = 0; }), HasSubstr("--scale"));
  EXPECT_THAT(with([](FlagValues& f) { f.arrival_rate = 0; }), HasSubstr("--arrival_rate"));
  EXPECT_THAT(with([](FlagValues& f) { f.arrival_rate = -3; }), HasSubstr("--arrival_rate"));
  EXPECT_THAT(with([](FlagValues& f) { f.requests = 0; }), HasSubstr("--requests"));
  EXPECT_THAT(with([](FlagValues& f) { f.workload = "video"; }), HasSubstr("--workload"));
  EXPECT_THAT(with([](FlagValues& f) { f.policies = "paged-8"; }), HasSubstr("--policies"));
  EXPECT_THAT(with([](FlagValues& f) { f.policies = ","; }), HasSubstr("no policy"));
  EXPECT_THAT(with([](FlagValues& f) { f.steps = 0; }), HasSubstr("--steps"));
  EXPECT_THAT(with([](FlagValues& f) { f.host_page_kib = 12; }), HasSubstr("--host_page_kib"));
  EXPECT_THAT(with([](FlagValues& f) {
                f.workload = "shared-system-prompt";
                f.prefix_len = 5000;
              }),
              HasSubstr("--prefix_len"));
}

// Sizes beyond what the layouts address stop at the flags, with the numbers, instead of
// failing every virtual policy later.
TEST(KvstressFlagsTest, BudgetAndSizesBeyondTheLayoutsAreRejected) {
  FlagValues f;
  f.budget_gib = 4294967295;
  const std::string e = FlagError(f);
  EXPECT_THAT(e, HasSubstr("--budget_gib: 4294967295 GiB is 2199023255040 pages of 2 MiB"));
  EXPECT_THAT(e, HasSubstr("virtual, virtual-chunk, virtual-layer"));
  EXPECT_THAT(e, HasSubstr("at most 2147483647 pages"));

  FlagValues big;
  big.budget_gib = 1e12;
  EXPECT_THAT(FlagError(big), HasSubstr("--budget_gib: 1000000000000 (x --scale=1)"));
  // 4096 rows of 4096 tokens of 16 MiB: 256 TiB of address space for the virtual rows.
  FlagValues wide;
  wide.head_dim = 16384;
  wide.max_requests = 4096;
  wide.max_context = 4096;
  wide.policies = "virtual";
  EXPECT_THAT(FlagError(wide), HasSubstr("--max_requests: 4096 rows x --max_context=4096 need "
                                         "256 TiB of address space under policy virtual"));
  FlagValues rate;
  rate.arrival_rate = 1e9;
  EXPECT_THAT(FlagError(rate), HasSubstr("--arrival_rate: 1e+09"));
  FlagValues page;
  page.budget_gib = 0.5;
  page.max_context = 16;
  page.host_page_kib = 1 << 20;
  EXPECT_THAT(FlagError(page),
              HasSubstr("--budget_gib: 0.5 GiB is less than one host page of 1 GiB"));
}

// A trace gives the requests, so the mix's flags would be ignored: given together, they
// are an error (left at their defaults, they are not).
TEST(KvstressFlagsTest, MixFlagsDoNotApplyToATrace) {
  FlagValues f;
  f.trace = "t.csv";
  EXPECT_TRUE(BuildRunConfig(f).ok());
  for (const char* flag : {"workload", "arrival_rate", "requests", "seed", "num_prefixes"}) {
    f.specified = {flag};
    EXPECT_THAT(FlagError(f),
                HasSubstr(std::string("--") + flag + ": does not apply to --trace=t.csv"));
  }
  f.specified = {"prefix_len", "budget_gib"};  // these do apply to a trace
  EXPECT_TRUE(BuildRunConfig(f).ok());
  FlagValues chat;
  chat.specified = {"num_prefixes"};
  EXPECT_THAT(FlagError(chat), HasSubstr("applies only to --workload=shared-system-prompt"));
  chat.workload = "shared-system-prompt";
  EXPECT_TRUE(BuildRunConfig(chat).ok());
}

TEST(KvstressFlagsTest, PoliciesParseSubsetsAndDropDuplicates) {
  absl::StatusOr<std::vector<Policy>> p = ParsePolicies(" paged-16,static,paged-16 ");
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->size(), 2u);
  EXPECT_EQ((*p)[0].name, "paged-16");
  EXPECT_EQ((*p)[1].name, "static");
  EXPECT_FALSE((*p)[1].shares_prefixes);
  kvmem::KvCacheConfig base;
  base.max_context = 4096;
  EXPECT_EQ(PolicyConfig((*p)[1], base).page_tokens, 4096);  // static = one max_context page
}

// ---- the host's mapping limit ---------------------------------------------------

// The run's config and workload for `f`, as Run builds them.
struct Prepared {
  RunConfig rc;
  Workload w;
};
Prepared Prepare(const FlagValues& f) {
  absl::StatusOr<RunConfig> rc = BuildRunConfig(f);
  EXPECT_TRUE(rc.ok()) << rc.status();
  if (!rc.ok()) return {};
  absl::StatusOr<Workload> w = MakeWorkload(*rc);
  EXPECT_TRUE(w.ok()) << w.status();
  return {*rc, w.ok() ? *std::move(w) : Workload{}};
}

// Linux's default vm.max_map_count, and what a process holds before it makes a cache.
constexpr MapLimit kDefaultLimit{65530, 100};

std::string MappingError(const FlagValues& f) {
  const Prepared p = Prepare(f);
  const absl::Status s = CheckHostMappings(p.rc, p.w, kDefaultLimit);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  return std::string(s.message());
}

// The README's default run fits the default limit: every policy's estimate is below it,
// and close to what /proc/self/maps showed at its peak (static and paged: 32770; virtual
// 25104; virtual-chunk 16057; virtual-layer 56193).
TEST(KvstressHostMappingsTest, DefaultRunFits) {
  const Prepared p = Prepare(FlagValues{});
  EXPECT_TRUE(CheckHostMappings(p.rc, p.w, kDefaultLimit).ok());
  for (const Policy& policy : p.rc.policies) {
    const int64_t n = EstimateHostMappings(policy, p.rc.base, p.w);
    SCOPED_TRACE(policy.name);
    EXPECT_GE(n, 16057);
    EXPECT_LE(n, 62000);
    if (policy.kind == PolicyKind::kVirtualPerLayer) {
      EXPECT_GE(n, 56193 * 0.95);
      EXPECT_LE(n, 56193 * 1.1);
    }
  }
}

// shared-system-prompt at 64 GiB: the per-layer layout maps the shared prefix again in
// each of 64 tensors of every forked row (mmap failed at 64.4k mappings).
TEST(KvstressHostMappingsTest, SharedPrefixPerLayerStopsWithTheFixes) {
  FlagValues f;
  f.workload = "shared-system-prompt";
  const std::string e = MappingError(f);
  EXPECT_THAT(e, HasSubstr("maps each 2048 KiB page"));
  EXPECT_THAT(e, HasSubstr("vm.max_map_count = 65530 mappings (100 in use now)"));
  EXPECT_THAT(e, HasSubstr("the estimated peak of virtual-layer is more than that"));
  EXPECT_THAT(e, HasSubstr("sudo sysctl -w vm.max_map_count=131072"));
  EXPECT_THAT(e, HasSubstr("--budget_gib="));
  EXPECT_THAT(e, HasSubstr("--policies=static,paged-1,paged-16,paged-64,virtual,virtual-chunk"));
  // The 1024-token prefix fills one 2 MiB page of each layer; on larger pages it would end
  // inside one, and every fork would copy that page into real memory.
  EXPECT_THAT(e, Not(HasSubstr("--host_page_kib=")));
  f.prefix_len = 2048;
  EXPECT_THAT(MappingError(f), HasSubstr("\n  --host_page_kib=4096"));
}

// The sizes are set past the flags: kvmem may refuse them itself when a cache is sized,
// and this tests kvstress's own check.
TEST(KvstressHostMappingsTest, LargeBudgetOrSmallPagesStop) {
  FlagValues only_static;
  only_static.policies = "static";
  Prepared budget = Prepare(only_static);
  budget.rc.base.memory_budget_bytes = int64_t{128} << 30;
  const absl::Status b = CheckHostMappings(budget.rc, budget.w, kDefaultLimit);
  EXPECT_THAT(std::string(b.message()), HasSubstr("estimates: static 65536"));
  EXPECT_THAT(std::string(b.message()), HasSubstr("--host_page_kib=4096"));
  EXPECT_THAT(std::string(b.message()), HasSubstr("--budget_gib=127"));
  EXPECT_THAT(std::string(b.message()), Not(HasSubstr("--policies=")));  // none would fit

  Prepared small = Prepare(FlagValues{});
  small.rc.base.host_granularity = 4096;
  const absl::Status s = CheckHostMappings(small.rc, small.w, kDefaultLimit);
  EXPECT_THAT(std::string(s.message()), HasSubstr("the estimated peak of every policy"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("estimates: static 16777216"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("--host_page_kib=2048"));
  // A budget of the few hundred MiB that 4 KiB pages allow cannot hold one request at
  // max_context 8192 (1 GiB): not offered.
  EXPECT_THAT(std::string(s.message()), Not(HasSubstr("--budget_gib=")));
}

// Every suggested fix is one that the check itself accepts.
TEST(KvstressHostMappingsTest, SuggestedFixesFit) {
  FlagValues f;
  f.workload = "shared-system-prompt";
  const std::string e = MappingError(f);
  for (absl::string_view line : absl::StrSplit(e, '\n')) {
    FlagValues fixed = f;
    if (absl::ConsumePrefix(&line, "  --host_page_kib=")) {
      ASSERT_TRUE(absl::SimpleAtoi(line, &fixed.host_page_kib));
    } else if (absl::ConsumePrefix(&line, "  --budget_gib=")) {
      ASSERT_TRUE(absl::SimpleAtod(line, &fixed.budget_gib));
    } else if (absl::ConsumePrefix(&line, "  --policies=")) {
      fixed.policies = std::string(line);
    } else {
      continue;
    }
    const Prepared p = Prepare(fixed);
    EXPECT_TRUE(CheckHostMappings(p.rc, p.w, kDefaultLimit).ok()) << line;
  }
  // The GPU backends have no such limit.
  f.device = "cuda";
  const Prepared p = Prepare(f);
  EXPECT_TRUE(CheckHostMappings(p.rc, p.w, kDefaultLimit).ok());
}

// ---- small pieces of the output ------------------------------------------------

TEST(KvstressOutputTest, JsonWriterNestsAndEscapes) {
  JsonWriter j;
  j.BeginObject();
  j.Field("a", int64_t{1});
  j.Key("b");
  j.BeginArray();
  j.Int(2);
  j.Double(0.5);
  j.Double(1.0 / 0.0);
  j.EndArray();
  j.Field("s", std::string("x\"y\n"));
  j.Field("t", true);
  j.EndObject();
  EXPECT_EQ(j.str(), R"({"a":1,"b":[2,0.5,null],"s":"x\"y\n","t":true})");
}

// A run that held nothing has no utilisation: "-", never 100 %; a failed policy keeps
// its row.
TEST(KvstressOutputTest, TableShowsUndefinedAndFailedRows) {
  SimResult idle;
  idle.policy = "paged-16";
  idle.steps = 2;
  std::vector<PolicyOutcome> outcomes = {{"paged-16", idle},
                                         {"virtual", absl::ResourceExhaustedError("no room")}};
  const std::string t = FormatTable(outcomes);
  EXPECT_THAT(t, Not(HasSubstr("100.0%")));
  EXPECT_THAT(t, HasSubstr("- : undefined"));
  EXPECT_THAT(t, HasSubstr("virtual       FAILED"));
  EXPECT_THAT(t, Not(HasSubstr("out tok")));
  RunInfo info;
  const std::string j = FormatJson(info, outcomes);
  EXPECT_THAT(j, HasSubstr("\"utilisation_mean\":null"));
  EXPECT_THAT(
      j, HasSubstr(R"({"policy":"virtual","failed":true,"error":"RESOURCE_EXHAUSTED: no room"})"));
}

// Two policies on the same pixels are told apart: the shared line alternates their
// colours, the legend names them, and a failed policy is named rather than dropped.
TEST(KvstressOutputTest, PlotTellsCoincidingCurvesApartAndNamesFailures) {
  SimResult a, b, c;
  a.policy = "paged-16";
  b.policy = "virtual";
  c.policy = "static";
  for (int64_t i = 0; i < 50; ++i) {
    a.series.push_back({1, 0, (i + 1) << 20, i << 20, 0, 0});
    c.series.push_back({1, 0, int64_t{64} << 20, i << 20, 0, 0});
  }
  b.series = a.series;
  PlotInfo info;
  info.budget_bytes = int64_t{64} << 20;
  info.failed = {"virtual-layer"};
  const std::vector<SimResult> results = {a, b, c};
  EXPECT_EQ(CoincidingCurves(info, results, false), (std::vector<std::vector<size_t>>{{0, 1}}));
  EXPECT_EQ(CoincidingCurves(info, results, true), (std::vector<std::vector<size_t>>{{0, 1, 2}}));
  const std::string svg = RenderSvgPlot(info, results);
  EXPECT_THAT(svg, HasSubstr("stroke-dasharray=\"12,12\" stroke-dashoffset=\"12\""));
  EXPECT_THAT(svg, HasSubstr("stroke-dasharray=\"6,24\" stroke-dashoffset=\"20\""));
  EXPECT_THAT(svg, HasSubstr("coinciding held lines:"));
  EXPECT_THAT(svg, HasSubstr(">paged-16, virtual</text>"));
  EXPECT_THAT(svg, HasSubstr(">paged-16, virtual, static</text>"));
  EXPECT_THAT(svg, HasSubstr("virtual-layer: failed, no line"));
}

// out tok/step left the table: a running request decodes one token a step, so output
// tokens / steps is mean running less preemptions / steps, and differs from it only where
// a step preempted. The hand-checked trace of kvstress_test.cc preempts once under paged-1.
TEST(KvstressOutputTest, TokensPerStepIsMeanRunningLessPreemptions) {
  absl::StatusOr<Workload> w = ParseTrace(
      "arrival_step,prompt_len,output_len\n0,100,4\n0,60,8\n1,90,3\n2,20,2\n", "tiny", 128, 0);
  ASSERT_TRUE(w.ok()) << w.status();
  kvmem::KvCacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = 1;
  c.head_dim = 256;
  c.dtype = kvmem::DType::kFloat32;
  c.max_context = 128;
  c.max_requests = 4;
  c.memory_budget_bytes = 512 * 1024;
  c.host_granularity = 4 * 1024;
  for (const char* name : {"paged-1", "paged-16"}) {
    SCOPED_TRACE(name);
    const Policy p = ParsePolicies(name)->front();
    absl::StatusOr<SimResult> r = Simulate(*w, p, PolicyConfig(p, c), SimOptions{});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_DOUBLE_EQ(r->mean_running * r->steps, r->output_tokens + r->preemptions);
    EXPECT_DOUBLE_EQ(r->tokens_per_step, 17.0 / 9);
    if (r->preemptions > 0) {
      EXPECT_NE(r->tokens_per_step, r->mean_running);
      EXPECT_DOUBLE_EQ(r->mean_running, 2.0);
      // A, B and C are admitted when they arrive, D two steps late (steps 2, 3 are full).
      EXPECT_DOUBLE_EQ(r->mean_wait_steps, 2.0 / 4);
    } else {
      // paged-16: C waits 3 steps (1 to 4), D 2 (2 to 4).
      EXPECT_DOUBLE_EQ(r->mean_wait_steps, 5.0 / 4);
    }
  }
}

TEST(KvstressOutputTest, NiceTicksCoverTheRange) {
  for (double max : {0.7, 1.0, 3.0, 64.0, 65.3, 3995.0, 12029.0}) {
    const std::vector<double> t = NiceTicks(max, 6);
    ASSERT_GE(t.size(), 2u) << max;
    EXPECT_EQ(t.front(), 0);
    EXPECT_GE(t.back(), max * (1 - 1e-9)) << max;
    EXPECT_LE(t.size(), 13u) << max;
  }
}

// ---- the binary ------------------------------------------------------------------

struct Outcome {
  int exit_code;
  std::string output;  // stdout and stderr
};

// Runs the binary through the shell; `prefix` goes before it (e.g. a ulimit).
Outcome RunKvstress(const std::string& args, const std::string& prefix = "") {
  const std::string cmd =
      prefix + std::string(KVSTRESS_BINARY) + " --progress=false " + args + " 2>&1";
  std::FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return {-1, "popen failed"};
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

std::string WriteTemp(const std::string& name, const std::string& text) {
  // Prefixed: ctest runs the tests of this file as parallel processes sharing TempDir.
  const std::string path = ::testing::TempDir() + "/kvstress_cli_" + name;
  std::ofstream(path) << text;
  return path;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Tiny shape: 2 KiB per token, budget 512 KiB = 256 tokens, 4 KiB host pages.
const std::string kTiny =
    "--layers=1 --kv_heads=1 --head_dim=256 --dtype=fp32 --budget_gib=0.00048828125 "
    "--max_context=128 --max_requests=4 --host_page_kib=4 --check_invariants=1";

TEST(KvstressBinaryTest, BadInputExitsNonZeroWithAMessage) {
  const std::string bad_trace =
      WriteTemp("bad.csv", "arrival_step,prompt_len,output_len\n0,10,5\n1,ten,5\n");
  const std::string long_trace =
      WriteTemp("long.csv", "arrival_step,prompt_len,output_len\n0,100,100\n");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--no_such_flag", "Unknown command line flag"},
      {"--layers=abc", "Illegal value"},
      {"stray_argument", "unexpected argument"},
      {"--budget_gib=0.5", "less than one request"},
      {"--budget_gib=-1", "--budget_gib"},
      {"--policies=paged-8", "unknown policy 'paged-8'"},
      {"--workload=video", "unknown workload 'video'"},
      {"--dtype=int4", "--dtype"},
      {"--trace=/nonexistent/trace.csv", "cannot open trace '/nonexistent/trace.csv'"},
      {"--trace=" + ::testing::TempDir(), "is a directory"},
      {"--trace=" + bad_trace + " " + kTiny, "bad.csv:3: prompt_len 'ten' is not an integer"},
      {"--trace=" + long_trace + " " + kTiny, "long.csv:2: prompt_len + output_len = 200"},
      {"--json=/nonexistent/dir/out.json --trace=" +
           WriteTemp("ok.csv",
                     "arrival_step,prompt_len,"
                     "output_len\n0,10,2\n") +
           " " + kTiny,
       "cannot write '/nonexistent/dir/out.json'"},
  };
  for (const auto& [args, message] : cases) {
    const Outcome o = RunKvstress(args);
    EXPECT_NE(o.exit_code, 0) << args << "\n" << o.output;
    EXPECT_LT(o.exit_code, 128) << "crashed: " << args << "\n" << o.output;
    EXPECT_THAT(o.output, HasSubstr(message)) << args;
  }
}

// The flags' own arithmetic allows one max_context request (100 tokens of 1.5 KiB =
// 153600 bytes), but kvmem's pools of whole 4 KiB pages do not: kvmem's sizing stops the
// run with its numbers before anything runs.
TEST(KvstressBinaryTest, BudgetThatAPolicyCannotSizeStopsBeforeTheRun) {
  const std::string trace = WriteTemp("one.csv", "arrival_step,prompt_len,output_len\n0,10,2\n");
  const Outcome o = RunKvstress(
      "--trace=" + trace +
      " --layers=1 --kv_heads=1 --head_dim=192 --dtype=fp32 --budget_gib=0.0001430511474609375 "
      "--max_context=100 --max_requests=2 --host_page_kib=4 --policies=virtual,static");
  EXPECT_EQ(o.exit_code, 1) << o.output;
  EXPECT_THAT(o.output, HasSubstr("kvstress: --budget_gib: 0.0001430511474609375 GiB at "
                                  "--max_context=100 and --host_page_kib=4 does not fit policy "
                                  "virtual: virtual layout: memory budget 153600 bytes"));
  EXPECT_THAT(o.output, Not(HasSubstr("peak")));  // stopped before the table
}

// A policy that fails while the run goes on (here the virtual layouts cannot reserve their
// rows' 512 GiB of address space under `ulimit -v` 8 GiB; paged-16 needs 1.1 GiB): one
// line with its Status, its row in the table and its entry in the JSON kept as failed,
// the plot names it, the other policy runs to the end, and the exit status says so.
TEST(KvstressBinaryTest, PolicyFailuresAreListedAndExitNonZero) {
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer reserves terabytes of shadow address space at start-up, so the
  // kvstress binary of a sanitizer build cannot start under `ulimit -v` at all.
  GTEST_SKIP() << "needs `ulimit -v`, which an AddressSanitizer build cannot run under";
#endif
  const std::string trace = WriteTemp("two.csv", "arrival_step,prompt_len,output_len\n0,10,2\n");
  const std::string json = ::testing::TempDir() + "/kvstress_cli_failed.json";
  const std::string svg = ::testing::TempDir() + "/kvstress_cli_failed.svg";
  const Outcome o =
      RunKvstress("--trace=" + trace +
                      " --layers=1 --kv_heads=1 --head_dim=256 --dtype=fp32 --budget_gib=0.125 "
                      "--max_context=65536 --max_requests=4096 --host_page_kib=4 "
                      "--policies=paged-16,virtual,virtual-layer --json=" +
                      json + " --plot=" + svg,
                  "ulimit -v 8388608; ");
  EXPECT_EQ(o.exit_code, 1) << o.output;
  EXPECT_THAT(o.output, HasSubstr("\npaged-16           1 "));
  EXPECT_THAT(o.output, HasSubstr("\nvirtual       FAILED"));
  EXPECT_THAT(o.output, HasSubstr("\nvirtual-layer FAILED"));
  EXPECT_THAT(o.output, HasSubstr("\nFAILED virtual: RESOURCE_EXHAUSTED: policy virtual: cannot "
                                  "create the cache"));
  EXPECT_THAT(o.output, HasSubstr("(ulimit -v)"));
  EXPECT_THAT(o.output, HasSubstr("\nFAILED virtual-layer: RESOURCE_EXHAUSTED: policy "
                                  "virtual-layer: cannot create the cache"));
  EXPECT_LE(std::count(o.output.begin(), o.output.end(), '\n'), 25) << o.output;
  EXPECT_THAT(o.output, HasSubstr("kvstress: 2 of 3 policies failed"));
  const std::string j = ReadFile(json);
  EXPECT_THAT(j, HasSubstr("{\"policy\":\"paged-16\",\"failed\":false,"));
  EXPECT_THAT(j, HasSubstr("{\"policy\":\"virtual\",\"failed\":true,\"error\":"
                           "\"RESOURCE_EXHAUSTED: policy virtual: cannot create the cache"));
  EXPECT_THAT(ReadFile(svg), HasSubstr("virtual-layer: failed, no line"));
}

TEST(KvstressBinaryTest, HelpListsTheFlagsAndExitsZero) {
  for (const char* help : {"--help", "-h", "--helpshort"}) {
    const Outcome o = RunKvstress(help);
    EXPECT_EQ(o.exit_code, 0) << help << "\n" << o.output;
    EXPECT_THAT(o.output, HasSubstr("usage: kvstress"));
    EXPECT_THAT(o.output, HasSubstr("  --budget_gib (default 64)\n"));
    EXPECT_THAT(o.output, HasSubstr("  --workload (default chat)\n"));
    EXPECT_THAT(o.output, HasSubstr("  --host_page_kib (default 2048)\n"));
    EXPECT_THAT(o.output, Not(HasSubstr("No flags matched")));
    EXPECT_THAT(o.output, Not(HasSubstr("absl")));  // only kvstress's own flags
  }
}

// A run that serves nothing has nothing to report: undefined utilisation ("-", not
// 100 %), one message, and a non-zero exit.
TEST(KvstressBinaryTest, ServingNothingIsAnError) {
  const std::string late = WriteTemp("late.csv", "arrival_step,prompt_len,output_len\n5,10,2\n");
  const Outcome o = RunKvstress("--trace=" + late + " " + kTiny + " --steps=2");
  EXPECT_EQ(o.exit_code, 1) << o.output;
  EXPECT_THAT(o.output, Not(HasSubstr("100.0%")));
  EXPECT_THAT(o.output, HasSubstr("- : undefined"));
  EXPECT_THAT(o.output, HasSubstr("kvstress: no policy finished a request within --steps=2 (the "
                                  "first request arrives at step 5"));

  const std::string empty = WriteTemp("empty.csv", "arrival_step,prompt_len,output_len\n");
  const Outcome e = RunKvstress("--trace=" + empty + " " + kTiny);
  EXPECT_EQ(e.exit_code, 1) << e.output;
  EXPECT_THAT(e.output, HasSubstr("has no requests: nothing to simulate"));
  EXPECT_THAT(e.output, Not(HasSubstr("policy ")));  // stopped before the table
}

TEST(KvstressBinaryTest, TraceWithAWorkloadIsRejected) {
  const std::string trace = WriteTemp("wl.csv", "arrival_step,prompt_len,output_len\n0,10,2\n");
  const Outcome o = RunKvstress("--trace=" + trace + " --workload=long-context " + kTiny);
  EXPECT_EQ(o.exit_code, 2) << o.output;
  EXPECT_THAT(o.output, HasSubstr("kvstress: --workload: does not apply to --trace="));
  // Left at its default, --workload is no conflict.
  EXPECT_EQ(RunKvstress("--trace=" + trace + " " + kTiny).exit_code, 0);
}

TEST(KvstressBinaryTest, CudaDeviceFailsCleanlyWithoutCuda) {
  const Outcome o = RunKvstress("--device=cuda " + kTiny + " --requests=3");
#ifdef KVMEM_WITH_CUDA
  // Built with CUDA: either it runs, or it says why the device is unavailable.
  if (o.exit_code != 0) {
    EXPECT_THAT(o.output, HasSubstr("--device=cuda:0 is not available"));
  }
#else
  EXPECT_EQ(o.exit_code, 1) << o.output;
  EXPECT_THAT(o.output, HasSubstr("--device=cuda:0 is not available"));
#endif
}

TEST(KvstressBinaryTest, TinyTraceWritesTableJsonAndPlot) {
  const std::string trace = WriteTemp(
      "tiny.csv", "arrival_step,prompt_len,output_len\n0,100,4\n0,60,8\n1,90,3\n2,20,2\n");
  const std::string json = ::testing::TempDir() + "/kvstress_cli_tiny.json";
  const std::string svg = ::testing::TempDir() + "/kvstress_cli_tiny.svg";
  std::remove(json.c_str());
  std::remove(svg.c_str());
  const Outcome o =
      RunKvstress("--trace=" + trace + " " + kTiny + " --json=" + json + " --plot=" + svg);
  ASSERT_EQ(o.exit_code, 0) << o.output;
  for (const Policy& p : AllPolicies()) EXPECT_THAT(o.output, HasSubstr(p.name));
  EXPECT_THAT(o.output, HasSubstr("4 requests, 270 prompt + 17 output tokens"));
  const std::string j = ReadFile(json);
  EXPECT_THAT(j, HasSubstr("\"policy\":\"paged-16\""));
  EXPECT_THAT(j, HasSubstr("\"held_bytes\":[360448,"));  // paged-16 after step 0: 11 pages
  EXPECT_THAT(j, HasSubstr("\"drained\":true"));
  const std::string s = ReadFile(svg);
  EXPECT_EQ(s.rfind("<svg", 0), 0u);
  EXPECT_THAT(s, HasSubstr("virtual-layer"));
  EXPECT_THAT(s, HasSubstr("</svg>"));
}

// The commands a new user tried: on a host whose vm.max_map_count they exceed, each
// stops before simulating, with one message naming the limit and the fixes (they printed
// tens of thousands of lines, or ran for minutes).
TEST(KvstressBinaryTest, RunsOverTheMappingLimitStopAtOnce) {
  const std::optional<MapLimit> limit = ReadMapLimit();
  if (!limit.has_value()) GTEST_SKIP() << "no /proc/sys/vm/max_map_count";
  for (const std::string args : {"--workload=shared-system-prompt",
                                 "--budget_gib=128 --policies=static", "--host_page_kib=4"}) {
    SCOPED_TRACE(args);
    FlagValues f;
    if (args == "--workload=shared-system-prompt") f.workload = "shared-system-prompt";
    if (args == "--budget_gib=128 --policies=static") {
      f.budget_gib = 128;
      f.policies = "static";
    }
    if (args == "--host_page_kib=4") f.host_page_kib = 4;
    // The run stops at the flags (where kvmem sizes each cache) or at kvstress's estimate;
    // on a host that allows the mappings it would run, for minutes.
    absl::StatusOr<RunConfig> rc = BuildRunConfig(f);
    if (rc.ok()) {
      absl::StatusOr<Workload> w = MakeWorkload(*rc);
      ASSERT_TRUE(w.ok()) << w.status();
      if (CheckHostMappings(*rc, *w, *limit).ok()) {
        std::printf("skipped %s: this host allows %lld mappings\n", args.c_str(),
                    static_cast<long long>(limit->max_map_count));
        continue;
      }
    }
    const Outcome o = RunKvstress(args);
    EXPECT_NE(o.exit_code, 0) << o.output;
    EXPECT_LT(o.exit_code, 128) << o.output;
    EXPECT_EQ(o.output.rfind("kvstress: ", 0), 0u) << o.output;
    EXPECT_THAT(o.output, HasSubstr("vm.max_map_count"));
    EXPECT_THAT(o.output, HasSubstr("sysctl -w vm.max_map_count="));
    EXPECT_THAT(o.output, Not(HasSubstr("FAILED")));
    EXPECT_LE(std::count(o.output.begin(), o.output.end(), '\n'), 8) << o.output;
  }
}

}  // namespace
}  // namespace kvstress
