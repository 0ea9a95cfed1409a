"""DLPack in pure Python (ctypes): kvmem's memory handed to numpy / torch / CuPy / JAX
without a copy, and tensors of any of them read as (pointer, shape, strides, dtype,
device) for the kernels.

Producer: :class:`Array` implements ``__dlpack__`` / ``__dlpack_device__``. Each call
builds a DLManagedTensor (or DLManagedTensorVersioned when the consumer asks for DLPack
>= 1.0) in ctypes memory, wraps it in a PyCapsule made with ``ctypes.pythonapi``, and
keeps it, its shape and strides and the owner (the KvCache or device mirror whose memory
it is) in a table until the consumer calls the deleter, or, if nobody consumed the
capsule, until the capsule is collected. So an array taken from a cache keeps the cache
alive for as long as the consumer's tensor lives.
"""

import ctypes
import weakref
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char_p, c_int, c_int32, c_int64,
                    c_uint8, c_uint16, c_uint32, c_uint64, c_void_p)

from .errors import InvalidArgumentError

KDL_CPU = 1
KDL_CUDA = 2
KDL_CUDA_HOST = 3
KDL_CUDA_MANAGED = 13

KDL_INT, KDL_UINT, KDL_FLOAT, KDL_BFLOAT = 0, 1, 2, 4

# name -> (code, bits)
DTYPES = {
    "float32": (KDL_FLOAT, 32), "bfloat16": (KDL_BFLOAT, 16), "float16": (KDL_FLOAT, 16),
    "int32": (KDL_INT, 32), "int64": (KDL_INT, 64), "uint16": (KDL_UINT, 16),
    "uint64": (KDL_UINT, 64), "int8": (KDL_INT, 8), "uint8": (KDL_UINT, 8),
    "float64": (KDL_FLOAT, 64),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class DLDevice(Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DLDataType(Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(Structure):
    _fields_ = [("data", c_void_p), ("device", DLDevice), ("ndim", c_int32),
                ("dtype", DLDataType), ("shape", POINTER(c_int64)),
                ("strides", POINTER(c_int64)), ("byte_offset", c_uint64)]


_Deleter = CFUNCTYPE(None, c_void_p)


class DLManagedTensor(Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", c_void_p), ("deleter", _Deleter)]


class DLPackVersion(Structure):
    _fields_ = [("major", c_uint32), ("minor", c_uint32)]


class DLManagedTensorVersioned(Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", c_void_p), ("deleter", _Deleter),
                ("flags", c_uint64), ("dl_tensor", DLTensor)]


DLPACK_FLAG_READ_ONLY = 1

_api = ctypes.pythonapi
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [c_void_p, c_char_p, c_void_p]
_api.PyCapsule_IsValid.restype = c_int
_api.PyCapsule_IsValid.argtypes = [c_void_p, c_char_p]
_api.PyCapsule_GetPointer.restype = c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, c_char_p]
# The same function taking the capsule by address (in its destructor, at refcount 0).
_get_pointer_raw = ctypes.PYFUNCTYPE(c_void_p, c_void_p, c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))

# Capsule names: PyCapsule_New keeps the pointer, so they live as long as the module.
_NAME = b"dltensor"
_NAME_VERSIONED = b"dltensor_versioned"

# address of a managed tensor -> everything it points to, and its owner
_alive = {}


def _release(address):
    try:
        _alive.pop(address, None)
    except Exception:  # interpreter shutdown: the table may already be gone
        pass


@_Deleter
def _deleter(address):
    _release(address)


@CFUNCTYPE(None, c_void_p)
def _capsule_destructor(capsule):
    # The capsule is being freed (refcount 0): read it by address only. A consumer that
    # took the tensor renamed it ("used_dltensor") and owns the deleter call.
    try:
        for name in (_NAME, _NAME_VERSIONED):
            if _api.PyCapsule_IsValid(capsule, name):
                _release(_get_pointer_raw(capsule, name))
                return
    except Exception:
        pass


_DESTRUCTOR = ctypes.cast(_capsule_destructor, c_void_p).value


class Array:
    """A strided array in kvmem's memory (or a device mirror's), exported with DLPack.

    ``numpy.from_dlpack(a)`` / ``torch.from_dlpack(a)`` give a tensor over the same
    memory (no copy): ``data_ptr`` is its address. Shapes and strides are in elements.
    The array keeps ``owner`` alive, and so does every tensor made from it.
    """

    __slots__ = ("owner", "data_ptr", "shape", "strides", "dtype", "device_type",
                 "device_id", "read_only", "_tracked", "__weakref__")

    def __init__(self, owner, data_ptr, shape, strides, dtype, device_type=KDL_CPU,
                 device_id=0, read_only=False):
        self.owner = owner
        self.data_ptr = int(data_ptr or 0)
        self.shape = tuple(int(s) for s in shape)
        self.strides = tuple(int(s) for s in strides)
        self.dtype = dtype
        self.device_type = device_type
        self.device_id = device_id
        self.read_only = read_only
        self._tracked = False

    def __repr__(self):
        where = "cpu" if self.device_type == KDL_CPU else f"cuda:{self.device_id}"
        return (f"kvmem.Array(shape={self.shape}, strides={self.strides}, dtype={self.dtype}, "
                f"device={where}, data_ptr=0x{self.data_ptr:x})")

    @property
    def ndim(self):
        return len(self.shape)

    def __dlpack_device__(self):
        return (self.device_type, self.device_id)

    def view(self, dtype):
        """The same memory as another dtype of the same size (bfloat16 as uint16 bits, for
        numpy, which has no bfloat16)."""
        if DTYPES[dtype][1] != DTYPES[self.dtype][1]:
            raise InvalidArgumentError(f"view as {dtype}: element size differs from {self.dtype}")
        return Array(self.owner, self.data_ptr, self.shape, self.strides, dtype,
                     self.device_type, self.device_id, self.read_only)

    _TYPESTR = {"float32": "<f4", "float16": "<f2", "int32": "<i4", "int64": "<i8",
                "uint16": "<u2", "uint64": "<u8", "int8": "|i1", "uint8": "|u1", "float64": "<f8"}

    @property
    def __array_interface__(self):
        """numpy's protocol, for host arrays: ``numpy.asarray(a)`` is a writable view
        without a copy (numpy < 2.1 marks arrays from DLPack read-only)."""
        if self.device_type != KDL_CPU:
            raise AttributeError("__array_interface__: the array is on a CUDA device")
        if self.dtype not in self._TYPESTR:
            raise AttributeError(f"__array_interface__: numpy has no {self.dtype}; "
                                 "use .view('uint16')")
        if getattr(self.owner, "_handle", True) is None:
            raise AttributeError("the kvmem object this array belongs to is closed")
        if not self._tracked:
            # numpy keeps this object as the array's base: count it as an export until it
            # is gone, so that closing the owner waits for it.
            self._tracked = True
            key = ("array", id(self))
            _alive[key] = (None, None, None, self.owner)
            weakref.finalize(self, _release, key)
        size = DTYPES[self.dtype][1] // 8
        return {"version": 3, "shape": self.shape, "typestr": self._TYPESTR[self.dtype],
                "strides": tuple(s * size for s in self.strides),
                "data": (self.data_ptr, self.read_only)}

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        # No stream to order against: kvmem's memory is written by the caller's own work.
        if copy:
            raise BufferError("kvmem.Array exports its memory only (copy=True unsupported)")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"kvmem.Array is on {self.__dlpack_device__()}, not {dl_device}")
        if getattr(self.owner, "_handle", True) is None:
            raise BufferError("the kvmem object this array belongs to is closed")
        versioned = max_version is not None and tuple(max_version)[0] >= 1
        ndim = len(self.shape)
        shape = (c_int64 * max(ndim, 1))(*self.shape)
        strides = (c_int64 * max(ndim, 1))(*self.strides)
        if versioned:
            managed = DLManagedTensorVersioned()
            managed.version.major, managed.version.minor = 1, 0
            managed.flags = DLPACK_FLAG_READ_ONLY if self.read_only else 0
            name = _NAME_VERSIONED
        else:
            managed = DLManagedTensor()
            name = _NAME
        t = managed.dl_tensor
        t.data = self.data_ptr
        t.device.device_type = self.device_type
        t.device.device_id = self.device_id
        t.ndim = ndim
        t.dtype.code, t.dtype.bits = DTYPES[self.dtype]
        t.dtype.lanes = 1
        t.shape = ctypes.cast(shape, POINTER(c_int64))
        t.strides = ctypes.cast(strides, POINTER(c_int64))
        t.byte_offset = 0
        managed.deleter = _deleter
        address = ctypes.addressof(managed)
        _alive[address] = (managed, shape, strides, self.owner)
        try:
            return _api.PyCapsule_New(address, name, _DESTRUCTOR)
        except BaseException:
            _release(address)
            raise


def exports_of(owner):
    """Managed tensors of `owner` handed out and not yet deleted."""
    return sum(1 for entry in list(_alive.values()) if entry[3] is owner)


def live_exports():
    """Managed tensors handed out and not yet deleted (for leak tests)."""
    return len(_alive)


# ---- consumer: what a tensor argument of a kernel is ----------------------------------

class TensorInfo:
    __slots__ = ("ptr", "shape", "strides", "dtype", "device_type", "device_id", "keep")

    def contiguous(self):
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.strides)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


_TORCH_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16",
                 "torch.float32": "float32", "torch.int32": "int32", "torch.int64": "int64"}


def tensor_info(obj, stream=None):
    """Reads a tensor argument: torch tensors directly, anything else through DLPack
    (``stream``, a CUDA stream as an int, is passed to the producer of a CUDA tensor so
    that it orders its pending work before ours; per the DLPack rules 1 stands for the
    legacy default stream)."""
    info = TensorInfo()
    if type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr"):
        info.ptr = obj.data_ptr()
        info.shape = tuple(obj.shape)
        info.strides = tuple(obj.stride())
        info.dtype = _TORCH_DTYPES.get(str(obj.dtype), str(obj.dtype))
        dev = obj.device
        info.device_type = KDL_CUDA if dev.type == "cuda" else KDL_CPU
        info.device_id = dev.index or 0
        info.keep = obj
        return info
    if not hasattr(obj, "__dlpack__"):
        raise InvalidArgumentError(f"{type(obj).__name__} is no tensor (no __dlpack__)")
    device_type, device_id = obj.__dlpack_device__()
    if device_type in (KDL_CUDA, KDL_CUDA_MANAGED):
        capsule = obj.__dlpack__(stream=stream if stream else 1)
    else:
        capsule = obj.__dlpack__()
    address = _api.PyCapsule_GetPointer(capsule, _NAME)
    managed = DLManagedTensor.from_address(address)
    t = managed.dl_tensor
    info.ptr = (t.data or 0) + t.byte_offset
    info.shape = tuple(t.shape[i] for i in range(t.ndim))
    if t.strides:
        info.strides = tuple(t.strides[i] for i in range(t.ndim))
    else:  # NULL strides: compact row-major
        strides, s = [], 1
        for size in reversed(info.shape):
            strides.append(s)
            s *= size
        info.strides = tuple(reversed(strides))
    info.dtype = DTYPE_NAMES.get((t.dtype.code, t.dtype.bits), f"dlpack{t.dtype.code}:{t.dtype.bits}")
    info.device_type = t.device.device_type
    info.device_id = t.device.device_id
    info.keep = capsule  # unconsumed: its destructor calls the producer's deleter
    return info
