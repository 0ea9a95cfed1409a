"""kvmem.KvCache: the C ABI's cache with keyword configuration, numpy arrays for the
step's batch calls and DLPack views of its memory (docs/python.md)."""

import ctypes
import dataclasses
from ctypes import byref, c_int32, c_int64, c_void_p

import numpy as np

from . import _dlpack, _lib
from ._dlpack import KDL_CPU, KDL_CUDA, Array
from ._lib import check
from .errors import InvalidArgumentError

_DTYPES = {"float32": 0, "fp32": 0, "bfloat16": 1, "bf16": 1, "float16": 2, "fp16": 2}
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_LAYOUTS = {"paged": 0, "virtual": 1}
_ARRANGEMENTS = {"all_layers": 0, "per_layer": 1}
_PLACEMENTS = {"contiguous": 0, "lowest_first": 1}

_I64 = np.dtype(np.int64)
_U64 = np.dtype(np.uint64)


def _enum(name, value, table):
    if isinstance(value, str):
        key = value.lower().replace("-", "_")
        if key in table:
            return table[key]
        raise InvalidArgumentError(f"{name}={value!r}: must be one of {sorted(table)}")
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)  # the C ABI checks the range
    # torch.bfloat16, numpy dtypes...
    text = str(value).replace("torch.", "")
    if text in table:
        return table[text]
    raise InvalidArgumentError(f"{name}={value!r}: must be one of {sorted(table)}")


def _device(value):
    """'host' / 'cpu' -> (0, 0); 'cuda' / 'cuda:N' / torch.device -> (1, N)."""
    text = str(value)
    if text in ("host", "cpu"):
        return 0, 0
    if text == "cuda":
        return 1, 0
    if text.startswith("cuda:"):
        try:
            return 1, int(text[5:])
        except ValueError:
            pass
    raise InvalidArgumentError(f"device={value!r}: must be 'host', 'cuda' or 'cuda:N'")


def _ids(ids):
    """A uint64 array (no copy for a contiguous uint64 / int64 numpy array)."""
    a = ids if type(ids) is np.ndarray else np.asarray(ids)
    if a.dtype != _U64:
        if a.dtype.kind not in "iu" and a.size:
            raise InvalidArgumentError(f"ids: integers expected, got {a.dtype}")
        a = a.astype(_U64, copy=False) if a.dtype == _I64 else a.astype(_U64)
    if a.ndim != 1:
        raise InvalidArgumentError(f"ids: one dimension expected, got shape {a.shape}")
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _counts(counts, n, what):
    a = counts if type(counts) is np.ndarray else np.asarray(counts)
    if a.dtype != _I64:
        if a.dtype.kind not in "iu" and a.size:
            raise InvalidArgumentError(f"{what}: integers expected, got {a.dtype}")
        a = a.astype(_I64)
    if a.ndim != 1 or a.shape[0] != n:
        raise InvalidArgumentError(f"{what}: {n} entries expected (one per id), got shape {a.shape}")
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _ptr(a):
    return a.__array_interface__["data"][0]


@dataclasses.dataclass(frozen=True)
class Stats:
    """kvmem/stats.h's Stats: requests, tokens, bytes, pages and activity."""
    num_requests: int
    logical_tokens: int
    stored_tokens: int
    live_bytes: int
    held_bytes: int
    idle_bytes: int
    mapped_bytes: int
    physical_bytes: int
    budget_bytes: int
    page_bytes: int
    pages_total: int
    pages_free: int
    pages_used: int
    pages_shared: int
    pages_quarantined: int
    peak_requests: int
    peak_held_bytes: int
    peak_live_bytes: int
    extends: int
    forks: int
    cow_copies: int
    pages_reclaimed: int
    map_stalls: int
    pool_create_nanos: int
    vmm_calls: int
    vmm_nanos: int
    vmm_live_reservations: int
    vmm_live_handles: int
    vmm_mapped_granules: int

    @property
    def internal_fragmentation(self):
        """1 - live / held."""
        return 0.0 if self.held_bytes == 0 else 1.0 - self.live_bytes / self.held_bytes

    @property
    def utilisation(self):
        return 1.0 if self.held_bytes == 0 else self.live_bytes / self.held_bytes


@dataclasses.dataclass(frozen=True)
class LayerView:
    """One layer's K and V (what a kernel needs): ``k`` / ``v`` are DLPack arrays shaped
    [num_pages, page_tokens, kv_heads, head_dim] (paged), [max_requests, max_context,
    kv_heads, head_dim] (virtual without chunks) or [max_requests, chunks, chunk_tokens,
    kv_heads, head_dim] (virtual in chunks); the accessor's fields in elements."""
    layer: int
    layout: str
    k: Array
    v: Array
    token_stride: int
    page_stride: int
    page_tokens: int
    num_pages: int
    row_stride: int
    max_context: int
    chunk_shift: int
    chunk_gap: int


@dataclasses.dataclass(frozen=True)
class RunningBatchArrays:
    """The running batch's arrays (fixed addresses; contents change with every call that
    changes a member). ``page_table`` and ``last_page_len`` are None for the virtual
    layout."""
    size: int
    max_batch: int
    max_seq_len: int
    seq_lens: Array
    row_ids: Array
    page_table: Array
    last_page_len: Array


class KvCache:
    """A KV cache (kvmem::KvCache) over the C ABI.

    Keywords mirror KvCacheConfig (kvmem/config.h): num_layers, num_kv_heads, head_dim,
    dtype ("bfloat16" / "float16" / "float32" or torch / numpy dtypes), layout ("paged" /
    "virtual"), arrangement ("all_layers" / "per_layer"), chunk_tokens, page_tokens,
    page_placement ("contiguous" / "lowest_first"), max_requests, max_context,
    memory_budget_bytes, device ("host", "cuda", "cuda:N"), host_granularity, elastic_pool,
    map_ahead_tokens. Unset keywords keep KvCacheConfig's defaults.

    Thread safety: as KvCache, every method may be called from several threads.
    ``close()`` (or leaving a ``with`` block) ends the cache; tensors made from its DLPack
    arrays keep its memory until they are gone.
    """

    def __init__(self, **config):
        self._handle = None
        c = _lib.sized(_lib.Config)
        check(_lib.config_init(byref(c)))
        for key, value in config.items():
            if key == "dtype":
                c.dtype = _enum("dtype", value, _DTYPES)
            elif key == "layout":
                c.layout = _enum("layout", value, _LAYOUTS)
            elif key == "arrangement":
                c.arrangement = _enum("arrangement", value, _ARRANGEMENTS)
            elif key == "page_placement":
                c.page_placement = _enum("page_placement", value, _PLACEMENTS)
            elif key == "device":
                c.device, c.device_ordinal = _device(value)
            elif key == "elastic_pool":
                c.elastic_pool = 1 if value else 0
            elif key in ("num_layers", "num_kv_heads", "head_dim", "chunk_tokens", "page_tokens",
                         "max_requests", "max_context", "memory_budget_bytes", "device_ordinal",
                         "host_granularity", "map_ahead_tokens"):
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise InvalidArgumentError(f"{key}={value!r}: an integer expected")
                bits = 64 if key in ("max_context", "memory_budget_bytes", "host_granularity",
                                     "map_ahead_tokens") else 32
                if not -(1 << (bits - 1)) <= int(value) < (1 << (bits - 1)):
                    raise InvalidArgumentError(f"{key}={value}: out of the int{bits} range")
                setattr(c, key, int(value))
            else:
                raise TypeError(f"KvCache: unknown keyword {key!r}")
        handle = c_void_p()
        check(_lib.cache_create(byref(c), byref(handle)))
        self._handle = handle.value
        self._deferred = None
        self._config = c
        self._stats = _lib.sized(_lib.StatsStruct)
        self._n = c_int64()
        self._row = c_int32()

    # ---- lifetime -------------------------------------------------------------------
    def close(self):
        """Ends the cache (idempotent): later calls raise. Its memory is released now, or,
        while tensors made from its DLPack arrays are alive, when the last of them goes.
        REQUIRES: no kernel still reads it."""
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        if _dlpack.exports_of(self):
            self._deferred = handle  # the exports hold this object: __del__ destroys it
        else:
            _lib.cache_destroy(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            deferred = getattr(self, "_deferred", None)
            if deferred is not None:
                self._deferred = None
                _lib.cache_destroy(deferred)
            self.close()
        except Exception:
            pass

    @property
    def handle(self):
        if self._handle is None:
            raise InvalidArgumentError("the cache is closed")
        return self._handle

    # ---- configuration ----------------------------------------------------------------
    @property
    def config(self):
        c = self._config
        return {
            "num_layers": c.num_layers, "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "dtype": DTYPE_NAMES[c.dtype], "layout": ("paged", "virtual")[c.layout],
            "arrangement": ("all_layers", "per_layer")[c.arrangement],
            "chunk_tokens": c.chunk_tokens, "page_tokens": c.page_tokens,
            "page_placement": ("contiguous", "lowest_first")[c.page_placement],
            "max_requests": c.max_requests, "max_context": c.max_context,
            "memory_budget_bytes": c.memory_budget_bytes,
            "device": "host" if c.device == 0 else f"cuda:{c.device_ordinal}",
            "host_granularity": c.host_granularity, "elastic_pool": bool(c.elastic_pool),
            "map_ahead_tokens": c.map_ahead_tokens,
        }

    @property
    def layout(self):
        return ("paged", "virtual")[self._config.layout]

    @property
    def dtype(self):
        return DTYPE_NAMES[self._config.dtype]

    @property
    def on_cuda(self):
        return self._config.device == 1

    def __repr__(self):
        if self._handle is None:
            return "kvmem.KvCache(closed)"
        c = self.config
        return (f"kvmem.KvCache(layout={c['layout']}, layers={c['num_layers']}, "
                f"kv_heads={c['num_kv_heads']}, head_dim={c['head_dim']}, dtype={c['dtype']}, "
                f"device={c['device']})")

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, request_id):
        """Starts a request with 0 tokens; returns its row."""
        check(_lib.add_request(self.handle, request_id, ctypes.addressof(self._row)))
        return self._row.value

    def extend(self, request_id, n):
        """Memory for n more tokens of one request; their locations (int64 array)."""
        out = np.empty(max(int(n), 0), _I64)
        check(_lib.extend(self.handle, request_id, n, _ptr(out), out.shape[0]))
        return out

    def truncate(self, request_id, new_length):
        check(_lib.truncate(self.handle, request_id, new_length))

    def fork(self, parent, child):
        """Starts ``child`` sharing ``parent``'s whole context; returns the child's row."""
        check(_lib.fork(self.handle, parent, child, ctypes.addressof(self._row)))
        return self._row.value

    def free(self, ids, fence=None):
        """Ends one request (an int) or several (a sequence / array) under one fence: a
        CUDA event handle as an int (torch.cuda.Event().cuda_event), or None. The cache
        queries the event until it completes, so it must stay alive that long: keep one
        event and record it again before each free (a later record on the same stream
        completes after the earlier work), rather than a new event per call."""
        fence = _fence(fence)
        if isinstance(ids, (int, np.integer)):
            check(_lib.free(self.handle, int(ids), fence))
            return
        a = _ids(ids)
        check(_lib.free_batch(self.handle, _ptr(a), a.shape[0], fence))

    # ---- the step's batch calls ---------------------------------------------------------
    def extend_batch(self, ids, counts, out=None):
        """Extends ids[i] by counts[i] tokens (all or nothing) and returns the new tokens'
        locations, request after request, as an int64 array (``out``, a contiguous int64
        numpy array of at least sum(counts) entries, is filled and returned instead)."""
        a = _ids(ids)
        n = a.shape[0]
        c = _counts(counts, n, "counts")
        if out is None:
            total = int(c.sum()) if n else 0
            if total < 0:
                raise InvalidArgumentError("counts: negative total")
            out = np.empty(total, _I64)
            cap = total
        else:
            if type(out) is not np.ndarray or out.dtype != _I64 or not out.flags.c_contiguous \
                    or not out.flags.writeable or out.ndim != 1:
                raise InvalidArgumentError("out: a writable contiguous 1-D int64 array expected")
            cap = out.shape[0]
        check(_lib.extend_batch(self.handle, _ptr(a), _ptr(c), n, _ptr(out), cap))
        return out

    def truncate_batch(self, ids, new_lengths):
        a = _ids(ids)
        c = _counts(new_lengths, a.shape[0], "new_lengths")
        check(_lib.truncate_batch(self.handle, _ptr(a), _ptr(c), a.shape[0]))

    # ---- queries --------------------------------------------------------------------------
    def length(self, request_id):
        check(_lib.length(self.handle, request_id, ctypes.addressof(self._n)))
        return self._n.value

    def row(self, request_id):
        check(_lib.row(self.handle, request_id, ctypes.addressof(self._row)))
        return self._row.value

    def __contains__(self, request_id):
        yes = c_int32()
        check(_lib.contains(self.handle, request_id, byref(yes)))
        return bool(yes.value)

    def req_to_token(self, request_id):
        """The request's index row: one int32 location per token."""
        out = np.empty(self.length(request_id), np.int32)
        n = c_int64()
        check(_lib.req_to_token(self.handle, request_id, _ptr(out), out.shape[0], byref(n)))
        return out[: n.value]

    def block_table(self, request_id):
        """Paged: the request's page ids (FailedPreconditionError for virtual)."""
        pt = self._config.page_tokens
        out = np.empty((self.length(request_id) + pt - 1) // pt + 1, np.int32)
        n = c_int64()
        check(_lib.block_table(self.handle, request_id, _ptr(out), out.shape[0], byref(n)))
        return out[: n.value]

    def trim(self):
        """Gives back memory no request holds; returns the bytes."""
        n = c_int64()
        check(_lib.trim(self.handle, byref(n)))
        return n.value

    @property
    def stats(self):
        s = self._stats
        check(_lib.get_stats(self.handle, byref(s)))
        return Stats(*(getattr(s, f) for f in _lib.STATS_FIELDS))

    def check_invariants(self):
        """Raises kvmem.InternalError naming a violated invariant (a kvmem bug)."""
        check(_lib.check_invariants(self.handle))

    # ---- memory, zero-copy ------------------------------------------------------------------
    def _device(self):
        c = self._config
        return (KDL_CUDA, c.device_ordinal) if c.device == 1 else (KDL_CPU, 0)

    def layer(self, layer):
        """The view of one layer (:class:`LayerView`); its ``k`` and ``v`` are DLPack
        arrays over the cache's memory. Only pages and rows holding tokens are mapped."""
        v = _lib.sized(_lib.LayerView)
        check(_lib.layer_view_get(self.handle, layer, byref(v)))
        shape = tuple(v.shape[i] for i in range(v.ndim))
        strides = tuple(v.strides[i] for i in range(v.ndim))
        dev, ordinal = self._device()
        dtype = DTYPE_NAMES[v.dtype]
        k = Array(self, v.k, shape, strides, dtype, dev, ordinal)
        vv = Array(self, v.v, shape, strides, dtype, dev, ordinal)
        return LayerView(layer, ("paged", "virtual")[v.layout], k, vv, v.token_stride,
                         v.page_stride, v.page_tokens, v.num_pages, v.row_stride, v.max_context,
                         v.chunk_shift, v.chunk_gap)

    def k(self, layer):
        """Layer ``layer``'s K as a DLPack array (see :meth:`layer`)."""
        return self.layer(layer).k

    def v(self, layer):
        return self.layer(layer).v

    def kv_slot_index(self, locations):
        """The index tuple of each location in :meth:`layer`'s K/V arrays (numpy arrays, one
        per leading dimension): ``k_np[cache.kv_slot_index(locs)]`` are the tokens'
        [kv_heads, head_dim] blocks."""
        loc = np.asarray(locations, dtype=np.int64)
        c = self._config
        if c.layout == 0:
            return (loc // c.page_tokens, loc % c.page_tokens)
        v = self.layer(0)
        pos = loc % v.max_context
        if v.k.ndim == 5:
            return (loc // v.max_context, pos >> v.chunk_shift, pos & ((1 << v.chunk_shift) - 1))
        return (loc // v.max_context, pos)

    # ---- the running batch ----------------------------------------------------------------
    def set_running_batch(self, ids):
        """Makes ``ids`` the running batch (KvCache::SetRunningBatch)."""
        a = _ids(ids)
        check(_lib.set_running_batch(self.handle, _ptr(a), a.shape[0]))

    def running_batch(self):
        """Its host arrays as DLPack arrays (:class:`RunningBatchArrays`; fixed addresses)."""
        b = _lib.sized(_lib.RunningBatch)
        check(_lib.running_batch_get(self.handle, byref(b)))
        return _batch_arrays(self, b, KDL_CPU, 0)

    def pack_running_batch(self):
        """FlashInfer's CSR form (paged): (indptr, indices, last_page_len) DLPack arrays;
        indptr has size + 1 entries, indices indptr[size]."""
        csr = _lib.sized(_lib.RunningBatchCsr)
        check(_lib.pack_running_batch(self.handle, byref(csr)))
        b = _lib.sized(_lib.RunningBatch)
        check(_lib.running_batch_get(self.handle, byref(b)))
        indptr = Array(self, csr.indptr, (csr.size + 1,), (1,), "int32", read_only=True)
        used = ctypes.cast(csr.indptr, ctypes.POINTER(c_int32))[csr.size] if csr.indptr else 0
        indices = Array(self, csr.indices, (used,), (1,), "int32", read_only=True)
        last = Array(self, csr.last_page_len, (csr.size,), (1,), "int32", read_only=True)
        return indptr, indices, last

    def take_running_batch_changes(self):
        """(all, entries): whether every page-table entry may have changed, and the indices
        into page_table written since the last call (a numpy copy)."""
        ch = _lib.sized(_lib.RunningBatchChanges)
        check(_lib.take_running_batch_changes(self.handle, byref(ch)))
        if ch.num_entries:
            buf = (ctypes.c_int64 * ch.num_entries).from_address(ch.entries)
            entries = np.frombuffer(buf, dtype=np.int64).copy()
        else:
            entries = np.empty(0, np.int64)
        return bool(ch.all), entries


def _batch_arrays(owner, b, dev, ordinal):
    if not b.seq_lens:
        raise InvalidArgumentError("no running batch yet: call set_running_batch first")
    mb = b.max_batch
    ro = dev == KDL_CPU  # the cache's own arrays are written only by the cache

    def arr(ptr, shape, strides):
        return None if not ptr else Array(owner, ptr, shape, strides, "int32", dev, ordinal, ro)

    stride = b.page_table_stride
    return RunningBatchArrays(
        b.size, mb, b.max_seq_len, arr(b.seq_lens, (mb,), (1,)), arr(b.row_ids, (mb,), (1,)),
        arr(b.page_table, (mb, stride), (stride, 1)), arr(b.last_page_len, (mb,), (1,)))


def _fence(fence):
    if fence is None:
        return None
    if isinstance(fence, (int, np.integer)):
        return int(fence) or None
    event = getattr(fence, "cuda_event", None)  # a torch.cuda.Event
    if isinstance(event, int):
        return event or None
    raise InvalidArgumentError(
        f"fence={fence!r}: a CUDA event handle (int) or torch.cuda.Event expected")
