// Tests of the host memory backend (MakeHostVmm): real reservations, memfd-backed
// physical handles, aliasing, access control, error paths that must change nothing,
// the physical cap, counters, scale and concurrency. Page protections are probed by
// letting the kernel copy through a pipe (EFAULT instead of a signal), so no test
// ever touches an inaccessible address itself.
#include "allocators/vmm/host_vmm.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvmem/vmm.h"
#include "spdlog/sinks/ostream_sink.h"
#include "src/core/logging.h"

namespace kvmem {
namespace {

using ::testing::HasSubstr;

constexpr int64_t k4K = 4096;
constexpr int64_t k2M = int64_t{2} << 20;

int Op(VmmOp op) { return static_cast<int>(op); }

// True when the kernel can read one byte at `addr` (false on EFAULT: not readable).
bool Readable(uintptr_t addr) {
  int fds[2];
  if (pipe(fds) != 0) return false;
  const ssize_t n = write(fds[1], reinterpret_cast<const void*>(addr), 1);
  close(fds[0]);
  close(fds[1]);
  return n == 1;
}

// True when the kernel can write one byte at `addr`. Writes the byte already there.
bool Writable(uintptr_t addr) {
  if (!Readable(addr)) return false;
  int fds[2];
  if (pipe(fds) != 0) return false;
  const char c = *reinterpret_cast<const volatile char*>(addr);
  bool ok = write(fds[1], &c, 1) == 1 && read(fds[0], reinterpret_cast<void*>(addr), 1) == 1;
  close(fds[0]);
  close(fds[1]);
  return ok;
}

// True when [addr, addr + bytes) is occupied in the address space (reserved or mapped).
bool Occupied(uintptr_t addr, int64_t bytes) {
  void* p = mmap(reinterpret_cast<void*>(addr), bytes, PROT_NONE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
  if (p == MAP_FAILED) return errno == EEXIST;
  munmap(p, bytes);
  // Kernels without MAP_FIXED_NOREPLACE treat the address as a hint.
  return reinterpret_cast<uintptr_t>(p) != addr;
}

int OpenFds() {
  int n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

std::unique_ptr<Vmm> MakeOrDie(int64_t gran, int64_t cap = 0) {
  absl::StatusOr<std::unique_ptr<Vmm>> vmm = MakeHostVmm(gran, cap);
  EXPECT_TRUE(vmm.ok()) << vmm.status();
  return vmm.ok() ? std::move(*vmm) : nullptr;
}

uint64_t* Words(uintptr_t addr) { return reinterpret_cast<uint64_t*>(addr); }

TEST(HostVmmFactory, RejectsBadArguments) {
  EXPECT_EQ(MakeHostVmm(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeHostVmm(-4096).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeHostVmm(3 * 4096).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeHostVmm(sysconf(_SC_PAGESIZE) / 2).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeHostVmm(k4K, -1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeHostVmm(k2M, k4K).status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<std::unique_ptr<Vmm>> ok = MakeHostVmm(k2M, 4 * k2M);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->name(), "host");
  EXPECT_FALSE((*ok)->is_device());
  EXPECT_EQ((*ok)->granularity(), k2M);
}

class HostVmmTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override {
    g_ = GetParam();
    vmm_ = MakeOrDie(g_);
    ASSERT_NE(vmm_, nullptr);
  }
  void TearDown() override {
    if (vmm_ == nullptr) return;
    // Every test cleans up after itself: the backend must end with nothing live.
    VmmCounters c = vmm_->counters();
    EXPECT_EQ(c.live_reservations, 0);
    EXPECT_EQ(c.live_handles, 0);
    EXPECT_EQ(c.mapped_granules, 0);
  }

  uintptr_t ReserveOrDie(int64_t granules) {
    absl::StatusOr<uintptr_t> r = vmm_->Reserve(granules * g_);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.value_or(0);
  }
  PhysHandle CreateOrDie() {
    absl::StatusOr<PhysHandle> h = vmm_->Create();
    EXPECT_TRUE(h.ok()) << h.status();
    return h.value_or(0);
  }

  int64_t g_ = 0;
  std::unique_ptr<Vmm> vmm_;
};

INSTANTIATE_TEST_SUITE_P(Granularities, HostVmmTest, ::testing::Values(k4K, k2M),
                         [](const auto& info) { return info.param == k4K ? "4KiB" : "2MiB"; });

TEST_P(HostVmmTest, ReserveIsAlignedReservedAndInaccessible) {
  const uintptr_t a = ReserveOrDie(3);
  const uintptr_t b = ReserveOrDie(1);
  EXPECT_EQ(a % g_, 0u);
  EXPECT_EQ(b % g_, 0u);
  EXPECT_TRUE(Occupied(a, 3 * g_));
  EXPECT_FALSE(Readable(a));
  EXPECT_FALSE(Readable(a + 3 * g_ - 1));
  EXPECT_EQ(vmm_->counters().live_reservations, 2);

  ASSERT_TRUE(vmm_->FreeReservation(a, 3 * g_).ok());
  EXPECT_FALSE(Occupied(a, 3 * g_));
  ASSERT_TRUE(vmm_->FreeReservation(b, g_).ok());
}

TEST_P(HostVmmTest, ReserveRejectsBadSizes) {
  for (int64_t bytes : {int64_t{0}, -g_, g_ + 1, g_ / 2}) {
    EXPECT_EQ(vmm_->Reserve(bytes).status().code(), absl::StatusCode::kInvalidArgument) << bytes;
  }
  EXPECT_EQ(vmm_->counters().live_reservations, 0);
}

TEST_P(HostVmmTest, FreeReservationMustBeExactAndEmpty) {
  const uintptr_t a = ReserveOrDie(2);
  EXPECT_EQ(vmm_->FreeReservation(a, g_).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->FreeReservation(a + g_, g_).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->FreeReservation(a, 3 * g_).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Occupied(a, 2 * g_));

  const PhysHandle h = CreateOrDie();
  ASSERT_TRUE(vmm_->Map(a + g_, h).ok());
  const absl::Status busy = vmm_->FreeReservation(a, 2 * g_);
  EXPECT_EQ(busy.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(busy.message(), HasSubstr("1 mapped"));
  EXPECT_EQ(vmm_->counters().live_reservations, 1);
  EXPECT_TRUE(Occupied(a, 2 * g_));

  ASSERT_TRUE(vmm_->Unmap(a + g_, g_).ok());
  ASSERT_TRUE(vmm_->Release(h).ok());
  ASSERT_TRUE(vmm_->FreeReservation(a, 2 * g_).ok());
  EXPECT_EQ(vmm_->FreeReservation(a, 2 * g_).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_P(HostVmmTest, MapIsInaccessibleUntilSetAccessAndUnmapKeepsReservation) {
  const uintptr_t a = ReserveOrDie(2);
  const PhysHandle h = CreateOrDie();
  EXPECT_NE(h, 0u);
  ASSERT_TRUE(vmm_->Map(a, h).ok());
  EXPECT_FALSE(Readable(a));
  EXPECT_EQ(vmm_->counters().mapped_granules, 1);

  ASSERT_TRUE(vmm_->SetAccess(a, g_).ok());
  EXPECT_TRUE(Readable(a));
  EXPECT_TRUE(Writable(a + g_ - 1));
  Words(a)[0] = 0x1234;
  EXPECT_EQ(Words(a)[0], 0x1234u);
  EXPECT_FALSE(Readable(a + g_));  // the unmapped neighbour stays inaccessible

  ASSERT_TRUE(vmm_->Unmap(a, g_).ok());
  EXPECT_FALSE(Readable(a));
  EXPECT_TRUE(Occupied(a, 2 * g_));  // still reserved: nobody else can land there
  EXPECT_EQ(vmm_->counters().mapped_granules, 0);

  // Mapping again needs SetAccess again, and the handle kept its contents.
  ASSERT_TRUE(vmm_->Map(a + g_, h).ok());
  EXPECT_FALSE(Readable(a + g_));
  ASSERT_TRUE(vmm_->SetAccess(a + g_, g_).ok());
  EXPECT_EQ(Words(a + g_)[0], 0x1234u);

  ASSERT_TRUE(vmm_->Unmap(a + g_, g_).ok());
  ASSERT_TRUE(vmm_->Release(h).ok());
  ASSERT_TRUE(vmm_->FreeReservation(a, 2 * g_).ok());
}

// Query reports what the backend recorded: nothing, a mapping without access, with
// access; an unaligned address is rejected. It is not a counted call.
TEST_P(HostVmmTest, QueryReportsMappingAndAccess) {
  const uintptr_t a = ReserveOrDie(2);
  const PhysHandle h = CreateOrDie();
  const VmmCounters before = vmm_->counters();
  absl::StatusOr<MappingState> q = vmm_->Query(a);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_FALSE(q->mapped);
  ASSERT_TRUE(vmm_->Map(a + g_, h).ok());
  q = vmm_->Query(a + g_);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(q->mapped);
  EXPECT_EQ(q->handle, h);
  EXPECT_FALSE(q->accessible);
  ASSERT_TRUE(vmm_->SetAccess(a + g_, g_).ok());
  q = vmm_->Query(a + g_);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(q->accessible);
  EXPECT_FALSE(vmm_->Query(a)->mapped);
  EXPECT_EQ(vmm_->Query(a + 64).status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(vmm_->Unmap(a + g_, g_).ok());
  EXPECT_FALSE(vmm_->Query(a + g_)->mapped);
  const VmmCounters after = vmm_->counters();
  for (int i = 0; i < Op(VmmOp::kCount); ++i) {
    const int64_t made =
        i == Op(VmmOp::kMap) || i == Op(VmmOp::kSetAccess) || i == Op(VmmOp::kUnmap) ? 1 : 0;
    EXPECT_EQ(after.calls[i], before.calls[i] + made) << VmmOpName(static_cast<VmmOp>(i));
  }
  ASSERT_TRUE(vmm_->Release(h).ok());
  ASSERT_TRUE(vmm_->FreeReservation(a, 2 * g_).ok());
}

TEST_P(HostVmmTest, MapRejectsBadArgumentsAndChangesNothing) {
  const uintptr_t a = ReserveOrDie(2);
  const PhysHandle h = CreateOrDie();
  ASSERT_TRUE(vmm_->Map(a, h).ok());
  const VmmCounters before = vmm_->counters();

  EXPECT_EQ(vmm_->Map(a + 64, h).code(), absl::StatusCode::kInvalidArgument);      // unaligned
  EXPECT_EQ(vmm_->Map(a + 2 * g_, h).code(), absl::StatusCode::kInvalidArgument);  // outside
  EXPECT_EQ(vmm_->Map(a - g_, h).code(), absl::StatusCode::kInvalidArgument);      // outside
  EXPECT_EQ(vmm_->Map(a, h).code(), absl::StatusCode::kFailedPrecondition);        // taken
  EXPECT_EQ(vmm_->Map(a + g_, 0).code(), absl::StatusCode::kNotFound);             // zero
  EXPECT_EQ(vmm_->Map(a + g_, h + 1000).code(), absl::StatusCode::kNotFound);      // unknown

  const VmmCounters after = vmm_->counters();
  EXPECT_EQ(after.mapped_granules, before.mapped_granules);
  EXPECT_EQ(after.live_handles, before.live_handles);
  EXPECT_EQ(after.calls[Op(VmmOp::kMap)], before.calls[Op(VmmOp::kMap)] + 6);
  // The granule that failed to map is still just reserved.
  EXPECT_EQ(vmm_->SetAccess(a + g_, g_).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(Readable(a + g_));

  ASSERT_TRUE(vmm_->Unmap(a, g_).ok());
  ASSERT_TRUE(vmm_->Release(h).ok());
  ASSERT_TRUE(vmm_->FreeReservation(a, 2 * g_).ok());
}

TEST_P(HostVmmTest, AliasedMappingsShareBytesAndSurviveUnmapOfOneAlias) {
  const uintptr_t r1 = ReserveOrDie(2);
  const uintptr_t r2 = ReserveOrDie(1);
  const PhysHandle h = CreateOrDie();
  const uintptr_t a = r1, b = r1 + g_, c = r2;
  ASSERT_TRUE(vmm_->Map(a, h).ok());
  ASSERT_TRUE(vmm_->Map(b, h).ok());
  ASSERT_TRUE(vmm_->Map(c, h).ok());
  ASSERT_TRUE(vmm_->SetAccess(a, 2 * g_).ok());
  ASSERT_TRUE(vmm_->SetAccess(c, g_).ok());
  EXPECT_EQ(vmm_->counters().mapped_granules, 3);
  EXPECT_EQ(vmm_->counters().live_handles, 1);

  const int64_t n = g_ / 8;
  for (int64_t i = 0; i < n; ++i) Words(a)[i] = 0xA000000000000000ull + i;
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(Words(b)[i], 0xA000000000000000ull + i) << i;
  Words(c)[n - 1] = 77;  // written through the alias in another reservation
  EXPECT_EQ(Words(a)[n - 1], 77u);
  EXPECT_EQ(Words(b)[n - 1], 77u);

  ASSERT_TRUE(vmm_->Unmap(a, g_).ok());
  EXPECT_FALSE(Readable(a));
  for (int64_t i = 0; i < n - 1; ++i) ASSERT_EQ(Words(b)[i], 0xA000000000000000ull + i) << i;
  EXPECT_EQ(Words(c)[n - 1], 77u);
  Words(b)[0] = 5;
  EXPECT_EQ(Words(c)[0], 5u);

  ASSERT_TRUE(vmm_->Unmap(b, g_).ok());
  ASSERT_TRUE(vmm_->Unmap(c, g_).ok());
  ASSERT_TRUE(vmm_->Release(h).ok());
  ASSERT_TRUE(vmm_->FreeReservation(r1, 2 * g_).ok());
  ASSERT_TRUE(vmm_->FreeReservation(r2, g_).ok());
}

TEST_P(HostVmmTest, ReleaseWhileMappedFailsAndChangesNothing) {
  const uintptr_t r = ReserveOrDie(2);
  const PhysHandle h = CreateOrDie();
  ASSERT_TRUE(vmm_->Map(r, h).ok());
  ASSERT_TRUE(vmm_->Map(r + g_, h).ok());
  ASSERT_TRUE(vmm_->SetAccess(r, 2 * g_).ok());
  Words(r)[3] = 42;

  const absl::Status s = vmm_->Release(h);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), HasSubstr("2 addresses"));
  EXPECT_EQ(vmm_->counters().live_handles, 1);
  EXPECT_EQ(vmm_->counters().mapped_granules, 2);
  EXPECT_EQ(Words(r + g_)[3], 42u);

  ASSERT_TRUE(vmm_->Unmap(r, g_).ok());
  EXPECT_EQ(vmm_->Release(h).code(), absl::StatusCode::kFailedPrecondition);  // one alias left
  EXPECT_EQ(Words(r + g_)[3], 42u);
  ASSERT_TRUE(vmm_->Unmap(r + g_, g_).ok());
  ASSERT_TRUE(vmm_->Release(h).ok());
  EXPECT_EQ(vmm_->Release(h).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(vmm_->Release(0).code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(vmm_->FreeReservation(r, 2 * g_).ok());
}

TEST_P(HostVmmTest, UnmapOfPartlyMappedRangeFailsAndChangesNothing) {
  const uintptr_t r = ReserveOrDie(4);
  std::vector<PhysHandle> hs;
  for (int i : {0, 1, 3}) {
    hs.push_back(CreateOrDie());
    ASSERT_TRUE(vmm_->Map(r + i * g_, hs.back()).ok());
    ASSERT_TRUE(vmm_->SetAccess(r + i * g_, g_).ok());
    Words(r + i * g_)[0] = 100 + i;
  }
  const absl::Status s = vmm_->Unmap(r, 4 * g_);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->SetAccess(r, 4 * g_).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->Unmap(r + 64, g_).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vmm_->Unmap(r, g_ + 64).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(vmm_->counters().mapped_granules, 3);
  for (int i : {0, 1, 3}) EXPECT_EQ(Words(r + i * g_)[0], uint64_t(100 + i));

  ASSERT_TRUE(vmm_->Unmap(r, 2 * g_).ok());  // one call over two granules
  ASSERT_TRUE(vmm_->Unmap(r + 3 * g_, g_).ok());
  EXPECT_EQ(vmm_->Unmap(r + 3 * g_, g_).code(), absl::StatusCode::kFailedPrecondition);
  for (PhysHandle h : hs) ASSERT_TRUE(vmm_->Release(h).ok());
  ASSERT_TRUE(vmm_->FreeReservation(r, 4 * g_).ok());
}

TEST_P(HostVmmTest, ReleasedMemoryGoesBackAndRecycledHandlesReadZero) {
  const int kPages = 4;
  const uintptr_t r = ReserveOrDie(kPages);
  absl::StatusOr<int64_t> base = internal::HostVmmResidentBytes(*vmm_);
  ASSERT_TRUE(base.ok()) << base.status();
  std::vector<PhysHandle> hs;
  for (int i = 0; i < kPages; ++i) {
    hs.push_back(CreateOrDie());
    ASSERT_TRUE(vmm_->Map(r + i * g_, hs.back()).ok());
  }
  ASSERT_TRUE(vmm_->SetAccess(r, kPages * g_).ok());
  std::memset(reinterpret_cast<void*>(r), 0xAB, kPages * g_);
  const int64_t touched = *internal::HostVmmResidentBytes(*vmm_);
  EXPECT_GE(touched - *base, kPages * g_);

  ASSERT_TRUE(vmm_->Unmap(r, kPages * g_).ok());
  // Unmapping alone keeps the memory (the handle still owns it).
  EXPECT_EQ(*internal::HostVmmResidentBytes(*vmm_), touched);
  for (PhysHandle h : hs) ASSERT_TRUE(vmm_->Release(h).ok());
  EXPECT_LE(*internal::HostVmmResidentBytes(*vmm_), *base);

  // New handles reuse the punched slots: they read as zeros, with fresh ids.
  for (int i = 0; i < kPages; ++i) {
    const PhysHandle h = CreateOrDie();
    for (PhysHandle old : hs) EXPECT_NE(h, old);
    ASSERT_TRUE(vmm_->Map(r + i * g_, h).ok());
    hs[i] = h;
  }
  ASSERT_TRUE(vmm_->SetAccess(r, kPages * g_).ok());
  for (int64_t i = 0; i < kPages * g_ / 8; ++i) ASSERT_EQ(Words(r)[i], 0u) << i;
  ASSERT_TRUE(vmm_->Unmap(r, kPages * g_).ok());
  for (PhysHandle h : hs) ASSERT_TRUE(vmm_->Release(h).ok());
  ASSERT_TRUE(vmm_->FreeReservation(r, kPages * g_).ok());
}

TEST_P(HostVmmTest, CopyMovesBytesBetweenAccessibleRangesOnly) {
  const uintptr_t r = ReserveOrDie(4);
  std::vector<PhysHandle> hs;
  for (int i = 0; i < 3; ++i) {
    hs.push_back(CreateOrDie());
    ASSERT_TRUE(vmm_->Map(r + i * g_, hs.back()).ok());
  }
  ASSERT_TRUE(vmm_->SetAccess(r, 2 * g_).ok());  // granule 2 mapped but not accessible
  auto* bytes = reinterpret_cast<unsigned char*>(r);
  for (int64_t i = 0; i < 2 * g_; ++i) bytes[i] = static_cast<unsigned char>(i * 7 + 3);

  // Unaligned, across the granule boundary, overlapping source and destination.
  const int64_t src = g_ - 1001, dst = g_ - 500, n = 1200;
  std::vector<unsigned char> expect(bytes + src, bytes + src + n);
  ASSERT_TRUE(vmm_->Copy(r + dst, r + src, n).ok());
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(bytes[dst + i], expect[i]) << i;
  EXPECT_TRUE(vmm_->Copy(r + 1, r + 2, 0).ok());

  std::vector<unsigned char> snapshot(bytes, bytes + 2 * g_);
  EXPECT_EQ(vmm_->Copy(r, r + 2 * g_, 16).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->Copy(r + 2 * g_, r, 16).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->Copy(r, r + 3 * g_, 16).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->Copy(r + 2 * g_ - 8, r, 16).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(vmm_->Copy(r, r + 8, -1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(std::memcmp(snapshot.data(), bytes, 2 * g_), 0);

  ASSERT_TRUE(vmm_->Unmap(r, 3 * g_).ok());
  for (PhysHandle h : hs) ASSERT_TRUE(vmm_->Release(h).ok());
  ASSERT_TRUE(vmm_->FreeReservation(r, 4 * g_).ok());
}

TEST_P(HostVmmTest, CapLimitsLiveHandles) {
  vmm_ = MakeOrDie(g_, 3 * g_ + g_ / 2);  // the half granule does not count
  ASSERT_NE(vmm_, nullptr);
  std::vector<PhysHandle> hs;
  for (int i = 0; i < 3; ++i) hs.push_back(CreateOrDie());
  const absl::StatusOr<PhysHandle> over = vmm_->Create();
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(over.status().message(), HasSubstr("3 live handles"));
  EXPECT_THAT(over.status().message(), HasSubstr(std::to_string(3 * g_)));
  EXPECT_EQ(vmm_->counters().live_handles, 3);

  ASSERT_TRUE(vmm_->Release(hs[1]).ok());
  absl::StatusOr<PhysHandle> again = vmm_->Create();
  ASSERT_TRUE(again.ok()) << again.status();
  hs[1] = *again;
  EXPECT_EQ(vmm_->Create().status().code(), absl::StatusCode::kResourceExhausted);
  for (PhysHandle h : hs) ASSERT_TRUE(vmm_->Release(h).ok());
}

TEST_P(HostVmmTest, CountersCountCallsTimeAndLiveResources) {
  const VmmCounters zero = vmm_->counters();
  for (int i = 0; i < Op(VmmOp::kCount); ++i) {
    EXPECT_EQ(zero.calls[i], 0);
    EXPECT_EQ(zero.nanos[i], 0);
  }
  const uintptr_t r = ReserveOrDie(2);
  EXPECT_FALSE(vmm_->Reserve(0).ok());
  const PhysHandle h1 = CreateOrDie(), h2 = CreateOrDie();
  ASSERT_TRUE(vmm_->Map(r, h1).ok());
  ASSERT_TRUE(vmm_->Map(r + g_, h2).ok());
  ASSERT_TRUE(vmm_->SetAccess(r, 2 * g_).ok());
  ASSERT_TRUE(vmm_->Copy(r + g_, r, 64).ok());
  VmmCounters c = vmm_->counters();
  EXPECT_EQ(c.live_reservations, 1);
  EXPECT_EQ(c.live_handles, 2);
  EXPECT_EQ(c.mapped_granules, 2);
  ASSERT_TRUE(vmm_->Unmap(r, 2 * g_).ok());
  EXPECT_FALSE(vmm_->Release(12345).ok());
  ASSERT_TRUE(vmm_->Release(h1).ok());
  ASSERT_TRUE(vmm_->Release(h2).ok());
  ASSERT_TRUE(vmm_->FreeReservation(r, 2 * g_).ok());

  c = vmm_->counters();
  EXPECT_EQ(c.calls[Op(VmmOp::kReserve)], 2);  // failed calls count too
  EXPECT_EQ(c.calls[Op(VmmOp::kFreeReservation)], 1);
  EXPECT_EQ(c.calls[Op(VmmOp::kCreate)], 2);
  EXPECT_EQ(c.calls[Op(VmmOp::kRelease)], 3);
  EXPECT_EQ(c.calls[Op(VmmOp::kMap)], 2);
  EXPECT_EQ(c.calls[Op(VmmOp::kSetAccess)], 1);
  EXPECT_EQ(c.calls[Op(VmmOp::kUnmap)], 1);
  EXPECT_EQ(c.calls[Op(VmmOp::kCopy)], 1);
  int64_t total_ns = 0;
  for (int i = 0; i < Op(VmmOp::kCount); ++i) {
    EXPECT_GE(c.nanos[i], 0);
    total_ns += c.nanos[i];
  }
  EXPECT_GT(total_ns, 0);
  EXPECT_EQ(c.live_reservations, 0);
  EXPECT_EQ(c.live_handles, 0);
  EXPECT_EQ(c.mapped_granules, 0);
}

TEST(HostVmm, FenceComplete) {
  std::unique_ptr<Vmm> vmm = MakeOrDie(k4K);
  ASSERT_NE(vmm, nullptr);
  EXPECT_TRUE(vmm->FenceComplete(Fence{}));
  std::atomic<bool> done{false};
  const Fence fence{.event = &done};
  EXPECT_FALSE(vmm->FenceComplete(fence));
  done.store(true, std::memory_order_release);
  EXPECT_TRUE(vmm->FenceComplete(fence));
}

TEST(HostVmm, ManyHandlesShareOneMemfd) {
  constexpr int kHandles = 2000;
  std::unique_ptr<Vmm> vmm = MakeOrDie(k4K);
  ASSERT_NE(vmm, nullptr);
  const int fds = OpenFds();
  absl::StatusOr<uintptr_t> r = vmm->Reserve(kHandles * k4K);
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<PhysHandle> hs;
  for (int i = 0; i < kHandles; ++i) {
    absl::StatusOr<PhysHandle> h = vmm->Create();
    ASSERT_TRUE(h.ok()) << h.status();
    hs.push_back(*h);
    // Map in reverse order so neighbouring addresses hold unrelated memfd slots.
    ASSERT_TRUE(vmm->Map(*r + (kHandles - 1 - i) * k4K, *h).ok());
  }
  EXPECT_EQ(OpenFds(), fds);
  ASSERT_TRUE(vmm->SetAccess(*r, kHandles * k4K).ok());  // one call over every mapping
  for (int i = 0; i < kHandles; ++i) Words(*r + i * k4K)[i % 512] = 1000 + i;
  for (int i = 0; i < kHandles; ++i) {
    const uint64_t* w = Words(*r + i * k4K);
    for (int j = 0; j < 512; ++j) ASSERT_EQ(w[j], j == i % 512 ? uint64_t(1000 + i) : 0) << i;
  }
  EXPECT_EQ(vmm->counters().mapped_granules, kHandles);
  EXPECT_EQ(vmm->counters().live_handles, kHandles);
  ASSERT_TRUE(vmm->Unmap(*r, kHandles * k4K).ok());
  for (PhysHandle h : hs) ASSERT_TRUE(vmm->Release(h).ok());
  ASSERT_TRUE(vmm->FreeReservation(*r, kHandles * k4K).ok());
  EXPECT_EQ(OpenFds(), fds);
}

TEST(HostVmm, ConcurrentCreateMapUnmapRelease) {
  constexpr int kThreads = 4, kSlotsPerThread = 16, kIters = 1500;
  std::unique_ptr<Vmm> vmm = MakeOrDie(k4K, int64_t{kThreads} * kSlotsPerThread * k4K);
  ASSERT_NE(vmm, nullptr);
  absl::StatusOr<uintptr_t> r = vmm->Reserve(int64_t{kThreads} * kSlotsPerThread * k4K);
  ASSERT_TRUE(r.ok()) << r.status();
  std::atomic<int64_t> creates{0}, maps{0}, unmaps{0}, releases{0}, copies{0}, errors{0};

  auto worker = [&](int t) {
    std::mt19937 rng(t);
    struct Slot {
      PhysHandle h = 0;
      uint64_t tag = 0;
    };
    std::vector<Slot> slots(kSlotsPerThread);
    const uintptr_t base = *r + int64_t{t} * kSlotsPerThread * k4K;
    auto check = [&](int s) {
      if (Words(base + s * k4K)[0] != slots[s].tag || Words(base + s * k4K)[511] != slots[s].tag)
        ++errors;
    };
    for (int it = 0; it < kIters; ++it) {
      const int s = rng() % kSlotsPerThread;
      const uintptr_t addr = base + s * k4K;
      if (slots[s].h == 0) {
        absl::StatusOr<PhysHandle> h = vmm->Create();
        ++creates;
        if (!h.ok()) {
          ++errors;
          continue;
        }
        ++maps;
        if (!vmm->Map(addr, *h).ok() || !vmm->SetAccess(addr, k4K).ok()) ++errors;
        const uint64_t tag = (uint64_t(t) << 32) | it;
        Words(addr)[0] = Words(addr)[511] = tag;
        slots[s] = {*h, tag};
      } else if (rng() % 4 == 0) {
        // Copy from another live slot of this thread, through the backend.
        const int o = rng() % kSlotsPerThread;
        if (o != s && slots[o].h != 0) {
          check(o);
          ++copies;
          if (!vmm->Copy(addr, base + o * k4K, k4K).ok()) ++errors;
          slots[s].tag = slots[o].tag;
          check(s);
        }
      } else {
        check(s);
        ++unmaps;
        ++releases;
        if (!vmm->Unmap(addr, k4K).ok() || !vmm->Release(slots[s].h).ok()) ++errors;
        slots[s] = {};
      }
    }
    for (int s = 0; s < kSlotsPerThread; ++s) {
      if (slots[s].h == 0) continue;
      check(s);
      ++unmaps;
      ++releases;
      if (!vmm->Unmap(base + s * k4K, k4K).ok() || !vmm->Release(slots[s].h).ok()) ++errors;
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (std::thread& th : threads) th.join();

  EXPECT_EQ(errors.load(), 0);
  const VmmCounters c = vmm->counters();
  EXPECT_EQ(c.calls[Op(VmmOp::kCreate)], creates.load());
  EXPECT_EQ(c.calls[Op(VmmOp::kMap)], maps.load());
  EXPECT_EQ(c.calls[Op(VmmOp::kSetAccess)], maps.load());
  EXPECT_EQ(c.calls[Op(VmmOp::kUnmap)], unmaps.load());
  EXPECT_EQ(c.calls[Op(VmmOp::kRelease)], releases.load());
  EXPECT_EQ(c.calls[Op(VmmOp::kCopy)], copies.load());
  EXPECT_GT(creates.load(), kThreads * kSlotsPerThread);  // slots were recycled
  EXPECT_EQ(c.live_handles, 0);
  EXPECT_EQ(c.mapped_granules, 0);
  EXPECT_FALSE(Readable(*r));
  ASSERT_TRUE(vmm->FreeReservation(*r, int64_t{kThreads} * kSlotsPerThread * k4K).ok());
}

TEST(HostVmm, DestructorReleasesLeaksAndWarns) {
  std::ostringstream log;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(log);
  internal::Logger()->sinks().push_back(sink);
  uintptr_t addr = 0;
  {
    std::unique_ptr<Vmm> vmm = MakeOrDie(k4K);
    ASSERT_NE(vmm, nullptr);
    absl::StatusOr<uintptr_t> r = vmm->Reserve(4 * k4K);
    ASSERT_TRUE(r.ok());
    addr = *r;
    absl::StatusOr<PhysHandle> h1 = vmm->Create();
    absl::StatusOr<PhysHandle> h2 = vmm->Create();
    ASSERT_TRUE(h1.ok() && h2.ok());
    ASSERT_TRUE(vmm->Map(addr, *h1).ok());
    ASSERT_TRUE(vmm->Map(addr + k4K, *h1).ok());
  }
  internal::Logger()->sinks().pop_back();
  EXPECT_THAT(log.str(), HasSubstr("1 reservations, 2 physical handles, 2 mapped granules"));
  EXPECT_FALSE(Occupied(addr, 4 * k4K));
}

}  // namespace
}  // namespace kvmem
