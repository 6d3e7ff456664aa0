"""Fresh buffers for arriving payloads, filled by the frame reader.

``bytearray(n)`` costs a large payload twice before a byte arrives: it zero-fills memory the
payload overwrites at once, and that memory is fresh, so each of its 4 KiB pages faults on
first touch (about 0.4 ms per MB here: slower than the network). CPython's C API makes a
``bytes`` or ``bytearray`` whose contents are left uninitialised for its creator to fill
(``PyBytes_FromStringAndSize(NULL, n)``: the documented way to build one in place), and
``madvise(MADV_HUGEPAGE)`` lets a large one fault 2 MiB at a time.

Every byte of such a buffer is written before it leaves the reader: a frame is delivered only
once all its records are checked and written into it, and a frame that fails is dropped. Where
the C API cannot be reached (not CPython), the buffers are plain zero-filled ones.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any, NamedTuple

DIRECT = 64 * 1024  # smaller payloads: bytearray(n) is as cheap
HUGE = 4 << 20  # larger ones are advised to use huge pages
_PAGE = 2 << 20  # the huge page size the advice covers (x86-64, arm64 with 4 KiB pages)


class _CApi(NamedTuple):
    new_bytes: Any  # PyBytes_FromStringAndSize
    new_bytearray: Any  # PyByteArray_FromStringAndSize
    bytes_at: Any  # PyBytes_AsString: the address of a bytes' contents
    bytearray_at: Any  # PyByteArray_AsString
    view: Any  # PyMemoryView_FromMemory
    advise: Any  # libc's madvise, or None


def _c_api() -> _CApi | None:
    # Function objects of our own (``api[name]`` makes a new one; ``api.name`` is a cached one
    # that every module in the process shares and may set its own argtypes/restype on).
    try:
        api = ctypes.pythonapi
        new_bytes, new_bytearray = api["PyBytes_FromStringAndSize"], api["PyByteArray_FromStringAndSize"]
        bytes_at, bytearray_at = api["PyBytes_AsString"], api["PyByteArray_AsString"]
        view = api["PyMemoryView_FromMemory"]
    except (AttributeError, ValueError):
        return None
    for make in (new_bytes, new_bytearray):
        make.restype, make.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)
    for at in (bytes_at, bytearray_at):
        at.restype, at.argtypes = ctypes.c_void_p, (ctypes.py_object,)
    view.restype, view.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
    try:
        advise = ctypes.CDLL(None, use_errno=True).madvise
        advise.restype, advise.argtypes = ctypes.c_int, (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (AttributeError, OSError):
        advise = None
    return _CApi(new_bytes, new_bytearray, bytes_at, bytearray_at, view, advise)


_API = _c_api()
_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_WRITE = 0x200  # PyBUF_WRITE


def _advise(address: int, n: int) -> None:
    """Ask for huge pages over the whole 2 MiB pages inside [address, address + n) (advice only:
    nothing changes where the kernel does not use them)."""
    advise = _API.advise
    if advise is None or _HUGEPAGE is None or n < HUGE:
        return
    low = (address + _PAGE - 1) & ~(_PAGE - 1)
    high = (address + n) & ~(_PAGE - 1)
    if high > low:
        advise(low, high - low, _HUGEPAGE)


def new_bytearray(n: int) -> bytearray:
    """A bytearray of ``n`` bytes for the caller to fill entirely (contents undefined until then)."""
    if _API is None or n < DIRECT:
        return bytearray(n)
    out = _API.new_bytearray(None, n)
    _advise(_API.bytearray_at(out), n)
    return out


def new_bytes(n: int) -> tuple[bytes | bytearray, memoryview]:
    """A ``bytes`` of ``n`` bytes and a writable view of them, for the caller to fill entirely
    before anyone else sees the object (where the C API is out of reach: a bytearray). The
    view does not keep the object alive: the caller holds both until it is filled."""
    if _API is None or n < DIRECT:
        out = bytearray(n)
        return out, memoryview(out)
    out = _API.new_bytes(None, n)
    address = _API.bytes_at(out)
    _advise(address, n)
    return out, _API.view(address, n, _WRITE)
