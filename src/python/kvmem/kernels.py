"""The CUDA kernels from Python: append_kv, decode and extend on a cache's memory, taking
torch (or any DLPack) tensors and running on the caller's CUDA stream (torch's current
stream when torch is imported and no stream is given). Every tensor is checked (dtype,
shape, device, contiguity, alignment) before anything is launched: a bad one raises
kvmem.InvalidArgumentError. On a library built without CUDA every call raises
kvmem.UnimplementedError; on a host cache, kvmem.FailedPreconditionError.
"""

import sys
from ctypes import byref, c_void_p

import numpy as np

from . import _lib
from ._dlpack import KDL_CUDA, KDL_CUDA_MANAGED, tensor_info
from ._lib import check
from .cache import DTYPE_NAMES, KvCache, _batch_arrays
from .errors import FailedPreconditionError, InvalidArgumentError


def _stream(stream):
    """A cudaStream_t as an int: the given one (an int, or an object with .cuda_stream such
    as torch.cuda.Stream), else torch's current stream, else the legacy default (0)."""
    if stream is None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.current_stream().cuda_stream
        return 0
    if isinstance(stream, (int, np.integer)):
        return int(stream)
    handle = getattr(stream, "cuda_stream", None)
    if isinstance(handle, int):
        return handle
    raise InvalidArgumentError(f"stream={stream!r}: a cudaStream_t (int) or torch.cuda.Stream expected")


def _check_cache(cache):
    if not isinstance(cache, KvCache):
        raise InvalidArgumentError(f"a kvmem.KvCache expected, got {type(cache).__name__}")
    if not cache.on_cuda:
        raise FailedPreconditionError(
            "the cache is on the host backend: kernels need KvCache(device='cuda')")


def _tensor(name, obj, cache, shape, dtype, stream):
    """Reads and checks one device tensor argument; `shape` may hold None for any size."""
    t = tensor_info(obj, stream)
    if t.device_type not in (KDL_CUDA, KDL_CUDA_MANAGED):
        raise InvalidArgumentError(f"{name}: a CUDA tensor expected, got device type {t.device_type}")
    ordinal = cache._config.device_ordinal
    if t.device_id != ordinal:
        raise InvalidArgumentError(f"{name}: on cuda:{t.device_id}, the cache on cuda:{ordinal}")
    if t.dtype != dtype:
        raise InvalidArgumentError(f"{name}: dtype {t.dtype}, {dtype} expected")
    if len(t.shape) != len(shape) or any(w is not None and w != s for w, s in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise InvalidArgumentError(f"{name}: shape {list(t.shape)}, {want} expected")
    if not t.contiguous():
        raise InvalidArgumentError(f"{name}: not contiguous (strides {t.strides})")
    if t.ptr % 16:
        raise InvalidArgumentError(f"{name}: address 0x{t.ptr:x} not 16-byte aligned")
    return t


def append_kv(cache, layer, k, v, slots, *, stream=None):
    """Writes new tokens' K and V to their locations in layer ``layer`` (or, with k and v
    shaped [num_layers, num_tokens, kv_heads, head_dim], in layers layer.. layer+num_layers-1).
    k, v: [num_tokens, kv_heads, head_dim] CUDA tensors in the cache's dtype; slots:
    [num_tokens] int64 CUDA tensor of locations from extend / extend_batch (negative: skip)."""
    _check_cache(cache)
    s = _stream(stream)
    c = cache._config
    dtype = DTYPE_NAMES[c.dtype]
    kt = tensor_info(k, s)
    layers = 1 if len(kt.shape) == 3 else (kt.shape[0] if len(kt.shape) == 4 else None)
    if layers is None:
        raise InvalidArgumentError(f"k: shape {list(kt.shape)}, [tokens, kv_heads, head_dim] "
                                   "or [layers, tokens, kv_heads, head_dim] expected")
    tokens = kt.shape[-3]
    lead = () if len(kt.shape) == 3 else (layers,)
    shape = lead + (tokens, c.num_kv_heads, c.head_dim)
    kt = _tensor("k", k, cache, shape, dtype, s)
    vt = _tensor("v", v, cache, shape, dtype, s)
    st = _tensor("slots", slots, cache, (tokens,), "int64", s)
    check(_lib.append_kv(cache.handle, layer, layers, kt.ptr, vt.ptr, 0, 0, st.ptr, tokens, s))


class DeviceRunningBatch:
    """A device copy of a cache's running batch (DeviceRunningBatch): its arrays keep their
    device addresses (a CUDA graph can capture them); upload() brings them up to date."""

    def __init__(self, cache):
        _check_cache(cache)
        self.cache = cache
        self._handle = None
        h = c_void_p()
        check(_lib.device_running_batch_create(cache.handle, byref(h)))
        self._handle = h.value

    def upload(self, stream=None):
        """Enqueues on the stream the copy of what changed since the last upload."""
        check(_lib.device_running_batch_upload(self.handle, self.cache.handle, _stream(stream)))

    def arrays(self):
        """The mirror's arrays as DLPack arrays on the device (RunningBatchArrays)."""
        b = _lib.sized(_lib.RunningBatch)
        check(_lib.device_running_batch_view(self.handle, byref(b)))
        return _batch_arrays(self, b, KDL_CUDA, self.cache._config.device_ordinal)

    @property
    def handle(self):
        if self._handle is None:
            raise InvalidArgumentError("the device running batch is closed")
        return self._handle

    def close(self):
        if self._handle is not None:
            _lib.device_running_batch_destroy(self._handle)
            self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _options(cache, num_q_heads, max_batch, scale, window_left, fixed_grid):
    o = _lib.sized(_lib.AttentionOptions)
    check(_lib.attention_options_init(byref(o)))
    o.num_q_heads = int(num_q_heads)
    o.scale = float(scale)
    o.window_left = int(window_left)
    o.max_batch = int(max_batch or 0)
    o.fixed_grid = 1 if fixed_grid else 0
    return o


def _table(cache, batch, table, what):
    """Host int32 page table [batch, stride] (paged) or row ids [batch] (virtual)."""
    a = np.ascontiguousarray(np.asarray(table), dtype=np.int32)
    if cache.layout == "paged":
        if a.ndim != 2 or a.shape[0] != batch:
            raise InvalidArgumentError(f"{what}: [batch={batch}, pages] page table expected, "
                                       f"got shape {a.shape}")
        return a, a.shape[1]
    if a.ndim != 1 or a.shape[0] != batch:
        raise InvalidArgumentError(f"{what}: [batch={batch}] row ids expected, got shape {a.shape}")
    return a, 0


def _lens(x, what):
    a = np.ascontiguousarray(np.asarray(x), dtype=np.int32)
    if a.ndim != 1:
        raise InvalidArgumentError(f"{what}: one dimension expected, got shape {a.shape}")
    return a


class DecodeWorkspace:
    """Decode attention (one query token per request) on a cache's layers.

    plan() with explicit lengths and page table (or row ids), or plan_running_batch() for
    the cache's running batch; then decode(layer, q, out) per layer. With a paged running
    batch the kernel reads the page table of a DeviceRunningBatch: pass it as ``mirror``.
    """

    def __init__(self, cache, num_q_heads, *, max_batch=0, scale=0.0, window_left=-1,
                 fixed_grid=False):
        _check_cache(cache)
        self.cache = cache
        self.num_q_heads = int(num_q_heads)
        self._handle = None
        self._batch = 0
        o = _options(cache, num_q_heads, max_batch, scale, window_left, fixed_grid)
        h = c_void_p()
        check(_lib.decode_workspace_create(cache.handle, byref(o), byref(h)))
        self._handle = h.value

    def plan(self, seq_lens, table, *, stream=None):
        lens = _lens(seq_lens, "seq_lens")
        t, stride = _table(self.cache, lens.shape[0], table, "table")
        check(_lib.decode_plan(self.handle, lens.ctypes.data, lens.shape[0], t.ctypes.data,
                               stride, _stream(stream)))
        self._batch = lens.shape[0]

    def plan_running_batch(self, *, stream=None):
        check(_lib.decode_plan_running_batch(self.handle, self.cache.handle, _stream(stream)))
        self._batch = self.cache.running_batch().size

    def decode(self, layer, q, out, *, mirror=None, stream=None):
        """q, out: [batch, num_q_heads, head_dim] CUDA tensors in the cache's dtype, batch
        as planned."""
        s = _stream(stream)
        c = self.cache._config
        dtype = DTYPE_NAMES[c.dtype]
        shape = (self._batch, self.num_q_heads, c.head_dim)
        qt = _tensor("q", q, self.cache, shape, dtype, s)
        ot = _tensor("out", out, self.cache, shape, dtype, s)
        if mirror is not None and not isinstance(mirror, DeviceRunningBatch):
            raise InvalidArgumentError("mirror: a kvmem.DeviceRunningBatch expected")
        check(_lib.decode(self.handle, self.cache.handle, layer,
                          mirror.handle if mirror is not None else None, qt.ptr, ot.ptr, s))

    @property
    def handle(self):
        if self._handle is None:
            raise InvalidArgumentError("the workspace is closed")
        return self._handle

    def close(self):
        if self._handle is not None:
            _lib.decode_workspace_destroy(self._handle)
            self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class ExtendWorkspace:
    """Extend / prefill attention on a ragged batch: request b has prefix_lens[b] cached
    tokens and new_lens[b] new ones (already appended); their queries attend causally."""

    def __init__(self, cache, num_q_heads, *, max_batch=0, max_new_tokens=0, scale=0.0,
                 window_left=-1, fixed_grid=False):
        _check_cache(cache)
        self.cache = cache
        self.num_q_heads = int(num_q_heads)
        self._handle = None
        self._total = 0
        o = _options(cache, num_q_heads, max_batch, scale, window_left, fixed_grid)
        o.max_new_tokens = int(max_new_tokens)
        h = c_void_p()
        check(_lib.extend_workspace_create(cache.handle, byref(o), byref(h)))
        self._handle = h.value

    def plan(self, prefix_lens, new_lens, table, *, stream=None):
        prefix = _lens(prefix_lens, "prefix_lens")
        fresh = _lens(new_lens, "new_lens")
        if fresh.shape != prefix.shape:
            raise InvalidArgumentError("prefix_lens and new_lens differ in length")
        t, stride = _table(self.cache, prefix.shape[0], table, "table")
        check(_lib.extend_plan(self.handle, prefix.ctypes.data, fresh.ctypes.data,
                               prefix.shape[0], t.ctypes.data, stride, _stream(stream)))
        self._total = int(fresh.sum())

    def extend(self, layer, q, out, *, stream=None):
        """q, out: [total_new, num_q_heads, head_dim] CUDA tensors in the cache's dtype."""
        s = _stream(stream)
        c = self.cache._config
        dtype = DTYPE_NAMES[c.dtype]
        shape = (self._total, self.num_q_heads, c.head_dim)
        qt = _tensor("q", q, self.cache, shape, dtype, s)
        ot = _tensor("out", out, self.cache, shape, dtype, s)
        check(_lib.extend_attention(self.handle, self.cache.handle, layer, qt.ptr, ot.ptr, s))

    @property
    def handle(self):
        if self._handle is None:
            raise InvalidArgumentError("the workspace is closed")
        return self._handle

    def close(self):
        if self._handle is not None:
            _lib.extend_workspace_destroy(self._handle)
            self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def decode(workspace, layer, q, out, *, mirror=None, stream=None):
    """Decode attention of the workspace's last plan on one layer (DecodeWorkspace.decode)."""
    workspace.decode(layer, q, out, mirror=mirror, stream=stream)


def extend(workspace, layer, q, out, *, stream=None):
    """Extend attention of the workspace's last plan on one layer (ExtendWorkspace.extend)."""
    workspace.extend(layer, q, out, stream=stream)
