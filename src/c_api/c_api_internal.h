// Pieces shared by the C ABI's source files (include/kvmem/c_api.h): the handles behind
// its opaque pointers, the per-thread last error and the wrapper that turns a Status or
// an exception into a status code.
#ifndef KVMEM_SRC_C_API_C_API_INTERNAL_H_
#define KVMEM_SRC_C_API_C_API_INTERNAL_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvmem/c_api.h"
#include "kvmem/kv_cache.h"
#include "kvmem/running_batch.h"

struct kvmem_cache {
  std::unique_ptr<kvmem::KvCache> cache;
  // The last TakeRunningBatchChanges, whose entries kvmem_running_batch_changes points to.
  kvmem::RunningBatchChanges changes;
};

namespace kvmem::c_api {

// Records a failed status as this thread's last error; returns its code.
kvmem_status Report(const absl::Status& status);

// Runs fn (returning absl::Status) with every exception turned into a status.
template <typename Fn>
kvmem_status Guard(Fn&& fn) noexcept {
  try {
    return Report(fn());
  } catch (const std::bad_alloc&) {
    return Report(absl::ResourceExhaustedError("kvmem: out of host memory (std::bad_alloc)"));
  } catch (const std::exception& e) {
    return Report(absl::InternalError(absl::StrCat("kvmem: unexpected exception: ", e.what())));
  } catch (...) {
    return Report(absl::InternalError("kvmem: unexpected exception"));
  }
}

inline absl::Status Null(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(what, " is NULL"));
}

// An array argument: NULL is allowed only when it is empty.
inline absl::Status CheckArray(const void* p, int64_t n, absl::string_view what) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": count ", n, " < 0"));
  if (p == nullptr && n > 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, " is NULL with ", n, " entries"));
  }
  return absl::OkStatus();
}

// The first struct_size bytes a caller's struct holds: at least the version 1 size
// (sizeof(T) of the first release of T; fields are only appended).
template <typename T>
absl::Status CheckStructSize(const T* p, absl::string_view what, size_t v1_size = sizeof(T)) {
  if (p == nullptr) return Null(what);
  if (p->struct_size < v1_size) {
    return absl::InvalidArgumentError(absl::StrCat(what, "->struct_size is ", p->struct_size,
                                                   ": set it to sizeof(", what, ") (at least ",
                                                   v1_size, ")"));
  }
  return absl::OkStatus();
}

// Writes `full` to *out, up to out->struct_size bytes, keeping the caller's struct_size.
template <typename T>
absl::Status CopyOut(T full, T* out, absl::string_view what) {
  if (absl::Status s = CheckStructSize(out, what); !s.ok()) return s;
  const uint32_t size = out->struct_size;
  full.struct_size = size;
  std::memcpy(out, &full, std::min<size_t>(size, sizeof(T)));
  return absl::OkStatus();
}

inline absl::Status CheckCache(const kvmem_cache* cache) {
  return cache == nullptr || cache->cache == nullptr ? Null("cache") : absl::OkStatus();
}

}  // namespace kvmem::c_api

#endif  // KVMEM_SRC_C_API_C_API_INTERNAL_H_
