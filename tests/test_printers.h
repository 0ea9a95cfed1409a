// How GoogleTest prints kvmem's enums when they are test parameters: by name, so that
// ctest lists "GetParam() = bf16" rather than raw object bytes.
#ifndef KVMEM_TESTS_TEST_PRINTERS_H_
#define KVMEM_TESTS_TEST_PRINTERS_H_

#include <ostream>

#include "kvmem/config.h"
#include "kvmem/dtype.h"

namespace kvmem {

inline void PrintTo(DType t, std::ostream* os) { *os << DTypeName(t); }
inline void PrintTo(Arrangement a, std::ostream* os) {
  *os << (a == Arrangement::kAllLayers ? "all-layers" : "per-layer");
}
inline void PrintTo(Layout l, std::ostream* os) {
  *os << (l == Layout::kPaged ? "paged" : "virtual");
}

}  // namespace kvmem

#endif  // KVMEM_TESTS_TEST_PRINTERS_H_
