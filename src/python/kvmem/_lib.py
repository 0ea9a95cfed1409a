"""Loads libkvmem.so and declares its C ABI (include/kvmem/c_api.h) for ctypes.

The library is looked for, in order: $KVMEM_LIBRARY (a path), next to this package
(where ``cmake --install <build> --component python`` puts it), then the system's loader
(libkvmem.so.0.2 on the library path).
"""

import ctypes
import glob
import os
from ctypes import (POINTER, Structure, c_char_p, c_float, c_int32, c_int64, c_uint32,
                    c_uint64, c_void_p)

from .errors import error_for_code

ABI = "0.2"  # major.minor of the SONAME this package is written against


def _candidates():
    env = os.environ.get("KVMEM_LIBRARY")
    if env:
        yield env
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("libkvmem.so", f"libkvmem.so.{ABI}"):
        path = os.path.join(here, name)
        if os.path.exists(path):
            yield path
    yield from sorted(glob.glob(os.path.join(here, f"libkvmem.so.{ABI}.*")))
    yield f"libkvmem.so.{ABI}"


def _load():
    errors = []
    for path in _candidates():
        try:
            return ctypes.CDLL(path), path
        except OSError as e:
            errors.append(f"{path}: {e}")
    raise ImportError("kvmem: cannot load libkvmem.so (set KVMEM_LIBRARY or install it with "
                      "cmake --install <build> --component python; docs/python.md): " +
                      "; ".join(errors))


lib, path = _load()


class Config(Structure):
    _fields_ = [
        ("struct_size", c_uint32), ("num_layers", c_int32), ("num_kv_heads", c_int32),
        ("head_dim", c_int32), ("dtype", c_int32), ("layout", c_int32),
        ("arrangement", c_int32), ("chunk_tokens", c_int32), ("page_tokens", c_int32),
        ("page_placement", c_int32), ("max_requests", c_int32), ("device", c_int32),
        ("max_context", c_int64), ("memory_budget_bytes", c_int64),
        ("device_ordinal", c_int32), ("elastic_pool", c_int32), ("host_granularity", c_int64),
        ("map_ahead_tokens", c_int64),
    ]


STATS_FIELDS = (
    "num_requests", "logical_tokens", "stored_tokens", "live_bytes", "held_bytes",
    "idle_bytes", "mapped_bytes", "physical_bytes", "budget_bytes", "page_bytes",
    "pages_total", "pages_free", "pages_used", "pages_shared", "pages_quarantined",
    "peak_requests", "peak_held_bytes", "peak_live_bytes", "extends", "forks", "cow_copies",
    "pages_reclaimed", "map_stalls", "pool_create_nanos", "vmm_calls", "vmm_nanos",
    "vmm_live_reservations", "vmm_live_handles", "vmm_mapped_granules",
)


class StatsStruct(Structure):
    _fields_ = [("struct_size", c_uint32), ("reserved", c_uint32)] + [
        (f, c_int64) for f in STATS_FIELDS]


class LayerView(Structure):
    _fields_ = [
        ("struct_size", c_uint32), ("layout", c_int32), ("dtype", c_int32), ("device", c_int32),
        ("device_ordinal", c_int32), ("ndim", c_int32), ("k", c_void_p), ("v", c_void_p),
        ("shape", c_int64 * 6), ("strides", c_int64 * 6), ("page_stride", c_int64),
        ("token_stride", c_int64), ("page_tokens", c_int32), ("chunk_shift", c_int32),
        ("num_pages", c_int64), ("row_stride", c_int64), ("max_context", c_int64),
        ("chunk_gap", c_int64),
    ]


class RunningBatch(Structure):
    _fields_ = [
        ("struct_size", c_uint32), ("size", c_int32), ("max_batch", c_int32),
        ("max_seq_len", c_int32), ("seq_lens", c_void_p), ("row_ids", c_void_p),
        ("page_table", c_void_p), ("page_table_stride", c_int64), ("last_page_len", c_void_p),
    ]


class RunningBatchCsr(Structure):
    _fields_ = [("struct_size", c_uint32), ("size", c_int32), ("indptr", c_void_p),
                ("indices", c_void_p), ("last_page_len", c_void_p)]


class RunningBatchChanges(Structure):
    _fields_ = [("struct_size", c_uint32), ("all", c_int32), ("num_entries", c_int64),
                ("entries", c_void_p)]


class AttentionOptions(Structure):
    _fields_ = [
        ("struct_size", c_uint32), ("num_q_heads", c_int32), ("scale", c_float),
        ("window_left", c_int32), ("max_batch", c_int32), ("fixed_grid", c_int32),
        ("max_new_tokens", c_int64), ("pipeline_stages", c_int32), ("max_ctas", c_int32),
    ]


def _declare(name, *argtypes, restype=c_int32):
    fn = getattr(lib, name)
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


P = c_void_p  # every pointer is passed as an integer address (fast, and NULL as None / 0)
u64, i64, i32 = c_uint64, c_int64, c_int32

last_error = _declare("kvmem_last_error", restype=c_char_p)
status_name = _declare("kvmem_status_name", i32, restype=c_char_p)
version = _declare("kvmem_version", restype=c_char_p)
has_cuda = _declare("kvmem_has_cuda")
config_init = _declare("kvmem_config_init", POINTER(Config))
cache_create = _declare("kvmem_cache_create", POINTER(Config), POINTER(c_void_p))
cache_destroy = _declare("kvmem_cache_destroy", P, restype=None)
cache_config = _declare("kvmem_cache_config", P, POINTER(Config))
add_request = _declare("kvmem_add_request", P, u64, P)
extend = _declare("kvmem_extend", P, u64, i64, P, i64)
truncate = _declare("kvmem_truncate", P, u64, i64)
fork = _declare("kvmem_fork", P, u64, u64, P)
free = _declare("kvmem_free", P, u64, P)
extend_batch = _declare("kvmem_extend_batch", P, P, P, i64, P, i64)
truncate_batch = _declare("kvmem_truncate_batch", P, P, P, i64)
free_batch = _declare("kvmem_free_batch", P, P, i64, P)
length = _declare("kvmem_length", P, u64, P)
row = _declare("kvmem_row", P, u64, P)
contains = _declare("kvmem_contains", P, u64, P)
req_to_token = _declare("kvmem_req_to_token", P, u64, P, i64, P)
block_table = _declare("kvmem_block_table", P, u64, P, i64, P)
trim = _declare("kvmem_trim", P, P)
check_invariants = _declare("kvmem_check_invariants", P)
get_stats = _declare("kvmem_get_stats", P, POINTER(StatsStruct))
layer_view_get = _declare("kvmem_layer_view_get", P, i32, POINTER(LayerView))
set_running_batch = _declare("kvmem_set_running_batch", P, P, i64)
running_batch_get = _declare("kvmem_running_batch_get", P, POINTER(RunningBatch))
pack_running_batch = _declare("kvmem_pack_running_batch", P, POINTER(RunningBatchCsr))
take_running_batch_changes = _declare("kvmem_take_running_batch_changes", P,
                                      POINTER(RunningBatchChanges))
attention_options_init = _declare("kvmem_attention_options_init", POINTER(AttentionOptions))
append_kv = _declare("kvmem_append_kv", P, i32, i32, P, P, i64, i64, P, i64, P)
device_running_batch_create = _declare("kvmem_device_running_batch_create", P,
                                       POINTER(c_void_p))
device_running_batch_destroy = _declare("kvmem_device_running_batch_destroy", P, restype=None)
device_running_batch_upload = _declare("kvmem_device_running_batch_upload", P, P, P)
device_running_batch_view = _declare("kvmem_device_running_batch_view", P,
                                     POINTER(RunningBatch))
decode_workspace_create = _declare("kvmem_decode_workspace_create", P,
                                   POINTER(AttentionOptions), POINTER(c_void_p))
decode_workspace_destroy = _declare("kvmem_decode_workspace_destroy", P, restype=None)
decode_plan = _declare("kvmem_decode_plan", P, P, i32, P, i64, P)
decode_plan_running_batch = _declare("kvmem_decode_plan_running_batch", P, P, P)
decode = _declare("kvmem_decode", P, P, i32, P, P, P, P)
extend_workspace_create = _declare("kvmem_extend_workspace_create", P,
                                   POINTER(AttentionOptions), POINTER(c_void_p))
extend_workspace_destroy = _declare("kvmem_extend_workspace_destroy", P, restype=None)
extend_plan = _declare("kvmem_extend_plan", P, P, P, i32, P, i64, P)
extend_attention = _declare("kvmem_extend_attention", P, P, i32, P, P, P)


def check(code):
    """Raises the kvmem.Error of a non-zero status code with this thread's message."""
    if code:
        raise error_for_code(code, last_error().decode("utf-8", "replace"))


def sized(struct_type):
    s = struct_type()
    s.struct_size = ctypes.sizeof(struct_type)
    return s
