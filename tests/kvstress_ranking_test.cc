// The default chat workload, scaled down (--scale=0.05: 100 requests, 3.2 GiB, 51 rows,
// same model shape and pressure), ranks the policies as the design expects and meets
// the project's utilisation targets: paged-16 >= 97 % and virtual
// (all-layer) >= 95 % of held bytes live; static reservation far below.
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "tools/kvstress/options.h"
#include "tools/kvstress/run.h"
#include "tools/kvstress/scheduler.h"

namespace kvstress {
namespace {

class KvstressChatRankingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    FlagValues f;  // the defaults: chat, Llama-3-8B shape, 64 GiB, max_context 8192
    f.scale = 0.05;
    absl::StatusOr<RunConfig> rc = BuildRunConfig(f);
    ASSERT_TRUE(rc.ok()) << rc.status();
    absl::StatusOr<Workload> w = MakeWorkload(*rc);
    ASSERT_TRUE(w.ok()) << w.status();
    results_ = new std::map<std::string, SimResult>;
    for (const Policy& p : rc->policies) {
      absl::StatusOr<SimResult> r = Simulate(*w, p, PolicyConfig(p, rc->base), rc->sim);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_TRUE(r->drained) << p.name;
      EXPECT_EQ(r->finished, static_cast<int64_t>(w->requests.size())) << p.name;
      EXPECT_EQ(r->output_tokens, TotalOutputTokens(*w)) << p.name;
      (*results_)[p.name] = *std::move(r);
    }
  }
  static void TearDownTestSuite() { delete results_; }
  static double Util(const std::string& policy) { return results_->at(policy).utilisation_mean; }

  static std::map<std::string, SimResult>* results_;
};
std::map<std::string, SimResult>* KvstressChatRankingTest::results_ = nullptr;

TEST_F(KvstressChatRankingTest, SmallerPagesWasteLess) {
  ASSERT_EQ(results_->size(), 7u);
  EXPECT_LT(Util("static"), Util("paged-64"));
  EXPECT_LT(Util("paged-64"), Util("paged-16"));
  EXPECT_LE(Util("paged-16"), Util("paged-1"));
  EXPECT_LT(Util("virtual-layer"), Util("virtual"));
  // Chunks of 512 tokens waste up to 64 MiB per request, per-layer pages up to 128 MiB,
  // all-layer pages under 2 MiB.
  EXPECT_LT(Util("virtual-layer"), Util("virtual-chunk"));
  EXPECT_LT(Util("virtual-chunk"), Util("virtual"));
}

TEST_F(KvstressChatRankingTest, StaticReservationIsFarLower) {
  // A chat request uses a few hundred of its 8192 reserved tokens.
  EXPECT_LT(Util("static"), 0.5);
  // Fewer requests fit, so the same work takes more steps.
  EXPECT_LT(results_->at("static").peak_running, results_->at("paged-16").peak_running);
  EXPECT_GT(results_->at("static").steps, results_->at("paged-16").steps);
  // And requests queue for longer before their prefill: the table's wait column.
  EXPECT_GT(results_->at("static").mean_wait_steps, 2 * results_->at("paged-16").mean_wait_steps);
}

TEST_F(KvstressChatRankingTest, PagedSixteenMeetsTarget) { EXPECT_GE(Util("paged-16"), 0.97); }

TEST_F(KvstressChatRankingTest, VirtualAllLayerMeetsTarget) {
  // One 2 MiB page holds 16 tokens of all 32 layers, so a request wastes under one page,
  // as paged-16 does.
  EXPECT_GE(Util("virtual"), 0.95)
      << "held bytes (Stats) of the virtual layout include pages still mapped beyond a live "
         "row's length: a request reusing an idle row (deferred reclamation) inherits all of "
         "its pages; see docs/kvstress.md";
}

}  // namespace
}  // namespace kvstress
