// Umbrella header: everything an engine needs from kvmem.
#ifndef KVMEM_KVMEM_H_
#define KVMEM_KVMEM_H_

#include "kvmem/config.h"
#include "kvmem/dtype.h"
#include "kvmem/kv_accessor.h"
#include "kvmem/kv_cache.h"
#include "kvmem/memory_plan.h"
#include "kvmem/reference_attention.h"
#include "kvmem/running_batch.h"
#include "kvmem/stats.h"
#include "kvmem/vmm.h"

#endif  // KVMEM_KVMEM_H_
