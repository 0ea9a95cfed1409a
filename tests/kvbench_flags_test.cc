// Tests of kvbench's command lines (tools/kvbench/flags.h, settings.h): the one syntax
// every subcommand parses, the errors it gives, --help, and each subcommand's Validate.
// Host only: the settings are plain C++, whatever the benchmarks run on.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "tools/kvbench/flags.h"
#include "tools/kvbench/settings.h"

namespace kvbench {
namespace {

enum class Color { kRed, kGreen };

struct Toy {
  bool on = false;
  int n = 7;
  int64_t big = 1;
  std::string name = "x";
  Color color = Color::kGreen;
};

FlagSet ToyFlags(Toy* t) {
  FlagSet f("kvbench toy", "a toy");
  f.Bool("on", &t->on, "a switch");
  f.Int("n", &t->n, "a number");
  f.Int64("big", &t->big, "a big number");
  f.String("name", &t->name, "a name");
  f.Choice("color", &t->color, {{"red", Color::kRed}, {"green", Color::kGreen}}, "a color");
  return f;
}

TEST(KvbenchFlags, ParsesEveryType) {
  Toy t;
  FlagSet f = ToyFlags(&t);
  ASSERT_TRUE(f.Parse({"--on", "--n=-3", "--big=8589934592", "--name=a=b", "--color=red"}).ok());
  EXPECT_TRUE(t.on);
  EXPECT_EQ(t.n, -3);
  EXPECT_EQ(t.big, int64_t{8} << 30);
  EXPECT_EQ(t.name, "a=b");  // the value is everything after the first '='
  EXPECT_EQ(t.color, Color::kRed);
  EXPECT_FALSE(f.help_requested());
  ASSERT_TRUE(f.Parse({"--on=false", "--n=1", "--n=2", "--name="}).ok());
  EXPECT_FALSE(t.on);
  EXPECT_EQ(t.n, 2) << "the last value wins";
  EXPECT_EQ(t.name, "");
}

TEST(KvbenchFlags, ErrorsNameTheFlagAndWhatItWants) {
  struct Bad {
    std::vector<std::string> args;
    std::vector<std::string> in_message;
  };
  const Bad bad[] = {
      {{"--nope=1"}, {"unknown flag --nope", "--on --n --big --name --color"}},
      {{"--n=x"}, {"--n=x", "integer"}},
      {{"--n=1.5"}, {"--n=1.5", "integer"}},
      {{"--big=99999999999999999999"}, {"--big", "integer"}},
      {{"--n"}, {"--n needs a value", "--n=N"}},
      {{"--on=yes"}, {"--on=yes", "true or false"}},
      {{"--color=blue"}, {"--color=blue", "red|green"}},
      {{"n=1"}, {"unexpected argument 'n=1'"}},
      {{"-n=1"}, {"unexpected argument"}},
      {{"--"}, {"unexpected argument"}},
  };
  for (const Bad& b : bad) {
    Toy t;
    FlagSet f = ToyFlags(&t);
    const absl::Status s = f.Parse(b.args);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << b.args[0];
    for (const std::string& want : b.in_message) {
      EXPECT_TRUE(absl::StrContains(s.message(), want)) << s << " lacks " << want;
    }
  }
}

TEST(KvbenchFlags, DashesGetAHint) {
  DecodeSettings s;
  FlagSet f("kvbench decode", "");
  DeclareFlags(&s, &f);
  const absl::Status st = f.Parse({"--spacer-us=3"});
  EXPECT_TRUE(absl::StrContains(st.message(), "did you mean --spacer_us?")) << st;
}

TEST(KvbenchFlags, HelpListsEveryFlagWithItsDefault) {
  Toy t;
  FlagSet f = ToyFlags(&t);
  ASSERT_TRUE(f.Parse({"--n=3", "--help", "--nope"}).ok()) << "--help stops the parse";
  EXPECT_TRUE(f.help_requested());
  const std::string help = f.Help();
  for (const char* line : {"usage: kvbench toy [flags]", "--on (default false)",
                           "--n=N (default 7)", "--big=N (default 1)", "--name=TEXT (default x)",
                           "--color=red|green (default green)", "--help"}) {
    EXPECT_TRUE(absl::StrContains(help, line)) << line << " not in\n" << help;
  }
}

TEST(KvbenchFlags, ParseCommandLineExitCodes) {
  Toy t;
  FlagSet f = ToyFlags(&t);
  int validated = 0;
  auto ok = [&] {
    ++validated;
    return absl::OkStatus();
  };
  EXPECT_EQ(ParseCommandLine(f, {"--n=1"}, ok), std::nullopt);
  EXPECT_EQ(validated, 1);
  EXPECT_EQ(ParseCommandLine(f, {"--help"}, ok), 0);
  FlagSet g = ToyFlags(&t);
  EXPECT_EQ(ParseCommandLine(g, {"--nope"}, ok), 2);
  EXPECT_EQ(ParseCommandLine(g, {}, [] { return absl::InvalidArgumentError("no"); }), 2);
  EXPECT_EQ(validated, 1) << "neither --help nor a parse error validates";
}

// Parses `command` ("--a=1 --b") into fresh settings and validates them.
template <typename Settings>
absl::Status Check(const std::string& command, Settings* s) {
  *s = Settings();
  FlagSet f("kvbench test", "");
  DeclareFlags(s, &f);
  std::vector<std::string> args;
  for (absl::string_view w : absl::StrSplit(command, ' ', absl::SkipEmpty())) {
    args.emplace_back(w);
  }
  if (absl::Status p = f.Parse(args); !p.ok()) return p;
  return Validate(s);
}

// The command lines that docs/gpu.md, docs/benchmarks/*.json and tools/gpu/ give.
TEST(KvbenchSettings, DocumentedCommandsParse) {
  DecodeSettings d;
  for (const char* c : {"", "--d1", "--d2", "--d1 --filter=virtual-all --chunk=1",
                        "--d1 --filter=virtual-all --chunk=256", "--d1 --batch=64 --graph",
                        "--quick --pool=shuffled --placement=lowest-first --stages=2 --spread",
                        "--balance --virtual=tensor --layers=0 --repeat=3 --spacer_us=20",
                        "--d1 --batch=64 --filter=paged --trace_csv=/tmp/x.csv"}) {
    EXPECT_TRUE(Check(c, &d).ok()) << "decode " << c << ": " << Check(c, &d);
  }
  PrefillSettings p;
  for (const char* c : {"", "--reps=50", "--reps=50 --kernel=mma --shapes=p16k",
                        "--chunk=1 --layouts=virtual-all --seq_pages --settle_ms=0"}) {
    EXPECT_TRUE(Check(c, &p).ok()) << "prefill " << c << ": " << Check(c, &p);
  }
  MapperSettings m;
  for (const char* c : {"", "--chunk=0", "--chunk=0 --modes=on --map_ahead=64", "--chunk=1",
                        "--chunk=1 --modes=on --map_ahead=64"}) {
    EXPECT_TRUE(Check(c, &m).ok()) << "mapper " << c << ": " << Check(c, &m);
  }
  VmmSettings v;
  EXPECT_TRUE(Check("--backend=host --handles=8 --rounds=1 --batch=8", &v).ok());
  StepsSettings st;
  for (const char* c : {"", "--quick", "--quick --json=/tmp/steps.json",
                        "--scenarios=decode --layouts=paged-16 --batches=64 --context=2048-32768",
                        "--layers=1 --granularity=2097152 --reps=200 --warmup=20 --max_ms=2000 "
                        "--max_tokens=16777216 --scenarios=pressure --pressure_batch=1024"}) {
    EXPECT_TRUE(Check(c, &st).ok()) << "steps " << c << ": " << Check(c, &st);
  }
}

TEST(KvbenchSettings, StepsDefaultsAndLists) {
  StepsSettings s;
  ASSERT_TRUE(Check("", &s).ok());
  EXPECT_EQ(s.reps, 200);
  EXPECT_EQ(s.warmup, 20);
  EXPECT_EQ(s.max_ms, 2000);
  EXPECT_EQ(s.max_tokens, int64_t{16} << 20);
  EXPECT_EQ(s.pressure_batch, 1024);
  EXPECT_EQ(s.batch_list, (std::vector<int>{64, 256, 1024, 4096}));
  EXPECT_EQ(s.prefill_list, (std::vector<int64_t>{512, 2048, 8192, 32768}));
  EXPECT_EQ(s.row_list, (std::vector<int>{64, 4096}));
  EXPECT_EQ(s.fork_list, (std::vector<int64_t>{2048, 8192, 32768}));
  EXPECT_EQ(s.rewind_list, (std::vector<int>{64, 256}));
  EXPECT_EQ(s.context_min, 2048);
  EXPECT_EQ(s.context_max, 32768);
  ASSERT_EQ(s.layout_list.size(), StepsLayouts().size());
  EXPECT_EQ(s.layout_list[0].name, "paged-1");
  EXPECT_EQ(s.layout_list[0].page_tokens, 1);
  EXPECT_EQ(s.layout_list[4].name, "virtual");
  EXPECT_EQ(s.layout_list[4].chunk_tokens, 1);
  EXPECT_EQ(s.layout_list[5].arrangement, kvmem::Arrangement::kPerLayer);

  ASSERT_TRUE(Check("--quick", &s).ok());
  EXPECT_EQ(s.reps, 20);
  EXPECT_EQ(s.warmup, 3);
  EXPECT_EQ(s.max_tokens, int64_t{1} << 20);
  EXPECT_EQ(s.pressure_batch, 64);
  EXPECT_EQ(s.batch_list, (std::vector<int>{64, 256}));
  EXPECT_EQ(s.context_max, 8192);

  ASSERT_TRUE(Check("--quick --reps=7 --warmup=0 --batches=4096,64 --context=1000 "
                    "--layouts=virtual-layer,paged-64",
                    &s)
                  .ok());
  EXPECT_EQ(s.reps, 7);
  EXPECT_EQ(s.warmup, 0);
  EXPECT_EQ(s.batch_list, (std::vector<int>{4096, 64}));
  EXPECT_EQ(s.context_min, 1000);
  EXPECT_EQ(s.context_max, 1000);
  ASSERT_EQ(s.layout_list.size(), 2u);
  EXPECT_EQ(s.layout_list[0].name, "paged-64") << "in the tables' order";
}

TEST(KvbenchSettings, StepsErrors) {
  StepsSettings s;
  for (const char* c : {"--layouts=paged-32",
                        "--layouts=",
                        "--scenarios=decode,serve",
                        "--batches=0",
                        "--batches=64,x",
                        "--batches=,",
                        "--context=0",
                        "--context=4096-2048",
                        "--context=1-2-3",
                        "--context=abc",
                        "--prefill=-1",
                        "--rows=8",
                        "--fork=0",
                        "--rewind=0",
                        "--reps=-1",
                        "--warmup=-2",
                        "--max_ms=-1",
                        "--max_tokens=-1",
                        "--pressure_batch=-1",
                        "--layers=0",
                        "--granularity=3000",
                        "--granularity=2048"}) {
    EXPECT_EQ(Check(c, &s).code(), absl::StatusCode::kInvalidArgument) << c;
  }
}

TEST(KvbenchSettings, DecodeShapesAndDefaults) {
  DecodeSettings s;
  ASSERT_TRUE(Check("", &s).ok());
  EXPECT_EQ(s.reps, 100);
  EXPECT_EQ(s.warmup, 10);
  EXPECT_EQ(s.ceiling_bytes, int64_t{8} << 30);
  EXPECT_EQ(s.shapes.size(), 18u + 6u) << "D1 and D2";
  ASSERT_TRUE(Check("--quick", &s).ok());
  EXPECT_EQ(s.reps, 20);
  EXPECT_EQ(s.warmup, 3);
  EXPECT_EQ(s.ceiling_bytes, int64_t{2} << 30);
  ASSERT_TRUE(Check("--quick --reps=50", &s).ok());
  EXPECT_EQ(s.reps, 50);
  ASSERT_TRUE(Check("--d1", &s).ok());
  EXPECT_EQ(s.shapes.size(), 18u);
  for (const DecodeShape& sh : s.shapes) EXPECT_STREQ(sh.tag, "D1");
  ASSERT_TRUE(Check("--d2", &s).ok());
  EXPECT_EQ(s.shapes.size(), 6u);
  ASSERT_TRUE(Check("--d1 --d2", &s).ok());
  EXPECT_EQ(s.shapes.size(), 24u);
  ASSERT_TRUE(Check("--balance --page=64", &s).ok());
  ASSERT_EQ(s.shapes.size(), 9u);
  EXPECT_EQ(s.shapes[0].page_tokens, 64);
  EXPECT_EQ(s.shapes[0].long_ctx, 65536);
  ASSERT_TRUE(Check("--d1 --filter=virtual-all", &s).ok());
  EXPECT_EQ(s.shapes.size(), 6u);
  ASSERT_TRUE(Check("--d2 --filter=paged", &s).ok());
  EXPECT_EQ(s.shapes.size(), 4u);
  ASSERT_TRUE(Check("--batch=64", &s).ok());
  EXPECT_EQ(s.shapes.size(), 3u + 6u);
  ASSERT_TRUE(Check("--d1 --batch=64 --filter=paged --trace_csv=t.csv", &s).ok());
  EXPECT_TRUE(s.trace) << "--trace_csv implies --trace";
  EXPECT_EQ(s.pool, PoolKind::kGrown);
  ASSERT_TRUE(Check("--pool=grown-elastic --virtual=tensor", &s).ok());
  EXPECT_EQ(s.pool, PoolKind::kGrownElastic);
  EXPECT_FALSE(s.virtual_cache);
}

TEST(KvbenchSettings, DecodeErrors) {
  DecodeSettings s;
  for (const char* c : {"--reps=-1", "--page=0", "--repeat=0", "--chunk=3", "--stages=-1",
                        "--spacer_us=-5", "--layers=-1", "--batch=-2", "--filter=nothing",
                        "--d1 --batch=3", "--trace_csv=t.csv", "--pool=sorted"}) {
    EXPECT_EQ(Check(c, &s).code(), absl::StatusCode::kInvalidArgument) << c;
  }
}

TEST(KvbenchSettings, PrefillErrors) {
  PrefillSettings s;
  for (const char* c :
       {"--reps=0", "--warmup=-1", "--page=0", "--settle_ms=-1", "--chunk=0", "--chunk=48",
        "--layouts=paged,virtual", "--layouts=", "--shapes=p8k", "--kernel=wgmma"}) {
    EXPECT_EQ(Check(c, &s).code(), absl::StatusCode::kInvalidArgument) << c;
  }
  ASSERT_TRUE(Check("--kernel=both --layouts=paged", &s).ok());
  EXPECT_EQ(s.kernel, PrefillKernel::kBoth);
  EXPECT_TRUE(Listed(s.layouts, "paged"));
  EXPECT_FALSE(Listed(s.layouts, "virtual-all"));
}

TEST(KvbenchSettings, VmmAndMapper) {
  VmmSettings v;
  for (const char* c : {"--handles=0", "--rounds=0", "--batch=0", "--handles=4 --batch=8",
                        "--device=-1", "--backend=gpu"}) {
    EXPECT_EQ(Check(c, &v).code(), absl::StatusCode::kInvalidArgument) << c;
  }
#ifndef KVMEM_WITH_CUDA
  EXPECT_EQ(v.backend, VmmBackend::kHost) << "the default where the build has no CUDA";
  EXPECT_EQ(Check("--backend=cuda", &v).code(), absl::StatusCode::kInvalidArgument);
#endif

  MapperSettings m;
  ASSERT_TRUE(Check("", &m).ok());
  EXPECT_TRUE(m.mode_off && m.mode_on);
  ASSERT_TRUE(Check("--modes=on", &m).ok());
  EXPECT_FALSE(m.mode_off);
  EXPECT_TRUE(m.mode_on);
  for (const char* c : {"--modes=", "--modes=of", "--requests=0", "--steps=0", "--warmup=-1",
                        "--map_ahead=0", "--chunk=5", "--layers=0", "--kv_heads=1 --head_dim=4",
                        "--prompt_max=0", "--steps=1000000000"}) {
    EXPECT_EQ(Check(c, &m).code(), absl::StatusCode::kInvalidArgument) << c;
  }
}

}  // namespace
}  // namespace kvbench
