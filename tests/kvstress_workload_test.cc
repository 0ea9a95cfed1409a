// kvstress's built-in mixes: every generated request is valid for the scheduler, a seed
// reproduces its workload, and each mix has the shape its description promises.
#include <cstdint>
#include <set>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "tools/kvstress/workload.h"

namespace kvstress {
namespace {

MixParams Params(Mix mix, uint64_t seed = 7) {
  MixParams p;
  p.mix = mix;
  p.seed = seed;
  p.arrival_rate = DefaultArrivalRate(mix);
  p.num_requests = 500;
  p.max_context = 8192;
  return p;
}

Workload MustGenerate(const MixParams& p) {
  absl::StatusOr<Workload> w = GenerateMix(p);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? *std::move(w) : Workload{};
}

TEST(KvstressWorkloadTest, EveryMixIsValidAndReproducible) {
  for (Mix mix : {Mix::kChat, Mix::kLongContext, Mix::kSharedPrefix, Mix::kAdversarial}) {
    SCOPED_TRACE(std::string(MixName(mix)));
    const Workload a = MustGenerate(Params(mix));
    EXPECT_EQ(a.requests.size(), 500u);
    EXPECT_TRUE(ValidateWorkload(a, 8192).ok()) << ValidateWorkload(a, 8192);
    EXPECT_FALSE(a.description.empty());
    const Workload b = MustGenerate(Params(mix));
    const Workload c = MustGenerate(Params(mix, 8));
    bool same = true, differs = false;
    for (size_t i = 0; i < a.requests.size(); ++i) {
      same &= a.requests[i].prompt_len == b.requests[i].prompt_len &&
              a.requests[i].output_len == b.requests[i].output_len &&
              a.requests[i].arrival_step == b.requests[i].arrival_step;
      differs |= a.requests[i].prompt_len != c.requests[i].prompt_len;
    }
    EXPECT_TRUE(same);
    EXPECT_TRUE(differs);
    // Poisson arrivals at the default rate: the last arrival is near n / rate.
    const double expected_span = 500 / DefaultArrivalRate(mix);
    EXPECT_GT(a.requests.back().arrival_step, 0.7 * expected_span);
    EXPECT_LT(a.requests.back().arrival_step, 1.3 * expected_span);
  }
}

TEST(KvstressWorkloadTest, MixesHaveTheirShape) {
  const Workload shared = MustGenerate(Params(Mix::kSharedPrefix));
  std::set<int32_t> groups;
  for (const Request& r : shared.requests) {
    groups.insert(r.prefix_group);
    EXPECT_GT(r.prompt_len, 1024);
  }
  EXPECT_EQ(groups, (std::set<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(shared.prefix_len, 1024);

  const Workload adv = MustGenerate(Params(Mix::kAdversarial));
  int growers = 0;
  for (const Request& r : adv.requests) {
    if (r.prompt_len + r.output_len == 8192) ++growers;
    EXPECT_EQ(r.prefix_group, -1);
  }
  EXPECT_EQ(growers, 500 / 16);

  const Workload chat = MustGenerate(Params(Mix::kChat));
  EXPECT_EQ(chat.prefix_len, 0);
  // Long-tailed prompts: the mean is well above the median of 512.
  EXPECT_GT(TotalPromptTokens(chat) / 500.0, 600);
}

TEST(KvstressWorkloadTest, BadParametersAreRejected) {
  MixParams p = Params(Mix::kChat);
  p.arrival_rate = 0;
  EXPECT_FALSE(GenerateMix(p).ok());
  p = Params(Mix::kChat);
  p.max_context = 8;
  EXPECT_FALSE(GenerateMix(p).ok());
  p = Params(Mix::kSharedPrefix);
  p.prefix_len = 5000;
  EXPECT_FALSE(GenerateMix(p).ok());
  p = Params(Mix::kSharedPrefix);
  p.num_prefixes = 0;
  EXPECT_FALSE(GenerateMix(p).ok());
  EXPECT_FALSE(ParseMix("video").ok());
}

}  // namespace
}  // namespace kvstress
