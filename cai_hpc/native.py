"""Hand-written float32 CPU kernels for the ViT blocks' memory-bound steps (``native.cpp``),
compiled for this CPU on first use and cached.

With the linear maps near the GEMM rate, a float32 batch spent a third of its time in small
memory-bound steps on 17-token tensors, each a pass over memory of its own: the PCM's batched
matmuls on 4-wide groups, its SiLU and bias copies, the attention's permutes, matmuls and
softmax, the residual adds and LayerNorms. The kernels do them in three passes per block:

* ``attention``: softmax(q kᵀ) v for all heads, read straight from the qkv map's output and
  written in the layout the output projection reads;
* ``pcm_residual_norm``: the PCM (its 4 → 16 → 4 maps and SiLU for one sample's tokens in
  registers), both residual adds and the second LayerNorm;
* ``add_norm``: the MLP's residual add and the next block's first LayerNorm.

Plus ``max_pool_3x3``, the Inception's 3x3 max-pool in one pass over a channels-last tensor.
They compute what the torch code of ``fast`` computes, to float32 rounding (tests hold them to
it). Measured on a 2-core Zen 5 VM (interleaved A/B in one process, batch 128): the fused model
1.28x faster at 1 thread and 1.24x at 2.

The library is built with ``$CXX`` (default ``g++``) and ``-march=native``, about a second, and
cached under ``$CAI_HPC_CACHE`` (default ``$XDG_CACHE_HOME/cai-hpc`` or ``~/.cache/cai-hpc``;
if that is not a directory only this user can write, one in the temporary directory) keyed by
the source, compiler, torch and the CPU's instruction set, so nodes of different CPUs sharing a
home directory never load each other's builds. Ranks of one node take turns through a lock
file: one builds, the others load its build; a failed build is recorded beside it
(``.failed``), so the other ranks do not repeat it. Before use, the library must show that its
parallel loops run on torch's OpenMP runtime (it follows ``torch.set_num_threads``). Without a
compiler, on a failed build or check, or with ``CAI_HPC_NATIVE=0``, ``kernels()`` returns None
and the model runs on torch's kernels, as it does in bfloat16, under ``torch.compile`` and on
GPUs; the reason is logged once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger("cai_hpc")

SOURCE = Path(__file__).with_name("native.cpp")
BUILD_TIMEOUT_S = 300.0  # a build, or the wait for another process's build
TOKENS, CHANNELS, QKV = 17, 192, 576
PCM_SHAPES = ((48, 4, 16), (48, 1, 16), (48, 16, 4), (48, 1, 4))  # FusedBlock's pcm_w1, pcm_b1, pcm_w2, pcm_b2
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math")


class UnavailableError(Exception):
    """Why the kernels cannot be had here (one line). ``expected``: a setting or the machine
    (turned off, no compiler), not a fault (a failed build)."""

    def __init__(self, reason: str, expected: bool = False) -> None:
        super().__init__(reason)
        self.expected = expected


class Kernels:
    """The compiled library's entry points, each checking its tensors before handing their
    memory to C++ (a wrong shape there would be a silent overrun, not an error)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        p, n, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self._attention = library.cai_attention
        self._attention.argtypes, self._attention.restype = (p, p, n), None
        self._pcm = library.cai_pcm_residual_norm
        self._pcm.argtypes, self._pcm.restype = (p, p, p, p, p, p, p, p, f, p, n), None
        self._add_norm = library.cai_add_norm
        self._add_norm.argtypes, self._add_norm.restype = (p, p, p, p, f, p, n), None
        self._max_pool = library.cai_max_pool_3x3
        self._max_pool.argtypes, self._max_pool.restype = (p, p, n, n, n, n), None
        self._threads = library.cai_threads
        self._threads.argtypes, self._threads.restype = (), n

    def attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """The heads' softmax(q kᵀ) v, (batch, 17, 192), of ``qkv`` (batch, 17, 576) as the
        block's qkv map makes it (q, k, v; q already scaled)."""
        batch = qkv.shape[0]
        _check(qkv, (batch, TOKENS, QKV))
        out = qkv.new_empty((batch, TOKENS, CHANNELS))
        self._attention(qkv.data_ptr(), out.data_ptr(), batch)
        return out

    def pcm_residual_norm(
        self, x: torch.Tensor, attended: torch.Tensor, pcm: tuple[torch.Tensor, ...], norm: torch.nn.LayerNorm
    ) -> torch.Tensor:
        """Sets ``attended`` (the attention's projected output) to ``x + attended + [0;
        PCM(x)]``, the block's state after attention and PCM, and returns ``norm`` of it.
        ``pcm``: FusedBlock's ``pcm_w1, pcm_b1, pcm_w2, pcm_b2``."""
        batch = x.shape[0]
        for t in (x, attended):
            _check(t, (batch, TOKENS, CHANNELS))
        for t, shape in zip(pcm, PCM_SHAPES, strict=True):
            _check(t, shape)
        weight, bias = _norm_tensors(norm)
        normed = torch.empty_like(x)
        self._pcm(
            x.data_ptr(), attended.data_ptr(), *(t.data_ptr() for t in pcm), weight.data_ptr(), bias.data_ptr(),
            norm.eps, normed.data_ptr(), batch,
        )  # fmt: skip
        return normed

    def add_norm(self, m: torch.Tensor, x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
        """Adds ``x`` to ``m`` in place and returns ``norm(m)``; both (..., 192)."""
        _check(m, x.shape)
        _check(x, (*x.shape[:-1], CHANNELS))
        weight, bias = _norm_tensors(norm)
        normed = torch.empty_like(m)
        rows = m.numel() // CHANNELS
        pointers = (m.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr())
        self._add_norm(*pointers, norm.eps, normed.data_ptr(), rows)
        return normed

    def max_pool_3x3(self, x: torch.Tensor) -> torch.Tensor:
        """``F.max_pool2d(x, 3, stride=1, padding=1)`` of a channels-last (N, C, H, W) ``x``,
        channels-last like it."""
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"max_pool_3x3 takes a channels-last (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        batch, channels, height, width = x.shape
        _check(x.permute(0, 2, 3, 1), (batch, height, width, channels))  # its memory, as (N, H, W, C)
        out = torch.empty_like(x)  # same memory format
        self._max_pool(x.data_ptr(), out.data_ptr(), batch, height, width, channels)
        return out


def applies(x: torch.Tensor) -> bool:
    """Whether the kernels can take the place of torch's for ``x``: float32 on the CPU, not
    under autocast or while ``torch.compile`` traces (Inductor fuses those steps itself)."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


@functools.cache
def kernels() -> Kernels | None:
    """The kernels, built or found in the cache, or None (the reason logged once)."""
    t0 = time.perf_counter()
    try:
        loaded = _load()
    except (UnavailableError, OSError) as why:  # OSError: a lock or a load that failed
        expected = isinstance(why, UnavailableError) and why.expected
        reason = str(why).splitlines()[0] if str(why) else type(why).__name__
        level = logging.INFO if expected else logging.WARNING
        log.log(level, "native kernels: %s; the ViT blocks run on torch's kernels", reason)
        return None
    log.debug("native kernels: ready in %.2f s", time.perf_counter() - t0)
    return loaded


def _load() -> Kernels:
    """The kernels of the cached library for this machine, built first if the cache lacks it
    (or holds a damaged one). Raises ``UnavailableError`` or ``OSError``."""
    if os.environ.get("CAI_HPC_NATIVE", "1") == "0":
        raise UnavailableError("turned off by CAI_HPC_NATIVE=0", expected=True)
    if platform.system() != "Linux":
        raise UnavailableError(f"built only on Linux, not {platform.system()}", expected=True)
    compiler = shlex.split(os.environ.get("CXX", "g++"))
    if not compiler or shutil.which(compiler[0]) is None:
        raise UnavailableError(f"no C++ compiler ({os.environ.get('CXX', 'g++')!r} not found; set CXX)", expected=True)
    command = _command(compiler)
    library = _cache_dir() / f"cai-hpc-native-{_key(command)}.so"
    with contextlib.suppress(OSError, AttributeError):  # missing or damaged: (re)built below
        return _open(library)
    with _locked(library.with_suffix(".lock")):
        failed = library.with_suffix(".failed")
        if failed.exists():
            raise UnavailableError(f"{failed.read_text().strip()}, in an earlier run (delete {failed} to try again)")
        with contextlib.suppress(OSError, AttributeError):  # built by whoever held the lock before
            return _open(library)
        library.unlink(missing_ok=True)  # damaged: a process that has it loaded keeps its copy
        _build(command, library, failed)
    return _open(library)


def _open(library: Path) -> Kernels:
    """The library's kernels, once it shows that its parallel loops follow torch's thread
    count: a library linked to another OpenMP runtime (e.g. built with clang's libomp) would use
    every core in every rank."""
    loaded = Kernels(ctypes.CDLL(str(library)))  # AttributeError: a symbol missing
    before = torch.get_num_threads()
    try:
        for threads in sorted({1, before}):
            torch.set_num_threads(threads)
            if loaded._threads() != threads:
                raise UnavailableError(
                    f"the build's OpenMP runtime is not torch's ({loaded._threads()} threads where torch "
                    f"uses {threads}); set CXX to the compiler family torch was built with"
                )
    finally:
        torch.set_num_threads(before)
    return loaded


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (one builder per cache), waiting at most
    ``BUILD_TIMEOUT_S`` for it. The lock goes with the process, however it ends."""
    import fcntl  # POSIX; load() runs on Linux only

    with open(path, "w") as lock:
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UnavailableError(f"waited {BUILD_TIMEOUT_S:.0f} s for another build ({path})") from None
                time.sleep(0.05)
        yield


def _command(compiler: list[str]) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    openmp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [
        *compiler, *_FLAGS, *openmp, abi, f"-I{include}", str(SOURCE),
        f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def _key(command: list[str]) -> str:
    """What the build depends on: the source, the command (torch's paths and ABI in it), the
    compiler binary, torch's version and this CPU's instruction set (``-march=native``)."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    compiler = os.stat(shutil.which(command[0]) or command[0])
    for part in (*command, f"{compiler.st_size}:{compiler.st_mtime_ns}", torch.__version__, _cpu_features()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, ARM
                return line
    except OSError:
        pass
    return platform.machine()


def _cache_dir() -> Path:
    """The first of ``$CAI_HPC_CACHE`` (default ``~/.cache/cai-hpc``) and a directory of ours in
    the temporary directory that we can write and nobody else can: the process loads code from
    it, so a directory someone else could write to (say, one they made first in /tmp under the
    name we would use) is passed over."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cai-hpc"
    fallback = Path(tempfile.gettempdir()) / f"cai-hpc-{os.getuid()}"
    for candidate in (Path(os.environ.get("CAI_HPC_CACHE") or default), fallback):
        try:
            if candidate == fallback and candidate.is_symlink():
                raise OSError("a symbolic link in a shared directory")  # could be repointed later
            candidate = candidate.resolve()  # the directory itself, checked and used from here on
            candidate.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = candidate.lstat()
        except OSError:
            continue
        private = info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if private and stat.S_ISDIR(info.st_mode) and os.access(candidate, os.W_OK):
            return candidate
        log.debug("native kernels: cache %s passed over (not ours alone, or not writable)", candidate)
    raise UnavailableError("no cache directory that only this user can write (set CAI_HPC_CACHE)")


def _build(command: list[str], library: Path, failed: Path) -> None:
    """Compiles the library into a private temporary file and renames it into place; on a
    failure, writes why to ``failed`` (so that other processes do not repeat it) and raises."""
    t0 = time.perf_counter()
    fd, name = tempfile.mkstemp(dir=library.parent, prefix=f"{library.name}.", suffix=".tmp")
    os.close(fd)
    partial = Path(name)
    try:
        try:
            done = subprocess.run(
                [*command, "-o", str(partial)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            reason = f"build took over {BUILD_TIMEOUT_S:.0f} s"
        else:
            lines = done.stderr.splitlines()
            first = next((line for line in lines if "error" in line), done.stderr.strip()[:200])
            detail = f": {first}" if first else ", no message"
            reason = f"build failed ({command[0]} exit {done.returncode}{detail})" if done.returncode else ""
        if reason:
            failed.write_text(reason + "\n")
            raise UnavailableError(reason)
        with open(partial, "rb") as built:
            os.fsync(built.fileno())  # on disk before its name is, for a crash in between
        os.replace(partial, library)  # whole or not at all, for the processes that load it
    finally:
        partial.unlink(missing_ok=True)
    log.info("native kernels: built for this CPU in %.1f s (%s)", time.perf_counter() - t0, library)


def _check(t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"native kernels take contiguous float32 CPU tensors of shape {tuple(shape)}, "
            f"got {t.dtype} {t.device.type} {tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}"
        )


def _norm_tensors(norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    if norm.weight is None or norm.bias is None:
        raise ValueError("native kernels need a LayerNorm with weight and bias")
    _check(norm.weight, (CHANNELS,))
    _check(norm.bias, (CHANNELS,))
    return norm.weight, norm.bias
