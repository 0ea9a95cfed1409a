// Smoke tests of kvbench steps (tools/kvbench/steps_workloads.h, steps_report.h): every
// scenario runs on every layout at tiny sizes and reports positive figures, the context
// mix and budgets hold what they promise, and the results file has the schema's keys.
// No timing is asserted: the figures depend on the machine.
#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "kvmem/kv_cache.h"
#include "tools/kvbench/settings.h"
#include "tools/kvbench/steps_common.h"
#include "tools/kvbench/steps_report.h"
#include "tools/kvbench/steps_workloads.h"

namespace kvbench {
namespace {

StepsEnv TinyEnv() {
  StepsEnv env;
  env.timing = StepsTiming{/*warmup=*/1, /*reps=*/4, /*max_ms=*/100};
  return env;
}

void ExpectMeasured(const Sample& s, const std::string& what) {
  EXPECT_GT(s.median, 0) << what;
  EXPECT_GT(s.min, 0) << what;
  EXPECT_LE(s.min, s.median) << what;
  EXPECT_GE(s.reps, kMinReps) << what;
}

class StepsScenarios : public testing::TestWithParam<StepsLayout> {};

TEST_P(StepsScenarios, DecodeReportsBothPaths) {
  absl::StatusOr<DecodeFigure> f = MeasureDecode(TinyEnv(), GetParam(), 8, 64, 256, 1 << 20);
  ASSERT_TRUE(f.ok()) << f.status();
  ExpectMeasured(f->batch, "batch");
  ExpectMeasured(f->per_request, "per_request");
  ExpectMeasured(f->extend_into, "extend_into");
  ExpectMeasured(f->build_metadata, "build_metadata");
  EXPECT_GE(f->context_min, 64);
  EXPECT_LE(f->context_max, 256);
}

TEST_P(StepsScenarios, PrefillChurnForkRewind) {
  const StepsEnv env = TinyEnv();
  absl::StatusOr<PrefillFigure> p = MeasurePrefill(env, GetParam(), 100);
  ASSERT_TRUE(p.ok()) << p.status();
  ExpectMeasured(p->batch, "prefill batch");
  ExpectMeasured(p->per_request, "prefill per_request");
  ExpectMeasured(p->trimmed, "prefill trimmed");

  absl::StatusOr<ChurnFigure> c = MeasureChurn(env, GetParam(), 16);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectMeasured(c->batch, "churn batch");
  ExpectMeasured(c->add, "churn add");
  ExpectMeasured(c->free_batch, "churn free_batch");

  absl::StatusOr<ForkFigure> f = MeasureFork(env, GetParam(), 100, 3);
  ASSERT_TRUE(f.ok()) << f.status();
  ExpectMeasured(f->fork, "fork");
  ExpectMeasured(f->free, "fork free");

  absl::StatusOr<RewindFigure> r = MeasureRewind(env, GetParam(), 4);
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectMeasured(r->batch, "rewind batch");
  ExpectMeasured(r->per_request, "rewind per_request");
  ExpectMeasured(r->extend, "rewind extend");
}

TEST_P(StepsScenarios, PressureRunsAtTheTightBudget) {
  absl::StatusOr<PressureFigure> f = MeasurePressure(TinyEnv(), GetParam(), 8, 64, 256, 1 << 20);
  ASSERT_TRUE(f.ok()) << f.status();
  ExpectMeasured(f->pressure, "pressure");
  ExpectMeasured(f->ample, "ample");
  ExpectMeasured(f->per_request, "per_request");
  EXPECT_GT(f->peak_held_bytes, 0);
  EXPECT_GE(f->budget_bytes, f->peak_held_bytes);
  EXPECT_GT(f->churn_us_per_step, 0);
  EXPECT_GE(f->reclaimed_per_step, 0);
}

INSTANTIATE_TEST_SUITE_P(EveryLayout, StepsScenarios, testing::ValuesIn(StepsLayouts()),
                         [](const testing::TestParamInfo<StepsLayout>& info) {
                           std::string name = info.param.name;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

TEST(StepsCommon, ContextMixSpansTheRangeAndScalesDown) {
  const std::vector<int64_t> lens = ContextMix(64, 2048, 32768, 0, int64_t{1} << 40);
  ASSERT_EQ(lens.size(), 64u);
  const auto [lo, hi] = std::minmax_element(lens.begin(), lens.end());
  EXPECT_GE(*lo, 2048);
  EXPECT_LT(*lo, 2300) << "the mix reaches near its bottom";
  EXPECT_LE(*hi, 32768);
  EXPECT_GT(*hi, 30000) << "and near its top";
  EXPECT_FALSE(std::is_sorted(lens.begin(), lens.end()));

  const int64_t cap = 1 << 20;
  const std::vector<int64_t> scaled = ContextMix(1024, 2048, 32768, 100, cap);
  const int64_t sum = std::accumulate(scaled.begin(), scaled.end(), int64_t{0});
  EXPECT_LE(sum + 1024 * 100, cap + 1024) << "rounding may add a token per request";
  EXPECT_GT(sum, cap / 2);
  EXPECT_EQ(ContextMix(3, 500, 500, 0, cap), std::vector<int64_t>(3, 500));
}

TEST(StepsCommon, BudgetHoldsTheLengthsItWasGiven) {
  for (const StepsLayout& layout : StepsLayouts()) {
    const std::vector<int64_t> lens = {1, 1000, 5000};
    const kvmem::KvCacheConfig config = StepsConfig(StepsShape{}, layout, 4, 8192, 0);
    absl::StatusOr<int64_t> budget = BudgetFor(config, lens);
    ASSERT_TRUE(budget.ok()) << layout.name << ": " << budget.status();
    EXPECT_GE(*budget, 6001 * config.TokenBytes()) << layout.name;
    absl::StatusOr<std::unique_ptr<kvmem::KvCache>> cache =
        MakeStepsCache(StepsShape{}, layout, 4, 8192, lens, 1.0);
    ASSERT_TRUE(cache.ok()) << layout.name << ": " << cache.status();
    std::vector<int64_t> scratch;
    for (size_t i = 0; i < lens.size(); ++i) {
      ASSERT_TRUE((*cache)->AddRequest(i + 1).ok());
      EXPECT_TRUE(Prefill(cache->get(), i + 1, lens[i], &scratch).ok()) << layout.name;
    }
  }
}

TEST(StepsCommon, SummarizeDividesByUnits) {
  const Sample s = Summarize({300, 100, 200, 1000}, 10);
  EXPECT_DOUBLE_EQ(s.min, 10);
  EXPECT_DOUBLE_EQ(s.median, 30);  // the upper median of an even count
  EXPECT_EQ(s.reps, 4);
  EXPECT_EQ(Summarize({}, 10).reps, 0);
}

TEST(StepsReport, ResultsFileHasTheSchemaKeys) {
  ReportRun run{"steps-x",
                "A \"title\"",
                "how",
                "ns/request",
                {{"per_request", "per-request calls", "kvbench steps"}},
                {"reps"},
                {ReportRow{"paged-16, B=64",
                           12.5,
                           {{"per_request", 40.0}},
                           {{"reps", "20"}},
                           "kvbench steps --layouts=paged-16"},
                 ReportRow{"virtual, B=64", std::string("failed: x"), {}, {}, "kvbench steps"}},
                {"a note"}};
  const std::string json =
      ResultsJson({run}, "Host", "a CPU", "a compiler", "abc1234", "2026-01-01", "Shape.");
  for (const char* want :
       {"\"machine\": \"Host\"", "\"id\": \"steps-x\"", "\"title\": \"A \\\"title\\\"\"",
        "\"commit\": \"abc1234\"", "\"method\": \"Shape. how\"", "\"better\": \"lower\"",
        "\"key\": \"per_request\"", "\"kvmem\": 12.50", "\"anchors\": {\"per_request\": 40.00}",
        "\"anchor_commands\": {\"per_request\": \"kvbench steps --layouts=paged-16\"}",
        "\"extra\": {\"reps\": \"20\"}", "\"kvmem\": \"failed: x\"", "\"notes\": [\"a note\"]"}) {
    EXPECT_TRUE(absl::StrContains(json, want)) << want << " not in\n" << json;
  }
  EXPECT_EQ(FormatNumber(1234.6), "1235");
  EXPECT_EQ(FormatNumber(0.12345), "0.123");
}

}  // namespace
}  // namespace kvbench
