// Tests of the CUDA driver backend (MakeCudaVmm): memory really mapped on the device and
// readable through the CUDA runtime, aliasing, handles keeping their bytes across unmap
// and remap, the same preconditions as the host backend, Copy ordering, fences, driver
// errors as statuses (out of memory is ResourceExhausted), counters under concurrency,
// and the clear Unavailable status where there is no driver or no GPU (that test runs
// everywhere; the others skip, saying why).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocators/vmm/cuda_driver.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvmem/vmm.h"
#include "tests/gpu/gpu_test_util.h"

namespace kvmem {
namespace {

using ::testing::HasSubstr;

int Op(VmmOp op) { return static_cast<int>(op); }

template <typename T>
T ValueOrDie(absl::StatusOr<T> v) {
  if (!v.ok()) {
    ADD_FAILURE() << v.status();
    return T{};
  }
  return *std::move(v);
}

// Bytes with a position- and seed-dependent pattern, never all zeros.
std::vector<uint8_t> Pattern(int64_t bytes, uint32_t seed) {
  std::vector<uint8_t> v(bytes);
  uint32_t x = seed * 2654435761u + 1;
  for (auto& b : v) {
    x = x * 1664525u + 1013904223u;
    b = static_cast<uint8_t>(x >> 24);
  }
  return v;
}

std::vector<uint8_t> ReadDevice(uintptr_t addr, int64_t bytes) {
  std::vector<uint8_t> v(bytes);
  const cudaError_t e =
      cudaMemcpy(v.data(), reinterpret_cast<const void*>(addr), bytes, cudaMemcpyDeviceToHost);
  EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
  return v;
}

void WriteDevice(uintptr_t addr, const std::vector<uint8_t>& v) {
  const cudaError_t e =
      cudaMemcpy(reinterpret_cast<void*>(addr), v.data(), v.size(), cudaMemcpyHostToDevice);
  EXPECT_EQ(e, cudaSuccess) << cudaGetErrorString(e);
}

// Runs everywhere: without a driver or a GPU the backend is an Unavailable status.
TEST(CudaVmmAvailability, MissingDriverOrDeviceIsUnavailableNotACrash) {
  absl::StatusOr<std::unique_ptr<Vmm>> vmm = MakeCudaVmm(0);
  if (!vmm.ok()) {
    EXPECT_EQ(vmm.status().code(), absl::StatusCode::kUnavailable) << vmm.status();
    EXPECT_FALSE(vmm.status().message().empty());
    std::printf("[   INFO   ] no CUDA backend here: %s\n", vmm.status().ToString().c_str());
  }
  // An ordinal no machine has: Unavailable (no such device, or no driver at all).
  absl::StatusOr<std::unique_ptr<Vmm>> far = MakeCudaVmm(1 << 20);
  EXPECT_EQ(far.status().code(), absl::StatusCode::kUnavailable) << far.status();
  absl::StatusOr<std::unique_ptr<Vmm>> negative = MakeCudaVmm(-1);
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument) << negative.status();
}

class CudaVmmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Vmm>> vmm = MakeCudaVmm(0);
    SKIP_WITHOUT_CUDA_VMM(vmm);
    vmm_ = std::move(*vmm);
    g_ = vmm_->granularity();
    // The runtime (used here to read and write device memory) must share the primary
    // context the backend retained.
    ASSERT_CUDA(cudaSetDevice(0));
  }

  std::unique_ptr<Vmm> vmm_;
  int64_t g_ = 0;
};

TEST_F(CudaVmmTest, ReportsGranularityAndIdentity) {
  EXPECT_EQ(vmm_->name(), "cuda");
  EXPECT_TRUE(vmm_->is_device());
  EXPECT_GE(g_, 64 << 10);
  EXPECT_EQ(g_ & (g_ - 1), 0) << g_;
  std::printf("[   INFO   ] CUDA VMM granularity (minimum): %lld bytes\n",
              static_cast<long long>(g_));
  const VmmCounters c = vmm_->counters();
  EXPECT_EQ(c.live_reservations, 0);
  EXPECT_EQ(c.live_handles, 0);
  EXPECT_EQ(c.mapped_granules, 0);
}

TEST_F(CudaVmmTest, MappedMemoryIsDeviceMemoryTheRuntimeCanUse) {
  const uintptr_t base = ValueOrDie(vmm_->Reserve(4 * g_));
  ASSERT_NE(base, 0u);
  EXPECT_EQ(base % g_, 0u);
  const PhysHandle h0 = ValueOrDie(vmm_->Create());
  const PhysHandle h1 = ValueOrDie(vmm_->Create());
  ASSERT_NE(h0, h1);
  ASSERT_OK(vmm_->Map(base + g_, h0));
  ASSERT_OK(vmm_->Map(base + 2 * g_, h1));
  ASSERT_OK(vmm_->SetAccess(base + g_, 2 * g_));  // one call over two mappings

  cudaPointerAttributes attr{};
  ASSERT_CUDA(cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(base + g_)));
  EXPECT_EQ(attr.type, cudaMemoryTypeDevice);
  EXPECT_EQ(attr.device, 0);

  const std::vector<uint8_t> data = Pattern(2 * g_, 1);
  WriteDevice(base + g_, data);  // crosses the boundary between the two handles
  EXPECT_EQ(ReadDevice(base + g_, 2 * g_), data);

  VmmCounters c = vmm_->counters();
  EXPECT_EQ(c.calls[Op(VmmOp::kReserve)], 1);
  EXPECT_EQ(c.calls[Op(VmmOp::kCreate)], 2);
  EXPECT_EQ(c.calls[Op(VmmOp::kMap)], 2);
  EXPECT_EQ(c.calls[Op(VmmOp::kSetAccess)], 1);
  EXPECT_GT(c.nanos[Op(VmmOp::kCreate)], 0);
  EXPECT_EQ(c.live_reservations, 1);
  EXPECT_EQ(c.live_handles, 2);
  EXPECT_EQ(c.mapped_granules, 2);

  ASSERT_OK(vmm_->Unmap(base + g_, 2 * g_));  // one call over two mappings
  ASSERT_OK(vmm_->Release(h0));
  ASSERT_OK(vmm_->Release(h1));
  ASSERT_OK(vmm_->FreeReservation(base, 4 * g_));
  c = vmm_->counters();
  EXPECT_EQ(c.live_reservations, 0);
  EXPECT_EQ(c.live_handles, 0);
  EXPECT_EQ(c.mapped_granules, 0);
  EXPECT_EQ(c.calls[Op(VmmOp::kUnmap)], 1);
  EXPECT_EQ(c.calls[Op(VmmOp::kRelease)], 2);
  EXPECT_EQ(c.calls[Op(VmmOp::kFreeReservation)], 1);
}

TEST_F(CudaVmmTest, AliasedMappingsShareBytes) {
  const uintptr_t a = ValueOrDie(vmm_->Reserve(2 * g_));
  const uintptr_t b = ValueOrDie(vmm_->Reserve(g_));
  const PhysHandle h = ValueOrDie(vmm_->Create());
  ASSERT_OK(vmm_->Map(a, h));
  ASSERT_OK(vmm_->Map(a + g_, h));  // twice in one reservation
  ASSERT_OK(vmm_->Map(b, h));       // and once in another
  ASSERT_OK(vmm_->SetAccess(a, 2 * g_));
  ASSERT_OK(vmm_->SetAccess(b, g_));
  EXPECT_EQ(vmm_->counters().mapped_granules, 3);

  const std::vector<uint8_t> data = Pattern(g_, 2);
  WriteDevice(a + g_, data);
  EXPECT_EQ(ReadDevice(a, g_), data);
  EXPECT_EQ(ReadDevice(b, g_), data);

  // A mapped handle cannot be released, not even once only one mapping is left.
  EXPECT_EQ(vmm_->Release(h).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_OK(vmm_->Unmap(a, 2 * g_));
  EXPECT_EQ(vmm_->Release(h).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ReadDevice(b, g_), data);
  ASSERT_OK(vmm_->Unmap(b, g_));
  ASSERT_OK(vmm_->Release(h));
  ASSERT_OK(vmm_->FreeReservation(a, 2 * g_));
  ASSERT_OK(vmm_->FreeReservation(b, g_));
}

// Recycled handles (the virtual layout's pool) keep their contents when unmapped and
// mapped again elsewhere.
TEST_F(CudaVmmTest, HandleKeepsBytesAcrossUnmapAndRemap) {
  constexpr int kN = 8;
  const uintptr_t r1 = ValueOrDie(vmm_->Reserve(kN * g_));
  const uintptr_t r2 = ValueOrDie(vmm_->Reserve(kN * g_));
  std::vector<PhysHandle> hs;
  for (int i = 0; i < kN; ++i) {
    hs.push_back(ValueOrDie(vmm_->Create()));
    ASSERT_OK(vmm_->Map(r1 + i * g_, hs.back()));
  }
  ASSERT_OK(vmm_->SetAccess(r1, kN * g_));
  const std::vector<uint8_t> data = Pattern(kN * g_, 3);
  WriteDevice(r1, data);
  ASSERT_OK(vmm_->Unmap(r1, kN * g_));
  EXPECT_EQ(vmm_->counters().mapped_granules, 0);
  // Map in reverse order: granule i of r2 is handle kN-1-i.
  for (int i = 0; i < kN; ++i) ASSERT_OK(vmm_->Map(r2 + i * g_, hs[kN - 1 - i]));
  ASSERT_OK(vmm_->SetAccess(r2, kN * g_));
  const std::vector<uint8_t> got = ReadDevice(r2, kN * g_);
  for (int i = 0; i < kN; ++i) {
    EXPECT_EQ(std::memcmp(got.data() + i * g_, data.data() + (kN - 1 - i) * g_, g_), 0)
        << "granule " << i;
  }
  ASSERT_OK(vmm_->Unmap(r2, kN * g_));
  for (PhysHandle h : hs) ASSERT_OK(vmm_->Release(h));
  ASSERT_OK(vmm_->FreeReservation(r1, kN * g_));
  ASSERT_OK(vmm_->FreeReservation(r2, kN * g_));
}

TEST_F(CudaVmmTest, PreconditionsMatchTheHostBackendAndChangeNothing) {
  const uintptr_t base = ValueOrDie(vmm_->Reserve(4 * g_));
  const PhysHandle h = ValueOrDie(vmm_->Create());
  ASSERT_OK(vmm_->Map(base, h));
  const VmmCounters before = vmm_->counters();

  // Sizes and alignment.
  EXPECT_EQ(vmm_->Reserve(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vmm_->Reserve(g_ + 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vmm_->Map(base + 1, h).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vmm_->SetAccess(base, g_ / 2).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vmm_->Unmap(base + 4096, g_).code(), absl::StatusCode::kInvalidArgument);
  // Mapping state.
  EXPECT_EQ(vmm_->Map(base, h).code(), absl::StatusCode::kFailedPrecondition);        // mapped
  EXPECT_EQ(vmm_->Map(base + 4 * g_, h).code(), absl::StatusCode::kInvalidArgument);  // outside
  EXPECT_EQ(vmm_->Map(base + g_, h + 1000).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(vmm_->SetAccess(base, 2 * g_).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->Unmap(base + g_, g_).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->Release(h).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->Release(h + 1000).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(vmm_->FreeReservation(base, 4 * g_).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->FreeReservation(base, 2 * g_).code(), absl::StatusCode::kFailedPrecondition);
  // Mapped but no SetAccess yet: no copy.
  EXPECT_EQ(vmm_->Copy(base + 64, base, 64).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->Copy(base, base, -1).code(), absl::StatusCode::kInvalidArgument);

  const VmmCounters after = vmm_->counters();
  EXPECT_EQ(after.live_reservations, before.live_reservations);
  EXPECT_EQ(after.live_handles, before.live_handles);
  EXPECT_EQ(after.mapped_granules, before.mapped_granules);

  ASSERT_OK(vmm_->Unmap(base, g_));
  ASSERT_OK(vmm_->Release(h));
  EXPECT_EQ(vmm_->Release(h).code(), absl::StatusCode::kNotFound);  // stale id
  ASSERT_OK(vmm_->FreeReservation(base, 4 * g_));
  EXPECT_EQ(vmm_->FreeReservation(base, 4 * g_).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(CudaVmmTest, CopyAnyAlignmentAcrossGranules) {
  const uintptr_t base = ValueOrDie(vmm_->Reserve(4 * g_));
  std::vector<PhysHandle> hs;
  for (int i = 0; i < 4; ++i) {
    hs.push_back(ValueOrDie(vmm_->Create()));
    ASSERT_OK(vmm_->Map(base + i * g_, hs.back()));
  }
  ASSERT_OK(vmm_->SetAccess(base, 4 * g_));
  const std::vector<uint8_t> data = Pattern(4 * g_, 4);
  WriteDevice(base, data);
  // Source straddles granules 0/1; destination straddles 2/3; odd offsets and size.
  const int64_t src_off = g_ - 333, dst_off = 3 * g_ - 777, n = 12345;
  ASSERT_OK(vmm_->Copy(base + dst_off, base + src_off, n));
  std::vector<uint8_t> want = data;
  std::memcpy(want.data() + dst_off, data.data() + src_off, n);
  EXPECT_EQ(ReadDevice(base, 4 * g_), want);
  EXPECT_EQ(vmm_->counters().calls[Op(VmmOp::kCopy)], 1);
  ASSERT_OK(vmm_->Copy(base, base + g_, 0));  // nothing to do
  ASSERT_OK(vmm_->Unmap(base, 4 * g_));
  for (PhysHandle h : hs) ASSERT_OK(vmm_->Release(h));
  ASSERT_OK(vmm_->FreeReservation(base, 4 * g_));
}

// Copy sees what earlier default-stream work wrote into its source, and later work sees
// the copy.
TEST_F(CudaVmmTest, CopyIsOrderedWithDefaultStreamWork) {
  const uintptr_t base = ValueOrDie(vmm_->Reserve(2 * g_));
  const PhysHandle h0 = ValueOrDie(vmm_->Create());
  const PhysHandle h1 = ValueOrDie(vmm_->Create());
  ASSERT_OK(vmm_->Map(base, h0));
  ASSERT_OK(vmm_->Map(base + g_, h1));
  ASSERT_OK(vmm_->SetAccess(base, 2 * g_));
  for (int round = 0; round < 8; ++round) {
    const int value = 0x11 * (round + 1);
    ASSERT_CUDA(cudaMemsetAsync(reinterpret_cast<void*>(base), value, g_, /*stream=*/0));
    ASSERT_OK(vmm_->Copy(base + g_, base, g_));
    const std::vector<uint8_t> got = ReadDevice(base + g_, g_);
    EXPECT_EQ(std::count(got.begin(), got.end(), static_cast<uint8_t>(value)), g_)
        << "round " << round;
  }
  ASSERT_OK(vmm_->Unmap(base, 2 * g_));
  ASSERT_OK(vmm_->Release(h0));
  ASSERT_OK(vmm_->Release(h1));
  ASSERT_OK(vmm_->FreeReservation(base, 2 * g_));
}

// A stream held back by a host function: its event is the fence of work in flight.
TEST_F(CudaVmmTest, FenceCompletesOnlyWhenItsEventDoes) {
  EXPECT_TRUE(vmm_->FenceComplete(Fence{}));
  cudaStream_t stream;
  ASSERT_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaEvent_t event;
  ASSERT_CUDA(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  static std::atomic<bool> release{false};
  release = false;
  ASSERT_CUDA(cudaLaunchHostFunc(
      stream,
      [](void*) {
        while (!release.load()) std::this_thread::yield();
      },
      nullptr));
  ASSERT_CUDA(cudaEventRecord(event, stream));
  const Fence fence{static_cast<void*>(event)};
  for (int i = 0; i < 100; ++i) EXPECT_FALSE(vmm_->FenceComplete(fence));
  release = true;
  ASSERT_CUDA(cudaEventSynchronize(event));
  EXPECT_TRUE(vmm_->FenceComplete(fence));
  // From another thread (no current context there) too.
  bool from_thread = false;
  std::thread([&] { from_thread = vmm_->FenceComplete(fence); }).join();
  EXPECT_TRUE(from_thread);
  ASSERT_CUDA(cudaEventDestroy(event));
  ASSERT_CUDA(cudaStreamDestroy(stream));
}

TEST_F(CudaVmmTest, DriverErrorsKeepNameAndTextAndMapCodes) {
  const internal::CudaDriver* driver = ValueOrDie(internal::GetCudaDriver());
  ASSERT_NE(driver, nullptr);
  const absl::Status oom = internal::CudaStatus(driver, CUDA_ERROR_OUT_OF_MEMORY, "cuMemCreate");
  EXPECT_EQ(oom.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(oom.message(), HasSubstr("cuMemCreate: CUDA_ERROR_OUT_OF_MEMORY ("));
  const absl::Status bad = internal::CudaStatus(driver, CUDA_ERROR_ILLEGAL_ADDRESS, "x");
  EXPECT_EQ(bad.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(bad.message(), HasSubstr("CUDA_ERROR_ILLEGAL_ADDRESS"));
  EXPECT_TRUE(internal::CudaStatus(driver, CUDA_SUCCESS, "x").ok());
  // A real failure from the driver: more address space than any GPU has.
  absl::StatusOr<uintptr_t> huge = vmm_->Reserve(int64_t{1} << 62);
  ASSERT_FALSE(huge.ok());
  EXPECT_THAT(huge.status().message(), HasSubstr("cuMemAddressReserve"));
  EXPECT_THAT(huge.status().message(), HasSubstr("CUDA_ERROR_"));
  EXPECT_EQ(vmm_->counters().live_reservations, 0);
}

// Threads without a current context, all at once: every call lands, counters add up.
TEST_F(CudaVmmTest, ConcurrentCallsFromThreadsWithoutAContext) {
  constexpr int kThreads = 8, kIters = 25;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      absl::StatusOr<uintptr_t> base = vmm_->Reserve(2 * g_);
      if (!base.ok()) {
        ++failures;
        return;
      }
      for (int i = 0; i < kIters; ++i) {
        absl::StatusOr<PhysHandle> h = vmm_->Create();
        if (!h.ok()) {
          ++failures;
          continue;
        }
        const uintptr_t at = *base + (i % 2) * g_;
        if (!vmm_->Map(at, *h).ok() || !vmm_->SetAccess(at, g_).ok() || !vmm_->Unmap(at, g_).ok()) {
          ++failures;
        }
        if (!vmm_->Release(*h).ok()) ++failures;
      }
      if (!vmm_->FreeReservation(*base, 2 * g_).ok()) ++failures;
      (void)t;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  const VmmCounters c = vmm_->counters();
  EXPECT_EQ(c.calls[Op(VmmOp::kCreate)], kThreads * kIters);
  EXPECT_EQ(c.calls[Op(VmmOp::kMap)], kThreads * kIters);
  EXPECT_EQ(c.calls[Op(VmmOp::kUnmap)], kThreads * kIters);
  EXPECT_EQ(c.calls[Op(VmmOp::kRelease)], kThreads * kIters);
  EXPECT_EQ(c.live_reservations, 0);
  EXPECT_EQ(c.live_handles, 0);
  EXPECT_EQ(c.mapped_granules, 0);
}

// Released memory goes back to the device, and a backend destroyed with resources still
// held gives them back too (logging a warning).
TEST_F(CudaVmmTest, MemoryGoesBackToTheDevice) {
  constexpr int kN = 64;
  size_t free0 = 0, free1 = 0, free2 = 0, total = 0;
  ASSERT_CUDA(cudaMemGetInfo(&free0, &total));
  {
    std::unique_ptr<Vmm> leaky = ValueOrDie(MakeCudaVmm(0));
    ASSERT_NE(leaky, nullptr);
    const uintptr_t base = ValueOrDie(leaky->Reserve(kN * g_));
    for (int i = 0; i < kN; ++i) {
      const PhysHandle h = ValueOrDie(leaky->Create());
      ASSERT_OK(leaky->Map(base + i * g_, h));
    }
    ASSERT_OK(leaky->SetAccess(base, kN * g_));
    ASSERT_CUDA(cudaMemGetInfo(&free1, &total));
    EXPECT_LE(free1 + kN * g_, free0 + g_) << "the handles did not take device memory";
  }  // destroyed holding everything
  ASSERT_CUDA(cudaMemGetInfo(&free2, &total));
  EXPECT_GE(free2 + 4 * g_, free0) << "leaked handles were not released by the destructor";
}

// Filtered out under compute-sanitizer (it exhausts device memory).
TEST_F(CudaVmmTest, OutOfMemoryIsResourceExhaustedAndRecoverable) {
  size_t free_bytes = 0, total = 0;
  ASSERT_CUDA(cudaMemGetInfo(&free_bytes, &total));
  const int64_t limit = static_cast<int64_t>(total / g_) + 64;
  std::vector<PhysHandle> hs;
  hs.reserve(limit);
  absl::Status last;
  for (int64_t i = 0; i < limit; ++i) {
    absl::StatusOr<PhysHandle> h = vmm_->Create();
    if (!h.ok()) {
      last = h.status();
      break;
    }
    hs.push_back(*h);
  }
  ASSERT_FALSE(last.ok()) << "created " << hs.size() << " handles without running out";
  EXPECT_EQ(last.code(), absl::StatusCode::kResourceExhausted) << last;
  EXPECT_THAT(last.message(), HasSubstr("CUDA_ERROR_OUT_OF_MEMORY"));
  std::printf("[   INFO   ] out of memory after %zu handles (%.1f GiB): %s\n", hs.size(),
              hs.size() * static_cast<double>(g_) / (1 << 30), last.ToString().c_str());
  EXPECT_EQ(vmm_->counters().live_handles, static_cast<int64_t>(hs.size()));
  for (PhysHandle h : hs) ASSERT_OK(vmm_->Release(h));
  // Recovered: memory can be had again.
  const PhysHandle again = ValueOrDie(vmm_->Create());
  ASSERT_OK(vmm_->Release(again));
  EXPECT_EQ(vmm_->counters().live_handles, 0);
}

}  // namespace
}  // namespace kvmem
