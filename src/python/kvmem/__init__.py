"""kvmem from Python: the KV-cache memory manager and its attention kernels over the C ABI
(ctypes; no compiled Python extension, no libtorch), with zero-copy DLPack tensors.

    import kvmem
    with kvmem.KvCache(num_layers=32, num_kv_heads=8, head_dim=128, layout="paged",
                       device="cuda") as cache:
        cache.add_request(1)
        locs = cache.extend_batch([1], [17])           # int64 locations
        k0 = torch.from_dlpack(cache.k(0))             # layer 0's K pool, no copy

docs/python.md has the install command, the API and a whole decode step.
"""

from . import _lib
from ._dlpack import Array
from .cache import KvCache, LayerView, RunningBatchArrays, Stats
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors
from .kernels import (DecodeWorkspace, DeviceRunningBatch, ExtendWorkspace, append_kv, decode,
                      extend)

__version__ = _lib.version().decode()

__all__ = ["KvCache", "Stats", "LayerView", "RunningBatchArrays", "Array", "DecodeWorkspace",
           "ExtendWorkspace", "DeviceRunningBatch", "append_kv", "decode", "extend",
           "has_cuda", "library_path", "__version__"] + list(_errors)


def has_cuda():
    """True when libkvmem.so was built with its CUDA parts (kernels, CUDA backend)."""
    return bool(_lib.has_cuda())


def library_path():
    """The libkvmem.so this package loaded."""
    return _lib.path
