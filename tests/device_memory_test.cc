// The check of a layout's pool against the device's memory before Create creates any
// handle (allocators/vmm/device_memory.h), and the backends' AvailableMemory(): the host
// backend reports its physical cap as a device of that size, FaultInjectingVmm reports
// what a test sets (a small or a full device) and forwards otherwise. A pool created up
// front must fit the free memory (ResourceExhausted) and the device (InvalidArgument),
// with the numbers and the fixes in the message; a pool created as requests grow only
// warns, once per process.
#include "allocators/vmm/device_memory.h"

#include <algorithm>
#include <cstdint>
#include <memory>
#include <sstream>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvmem/kv_cache.h"
#include "kvmem/testing/fault_injecting_vmm.h"
#include "kvmem/vmm.h"
#include "spdlog/sinks/ostream_sink.h"
#include "src/core/logging.h"

namespace kvmem {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr int64_t kGran = 4096;
constexpr int64_t kMiB = int64_t{1} << 20;

std::shared_ptr<Vmm> Host(int64_t cap = 0) {
  absl::StatusOr<std::unique_ptr<Vmm>> vmm = MakeHostVmm(kGran, cap);
  EXPECT_TRUE(vmm.ok()) << vmm.status();
  return vmm.ok() ? std::shared_ptr<Vmm>(*std::move(vmm)) : nullptr;
}

// Lines the kvmem logger writes while it lives.
class LogCapture {
 public:
  LogCapture() : sink_(std::make_shared<spdlog::sinks::ostream_sink_mt>(out_)) {
    internal::Logger()->sinks().push_back(sink_);
  }
  ~LogCapture() { internal::Logger()->sinks().pop_back(); }
  std::string text() const { return out_.str(); }
  int64_t lines() const {
    const std::string t = out_.str();
    return std::count(t.begin(), t.end(), '\n');
  }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::sinks::ostream_sink_mt> sink_;
};

internal::DeviceMemoryNeed UpFront(int64_t pool_bytes) {
  return {.layout = "paged layout",
          .pool_bytes = pool_bytes,
          .created_up_front = true,
          .budget_bytes = pool_bytes,
          .min_budget_bytes = 2 * kGran,
          .grow_lazily_fix = "elastic_pool = true"};
}

TEST(AvailableMemory, HostBackendReportsItsCapLessLiveHandles) {
  std::shared_ptr<Vmm> vmm = Host(8 * kGran);
  ASSERT_NE(vmm, nullptr);
  absl::StatusOr<DeviceMemory> m = vmm->AvailableMemory();
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->free_bytes, 8 * kGran);
  EXPECT_EQ(m->total_bytes, 8 * kGran);
  EXPECT_FALSE(m->device.empty());
  absl::StatusOr<PhysHandle> a = vmm->Create();
  absl::StatusOr<PhysHandle> b = vmm->Create();
  ASSERT_TRUE(a.ok() && b.ok());
  m = vmm->AvailableMemory();
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->free_bytes, 6 * kGran);
  EXPECT_EQ(m->total_bytes, 8 * kGran);
  ASSERT_TRUE(vmm->Release(*a).ok());
  ASSERT_TRUE(vmm->Release(*b).ok());
  EXPECT_EQ(vmm->AvailableMemory()->free_bytes, 8 * kGran);
  // Not a backend call: not counted.
  int64_t calls = 0;
  for (int64_t c : vmm->counters().calls) calls += c;
  EXPECT_EQ(calls, 4);
}

TEST(AvailableMemory, HostBackendWithoutCapCannotTell) {
  std::shared_ptr<Vmm> vmm = Host();
  ASSERT_NE(vmm, nullptr);
  EXPECT_EQ(vmm->AvailableMemory().status().code(), absl::StatusCode::kUnimplemented);
}

TEST(AvailableMemory, FaultInjectingVmmForwardsOrReportsWhatIsSet) {
  FaultInjectingVmm vmm(Host(4 * kGran));
  ASSERT_TRUE(vmm.AvailableMemory().ok());
  EXPECT_EQ(vmm.AvailableMemory()->total_bytes, 4 * kGran);
  vmm.SetAvailableMemory({.free_bytes = kGran, .total_bytes = 2 * kGran, .device = "a test GPU"});
  absl::StatusOr<DeviceMemory> m = vmm.AvailableMemory();
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->free_bytes, kGran);
  EXPECT_EQ(m->total_bytes, 2 * kGran);
  EXPECT_EQ(m->device, "a test GPU");
  // Armed failures do not touch it (it is not a backend call), nor is it counted.
  vmm.FailFrom(VmmOp::kCreate, 1);
  vmm.FailNthAny(1);
  EXPECT_TRUE(vmm.AvailableMemory().ok());
  EXPECT_EQ(vmm.total_calls(), 0);
  vmm.ForwardAvailableMemory();
  EXPECT_EQ(vmm.AvailableMemory()->total_bytes, 4 * kGran);
  FaultInjectingVmm uncapped(Host());
  EXPECT_EQ(uncapped.AvailableMemory().status().code(), absl::StatusCode::kUnimplemented);
}

TEST(CheckDeviceMemory, UpFrontPoolWithinTheFreeMemoryPasses) {
  FaultInjectingVmm vmm(Host());
  vmm.SetAvailableMemory({.free_bytes = 16 * kGran, .total_bytes = 64 * kGran, .device = "gpu"});
  EXPECT_TRUE(internal::CheckDeviceMemory(vmm, UpFront(16 * kGran)).ok());
  EXPECT_TRUE(internal::CheckDeviceMemory(vmm, UpFront(0)).ok());
}

TEST(CheckDeviceMemory, UpFrontPoolBeyondTheFreeMemoryIsResourceExhaustedWithTheFixes) {
  FaultInjectingVmm vmm(Host());
  vmm.SetAvailableMemory(
      {.free_bytes = 10 * kGran + 100, .total_bytes = 64 * kGran, .device = "CUDA device 0 (X)"});
  const absl::Status s = internal::CheckDeviceMemory(vmm, UpFront(16 * kGran));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  const std::string m(s.message());
  EXPECT_THAT(m, HasSubstr("paged layout"));
  EXPECT_THAT(m, HasSubstr(absl::StrCat(16 * kGran,
                                        " bytes of physical memory up front (16 "
                                        "handles of 4096 bytes")));
  EXPECT_THAT(m, HasSubstr(absl::StrCat("CUDA device 0 (X) has ", 10 * kGran + 100,
                                        " bytes free of ", 64 * kGran)));
  // The fixes: the largest budget that fits (whole handles), the lazy pool, freeing memory.
  EXPECT_THAT(m, HasSubstr(absl::StrCat("memory_budget_bytes <= ", 10 * kGran)));
  EXPECT_THAT(m, HasSubstr("elastic_pool = true"));
  EXPECT_THAT(m, HasSubstr("free memory on the device"));
}

TEST(CheckDeviceMemory, UpFrontPoolBeyondTheWholeDeviceIsInvalidArgument) {
  FaultInjectingVmm vmm(Host());
  vmm.SetAvailableMemory({.free_bytes = 8 * kGran, .total_bytes = 12 * kGran, .device = "gpu"});
  internal::DeviceMemoryNeed need = UpFront(16 * kGran);
  need.layout = "virtual layout";
  need.grow_lazily_fix = "";
  const absl::Status s = internal::CheckDeviceMemory(vmm, need);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("virtual layout"));
  EXPECT_THAT(s.message(), HasSubstr(absl::StrCat("memory_budget_bytes <= ", 8 * kGran)));
  // Neither a lazy pool (the virtual layout has none) nor freeing memory would do.
  EXPECT_THAT(s.message(), Not(HasSubstr("elastic_pool")));
  EXPECT_THAT(s.message(), Not(HasSubstr("free memory on the device")));
}

TEST(CheckDeviceMemory, NoBudgetFitsWhenOneRequestDoesNot) {
  FaultInjectingVmm vmm(Host());
  vmm.SetAvailableMemory({.free_bytes = kGran, .total_bytes = 64 * kGran, .device = "gpu"});
  const absl::Status s = internal::CheckDeviceMemory(vmm, UpFront(16 * kGran));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_THAT(s.message(), Not(HasSubstr("memory_budget_bytes <=")));
  EXPECT_THAT(s.message(), HasSubstr(absl::StrCat("one request at max_context needs ", 2 * kGran)));
}

TEST(CheckDeviceMemory, ARealCappedBackendIsCheckedAgainstItsCap) {
  std::shared_ptr<Vmm> vmm = Host(8 * kGran);
  ASSERT_NE(vmm, nullptr);
  EXPECT_TRUE(internal::CheckDeviceMemory(*vmm, UpFront(8 * kGran)).ok());
  EXPECT_EQ(internal::CheckDeviceMemory(*vmm, UpFront(9 * kGran)).code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<PhysHandle> h = vmm->Create();
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(internal::CheckDeviceMemory(*vmm, UpFront(8 * kGran)).code(),
            absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(vmm->Release(*h).ok());
}

TEST(CheckDeviceMemory, BackendsThatCannotTellPass) {
  std::shared_ptr<Vmm> vmm = Host();
  ASSERT_NE(vmm, nullptr);
  EXPECT_TRUE(internal::CheckDeviceMemory(*vmm, UpFront(int64_t{1} << 50)).ok());
}

// A backend whose driver fails the query.
class BrokenDevice : public FaultInjectingVmm {
 public:
  using FaultInjectingVmm::FaultInjectingVmm;
  absl::StatusOr<DeviceMemory> AvailableMemory() const override {
    return absl::InternalError("cuMemGetInfo: CUDA_ERROR_ILLEGAL_ADDRESS");
  }
};

TEST(CheckDeviceMemory, AFailingQueryIsPassedUpWithTheLayout) {
  BrokenDevice vmm(Host());
  const absl::Status s = internal::CheckDeviceMemory(vmm, UpFront(kGran));
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_THAT(s.message(), HasSubstr("paged layout"));
  EXPECT_THAT(s.message(), HasSubstr("CUDA_ERROR_ILLEGAL_ADDRESS"));
}

// The only test in this binary that reaches the warning, so the first call here is the
// process's first.
TEST(CheckDeviceMemory, APoolCreatedAsRequestsGrowWarnsOncePerProcess) {
  FaultInjectingVmm vmm(Host());
  vmm.SetAvailableMemory({.free_bytes = 4 * kMiB, .total_bytes = 8 * kMiB, .device = "gpu 3"});
  internal::DeviceMemoryNeed need = UpFront(64 * kMiB);
  need.created_up_front = false;
  LogCapture log;
  // Within the free memory: nothing to say.
  internal::DeviceMemoryNeed small = need;
  small.pool_bytes = 4 * kMiB;
  EXPECT_TRUE(internal::CheckDeviceMemory(vmm, small).ok());
  EXPECT_EQ(log.lines(), 0) << log.text();
  // Beyond it (and beyond the whole device): no error, one warning, then none.
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(internal::CheckDeviceMemory(vmm, need).ok());
  EXPECT_EQ(log.lines(), 1) << log.text();
  EXPECT_THAT(log.text(), HasSubstr(absl::StrCat("may grow to ", 64 * kMiB, " bytes")));
  EXPECT_THAT(log.text(), HasSubstr(absl::StrCat(4 * kMiB, " bytes free on gpu 3")));
  EXPECT_THAT(log.text(), HasSubstr("once per process"));
}

// KvCache::Create runs the check: a virtual pool (every handle created up front) or a
// fixed paged pool larger than the device's free memory is refused before any handle is
// created; an elastic paged pool is created (it grows as requests do).
TEST(CheckDeviceMemory, CreateChecksThePoolItCreatesUpFront) {
  for (const bool virtual_layout : {true, false}) {
    for (const bool elastic : {true, false}) {
      if (virtual_layout && !elastic) continue;
      SCOPED_TRACE(virtual_layout ? "virtual" : (elastic ? "paged elastic" : "paged fixed"));
      auto vmm = std::make_shared<FaultInjectingVmm>(Host());
      vmm->SetAvailableMemory({.free_bytes = 2 * kMiB, .total_bytes = 64 * kMiB, .device = "gpu 0"});
      KvCacheConfig config;
      config.num_layers = 2;
      config.num_kv_heads = 2;
      config.head_dim = 8;
      config.dtype = DType::kFloat32;
      config.max_requests = 64;  // rows at max_context could use 16 MiB: the budget binds
      config.max_context = 1024;
      config.host_granularity = kGran;
      config.memory_budget_bytes = 8 * kMiB;
      config.layout = virtual_layout ? Layout::kVirtual : Layout::kPaged;
      config.elastic_pool = elastic;
      config.vmm = vmm;
      absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
      if (!virtual_layout && elastic) {
        EXPECT_TRUE(cache.ok()) << cache.status();
        continue;
      }
      ASSERT_FALSE(cache.ok());
      EXPECT_EQ(cache.status().code(), absl::StatusCode::kResourceExhausted) << cache.status();
      EXPECT_THAT(std::string(cache.status().message()), HasSubstr("gpu 0"));
      EXPECT_EQ(vmm->counters().live_handles, 0);
    }
  }
}

}  // namespace
}  // namespace kvmem
