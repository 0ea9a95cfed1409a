// The environment of the persistent-failure tests (tests/*_persistent_fault_test.cc): one
// cache over a fault-injecting host backend, a model of its requests, and the check that
// a destroyed cache leaves the backend holding nothing.
#ifndef KVMEM_TESTS_FAULT_TEST_ENV_H_
#define KVMEM_TESTS_FAULT_TEST_ENV_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "kvmem/config.h"
#include "kvmem/kv_cache.h"
#include "kvmem/testing/fault_injecting_vmm.h"
#include "kvmem/vmm.h"
#include "tests/cache_test_util.h"

namespace kvmem::test {

template <typename T>
absl::Status StatusOf(const absl::StatusOr<T>& s) {
  return s.status();
}

// One cache over a fault-injecting backend, and a model of its requests.
struct Env {
  std::shared_ptr<Vmm> host;
  std::shared_ptr<FaultInjectingVmm> fault;
  std::unique_ptr<KvCache> cache;
  std::unique_ptr<CacheModel> model;
  int64_t tpp = 1;

  const KvCacheConfig& config() const { return cache->config(); }
  // Destroys the cache; then the backend must hold nothing (`where` names the case).
  void DestroyAndExpectNoLeak(const std::string& where = "") {
    model.reset();
    cache.reset();
    const VmmCounters c = host->counters();
    EXPECT_EQ(c.live_reservations, 0) << where;
    EXPECT_EQ(c.live_handles, 0) << where;
    EXPECT_EQ(c.mapped_granules, 0) << where;
  }
};

inline void MakeEnv(KvCacheConfig config, Env* env) {
  absl::StatusOr<std::unique_ptr<Vmm>> host = MakeHostVmm(config.host_granularity);
  ASSERT_TRUE(host.ok()) << host.status();
  env->host = *std::move(host);
  env->fault = std::make_shared<FaultInjectingVmm>(env->host);
  config.vmm = env->fault;
  absl::StatusOr<std::unique_ptr<KvCache>> cache = KvCache::Create(config);
  ASSERT_TRUE(cache.ok()) << cache.status();
  env->cache = *std::move(cache);
  env->model = std::make_unique<CacheModel>(env->cache.get());
  env->tpp = TokensPerPage(config);
}

}  // namespace kvmem::test

#endif  // KVMEM_TESTS_FAULT_TEST_ENV_H_
