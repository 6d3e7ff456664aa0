"""Host memory exported through DLPack (``__dlpack__``), read as mpi4py reads it.

The capsule is read in place, never consumed: it is not renamed to ``used_dltensor``, so its
producer's destructor still owns the tensor and releases it once. The byte view returned keeps
the capsule alive for as long as the view lives, so the memory cannot be freed under it.
numpy's ``from_dlpack`` is not used: it consumes the capsule and calls the deleter itself when
its array dies, which producers that free the tensor with the capsule turn into a double free.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

_HOST_DEVICES = {1, 3, 11}  # kDLCPU, kDLCUDAHost, kDLROCMHost: memory the CPU can address
_READ_ONLY = 1  # DLPACK_FLAG_BITMASK_READ_ONLY of a versioned tensor
_FORMAT_KIND = {0: "i", 1: "u", 2: "f", 5: "c", 6: "b"}  # DLDataTypeCode -> numpy kind


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _Versioned(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _Tensor),
    ]


_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_is_valid.restype = ctypes.c_int
_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _tensor(capsule: Any) -> tuple[_Tensor, bool]:
    """The capsule's DLTensor (the first field of a legacy DLManagedTensor) and its read-only flag."""
    if type(capsule).__name__ != "PyCapsule":
        raise BufferError("dlpack: __dlpack__ did not return a capsule")
    if _is_valid(capsule, b"dltensor"):
        return _Tensor.from_address(_get_pointer(capsule, b"dltensor")), False
    if _is_valid(capsule, b"dltensor_versioned"):
        managed = _Versioned.from_address(_get_pointer(capsule, b"dltensor_versioned"))
        if managed.major != 1:
            raise BufferError(f"dlpack: unsupported DLPack version {managed.major}")
        return managed.dl_tensor, bool(managed.flags & _READ_ONLY)
    raise BufferError("dlpack: the capsule holds no unused DLTensor")


def _format(dtype: _DataType) -> str:
    """The buffer format mpi4py infers from the DLPack data type; lanes other than 1 are bytes."""
    if dtype.bits % 8 or dtype.lanes == 0:
        raise BufferError(f"dlpack: unsupported data type of {dtype.bits} bits x {dtype.lanes} lanes")
    if dtype.lanes != 1 or dtype.code not in _FORMAT_KIND:
        return "B"
    try:  # numpy's character code, as mpi4py's: a 64-bit int is "l" (MPI_LONG), not "i8"
        return np.dtype(f"{_FORMAT_KIND[dtype.code]}{dtype.bits // 8}").char
    except TypeError:
        raise BufferError(f"dlpack: unsupported data type of code {dtype.code}, {dtype.bits} bits") from None


def _contiguous(shape: list[int], strides: list[int] | None) -> bool:
    """C or Fortran order without gaps (strides in items; a null strides pointer is C order)."""
    if strides is None or 0 in shape:
        return True
    dims = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    return _dense(dims[::-1]) or _dense(dims)


def _dense(dims: list[tuple[int, int]]) -> bool:
    """Each stride is the product of the extents before it (innermost first)."""
    step = 1
    for n, s in dims:
        if s != step:
            return False
        step *= n
    return True


def byte_view(obj: Any) -> tuple[np.ndarray, str]:
    """The host memory of a DLPack array as flat uint8 (read-only if the producer says so), and its format."""
    device = obj.__dlpack_device__() if hasattr(obj, "__dlpack_device__") else (1, 0)
    if int(device[0]) not in _HOST_DEVICES:
        raise BufferError(f"dlpack: memory on device type {int(device[0])} is not host memory")
    try:
        capsule = obj.__dlpack__()
    except (RuntimeError, TypeError, ValueError) as exc:  # e.g. torch: a tensor that requires grad
        raise BufferError(f"dlpack: {exc}") from None
    tensor, readonly = _tensor(capsule)
    if tensor.ndim < 0:
        raise BufferError("dlpack: negative number of dimensions")
    shape = [tensor.shape[i] for i in range(tensor.ndim)]
    strides = [tensor.strides[i] for i in range(tensor.ndim)] if tensor.strides else None
    if any(n < 0 for n in shape):
        raise BufferError("dlpack: negative extent")
    if not _contiguous(shape, strides):
        raise BufferError("dlpack: the array is not contiguous")
    fmt = _format(tensor.dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * tensor.dtype.bits // 8 * tensor.dtype.lanes
    if nbytes == 0:
        return np.zeros(0, np.uint8), fmt
    if not tensor.data:
        raise BufferError("dlpack: null data pointer")
    memory = (ctypes.c_char * nbytes).from_address(tensor.data + tensor.byte_offset)
    memory.capsule = capsule  # the view's base chain ends here: the capsule lives as long as the view
    flat = np.frombuffer(memory, dtype=np.uint8)
    flat.flags.writeable = not readonly
    return flat, fmt
