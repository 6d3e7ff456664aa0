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

Each kernel has an AVX-512 form, an AVX2 + FMA form (8-lane layouts) and a portable one; which
one a library holds depends on the level it is built for (``LEVELS``: ``native`` for exactly
the building CPU, ``x86-64-v4``, ``x86-64-v3``, ``portable``). The loader takes the best level
this CPU can run (``CAI_HPC_KERNEL_LEVEL`` forces one, say ``x86-64-v3`` to test or measure the
AVX2 form on an AVX-512 CPU), looking first in ``$CAI_HPC_KERNELS_DIR`` (libraries built ahead
of time by ``cai-hpc build-kernels --out``; a directory others can write is passed over), then
in the cache, ``$CAI_HPC_CACHE`` (default ``$XDG_CACHE_HOME/cai-hpc`` or ``~/.cache/cai-hpc``;
if that is not a directory only this user can write, one in the temporary directory). A build
is named by its source, flags, torch, ISA level (and for ``native``, the CPU's instruction set)
and compiler, so nodes of different CPUs sharing a home directory never load each other's
builds; a machine without a compiler takes any compiler's build. Where a compiler is at hand
and nothing is prebuilt, the library is built on first use (about a second): ranks of one node
take turns through a lock file (where the filesystem has no locks, each builds, and the atomic
rename keeps the result whole); a failed build is recorded beside it (``.failed``, with host and
time), so the other ranks of that host do not repeat it within the hour. Before use, the
library must show that its parallel loops run on torch's OpenMP runtime (it follows
``torch.set_num_threads``).

Whether the kernels run is then ``decide``d by speed: measured once per library, CPU and thread
count (torch's block forward against the kernels'), they run only where they are at least as
fast; ``CAI_HPC_NATIVE=1`` takes them unmeasured. Without a compiler or prebuilt build, on a
failed build or check, or with ``CAI_HPC_NATIVE=0``, ``kernels()`` returns None and the model
runs on torch's kernels, as it does in bfloat16, under ``torch.compile`` and on GPUs; the reason
is logged once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import platform
import random
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("cai_hpc")

SOURCE = Path(__file__).with_name("native.cpp")
BUILD_TIMEOUT_S = 300.0  # a build, or the wait for another process's build
TOKENS, CHANNELS, QKV = 17, 192, 576
PCM_SHAPES = ((48, 4, 16), (48, 1, 16), (48, 16, 4), (48, 1, 4))  # FusedBlock's pcm_w1, pcm_b1, pcm_w2, pcm_b2
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math")
# The builds: for exactly the building CPU (``native``), for the x86-64 levels (v4: AVX-512,
# the kernels' AVX-512 form; v3: AVX2 + FMA, their AVX2 form), and with the compiler's defaults
# (``portable``: the portable form, on any architecture).
LEVELS = {
    "native": ("-march=native",),
    "x86-64-v4": ("-march=x86-64-v4", "-mtune=generic"),
    "x86-64-v3": ("-march=x86-64-v3", "-mtune=generic"),
    "portable": (),
}
# What each x86-64 level needs of the CPU, as /proc/cpuinfo names it (abm: lzcnt), best first.
_V3 = frozenset("avx avx2 bmi1 bmi2 f16c fma abm movbe".split())
X86_LEVELS = {"x86-64-v4": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}, "x86-64-v3": _V3}


class UnavailableError(Exception):
    """Why the kernels cannot be had here (one line). ``expected``: a setting or the machine
    (turned off, no compiler), not a fault (a failed build)."""

    def __init__(self, reason: str, expected: bool = False) -> None:
        super().__init__(reason)
        self.expected = expected


class Kernels:
    """The compiled library's entry points, each checking its tensors before handing their
    memory to C++ (a wrong shape there would be a silent overrun, not an error)."""

    def __init__(self, library: ctypes.CDLL, path: Path | None = None, level: str = "native") -> None:
        p, n, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self.path, self.level = path, level
        isa = library.cai_isa
        isa.argtypes, isa.restype = (), ctypes.c_char_p
        self.isa: str = isa().decode()  # the form built: "avx512", "avx2" or "portable"
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


@dataclass(frozen=True)
class Measured:
    """What ``decide``'s measurement found: torch's time over the kernels' on a block forward,
    and whether fc1's GELU ran faster as a pass of torch's after the GEMM than inside it
    (oneDNN's post-op), the kernels' time taken the faster way."""

    speedup: float
    gelu_after_gemm: bool = False


@dataclass(frozen=True)
class Choice:
    """Which kernels the ViT blocks run on and why: ``kernels`` None means torch's."""

    kernels: Kernels | None
    label: str  # "native-avx512", "native-avx2", "native-portable" or "torch"
    reason: str
    gelu_after_gemm: bool = False  # with the kernels: fc1's GELU by torch after the GEMM, not oneDNN's


def decide(speedup: Callable[[Kernels], Measured]) -> Choice:
    """The native kernels where they are at least as fast as torch's on this CPU, else torch's.

    ``speedup(kernels)`` measures them against torch's on a block forward (``Measured``). It
    runs once per library, CPU and thread count: its answer is kept in the cache directory,
    beside the builds. ``CAI_HPC_NATIVE=1`` takes the kernels without measuring (fc1's GELU
    inside oneDNN's GEMM), ``0`` never loads them.
    """
    if os.environ.get("CAI_HPC_NATIVE") == "0":
        return Choice(None, "torch", "turned off by CAI_HPC_NATIVE=0")
    loaded = kernels()
    if loaded is None:
        return Choice(None, "torch", _unavailable_reason or "native kernels unavailable")
    label = f"native-{loaded.isa}"
    if os.environ.get("CAI_HPC_NATIVE") == "1":
        return Choice(loaded, label, f"{loaded.level} build, taken without measuring (CAI_HPC_NATIVE=1)")
    record = _choice_record(loaded)
    measured = _read_json(record) if record is not None else None
    if measured is None or "gelu_after_gemm" not in measured:  # none, or from before the GELU was placed
        found = speedup(loaded)
        measured = {
            "speedup": round(found.speedup, 3),
            "gelu_after_gemm": found.gelu_after_gemm,
            "host": socket.gethostname(),
            "time": time.time(),
        }
        if record is not None:
            with contextlib.suppress(OSError):
                _write_atomically(record, json.dumps(measured).encode())
    ratio, gelu_after_gemm = float(measured["speedup"]), measured.get("gelu_after_gemm") is True
    when = "measured now" if record is None else f"measured once for this CPU, kept in {record}"
    gelu = "fc1's GELU after its GEMM" if gelu_after_gemm else "fc1's GELU inside its GEMM"
    speed = f"{ratio:.2f}x torch's speed on a block forward ({gelu}), {when}"
    if ratio >= 1.0:
        return Choice(loaded, label, f"{loaded.level} build at {speed}", gelu_after_gemm)
    return Choice(None, "torch", f"the {label} kernels ({loaded.level} build) ran at {speed}")


def _choice_record(loaded: Kernels) -> Path | None:
    """Where this library's measurement on this CPU at this thread count is kept (None: no cache)."""
    try:
        cache = _cache_dir()
    except UnavailableError:
        return None
    cpu = hashlib.sha256(f"{_cpu_model()}\0{_cpu_features()}".encode()).hexdigest()[:12]
    return cache / f"{loaded.path.stem}-{cpu}-t{torch.get_num_threads()}.choice.json"


_unavailable_reason: str | None = None


@functools.cache
def kernels() -> Kernels | None:
    """The kernels, prebuilt, found in the cache or built, or None (the reason logged once)."""
    global _unavailable_reason
    t0 = time.perf_counter()
    try:
        loaded = _load()
    except (UnavailableError, OSError) as why:  # OSError: a lock or a load that failed
        expected = isinstance(why, UnavailableError) and why.expected
        reason = str(why).splitlines()[0] if str(why) else type(why).__name__
        level = logging.INFO if expected else logging.WARNING
        log.log(level, "native kernels: %s; the ViT blocks run on torch's kernels", reason)
        _unavailable_reason = reason
        return None
    log.debug("native kernels: %s (%s) ready in %.2f s", loaded.path, loaded.isa, time.perf_counter() - t0)
    return loaded


def cpu_levels() -> list[str]:
    """The build levels (``LEVELS``) this CPU can run, best first: ``native`` (built for exactly
    this CPU), then the x86-64 levels its instruction set covers, then ``portable``."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["native", "portable"]
    flags = set(_cpu_features().split(":", 1)[-1].split())
    return ["native"] + [level for level in X86_LEVELS if X86_LEVELS[level] <= flags] + ["portable"]


def _wanted_levels() -> list[str]:
    """``cpu_levels()``, or the one level ``CAI_HPC_KERNEL_LEVEL`` asks for (say, the AVX2 form
    on an AVX-512 CPU, to test or measure it), which the CPU must be able to run."""
    forced = os.environ.get("CAI_HPC_KERNEL_LEVEL")
    if not forced:
        return cpu_levels()
    if forced not in LEVELS:
        raise UnavailableError(f"CAI_HPC_KERNEL_LEVEL={forced} is not one of {', '.join(LEVELS)}")
    if forced not in cpu_levels():
        raise UnavailableError(f"CAI_HPC_KERNEL_LEVEL={forced}: this CPU cannot run that level's instructions")
    return [forced]


def _load() -> Kernels:
    """The best kernels this CPU can run: prebuilt in ``$CAI_HPC_KERNELS_DIR`` or the cache,
    else built for it (or rebuilt, if the cache holds a damaged build). Raises
    ``UnavailableError`` or ``OSError``."""
    if os.environ.get("CAI_HPC_NATIVE", "auto") == "0":
        raise UnavailableError("turned off by CAI_HPC_NATIVE=0", expected=True)
    if platform.system() != "Linux":
        raise UnavailableError(f"built only on Linux, not {platform.system()}", expected=True)
    levels = _wanted_levels()
    prebuilt = _prebuilt_dir()
    if prebuilt is not None:
        found = _find(prebuilt, levels, compiler_id=None)
        if found is not None:
            return found
    compiler = shlex.split(os.environ.get("CXX", "g++"))
    if not compiler or shutil.which(compiler[0]) is None:
        cached = _find(_cache_dir(), levels, compiler_id=None)
        if cached is not None:
            return cached
        where = f" nor in {prebuilt}" if prebuilt is not None else ""
        raise UnavailableError(
            f"no C++ compiler ({os.environ.get('CXX', 'g++')!r} not found; set CXX) and no prebuilt kernels for this "
            f"CPU in the cache{where} (see cai-hpc build-kernels)",
            expected=True,
        )
    level = levels[0]
    library = _cache_dir() / library_name(level, _compiler_id(tuple(compiler)))
    with contextlib.suppress(OSError, AttributeError):  # missing or damaged: (re)built below
        return _open(library, level)
    failed = library.with_suffix(".failed")
    with _locked(library.with_suffix(".lock")):
        _raise_if_failed_recently(failed)
        with contextlib.suppress(OSError, AttributeError):  # built by whoever held the lock before
            return _open(library, level)
        library.unlink(missing_ok=True)  # damaged: a process that has it loaded keeps its copy
        _build(_command(compiler, level), library, failed)
    failed.unlink(missing_ok=True)  # an expired failure, now overcome
    return _open(library, level)


def _find(directory: Path, levels: list[str], compiler_id: str | None) -> Kernels | None:
    """The first library in ``directory`` of these levels, in order, built by any compiler,
    that loads and passes ``_open``'s check; files that others could have written are skipped."""
    for level in levels:
        for library in sorted(directory.glob(library_name(level, "*"))):
            if not _private_or_root(library):
                log.warning("native kernels: %s passed over (writable by others)", library)
                continue
            try:
                return _open(library, level)
            except (OSError, AttributeError, UnavailableError) as why:
                log.debug("native kernels: %s passed over (%s)", library, why)
    return None


def library_name(level: str, compiler_id: str) -> str:
    """The file name of a build: what it depends on, its source, torch and ISA level in a key,
    then the compiler's (``*`` matches any compiler's build, for machines without one)."""
    return f"cai-hpc-kernels-{level}-{_key(level)}-{compiler_id}.so"


def build_ahead(out: Path | None, levels: list[str]) -> list[Path]:
    """``cai-hpc build-kernels``: builds the kernels for ``levels`` (any, whatever this CPU can
    run; ``native`` means this CPU) into ``out`` (default: the cache), readable by all, for
    machines without a compiler to load (``$CAI_HPC_KERNELS_DIR`` or the cache). Raises
    ``UnavailableError`` on a failed build, naming the level."""
    unknown = [level for level in levels if level not in LEVELS]
    if unknown:
        raise UnavailableError(f"unknown level {', '.join(unknown)}: choose among {', '.join(LEVELS)}")
    compiler = shlex.split(os.environ.get("CXX", "g++"))
    if not compiler or shutil.which(compiler[0]) is None:
        raise UnavailableError(f"no C++ compiler ({os.environ.get('CXX', 'g++')!r} not found; set CXX)")
    if out is None:
        out = _cache_dir()
    else:
        out.mkdir(mode=0o755, parents=True, exist_ok=True)
    built = []
    for level in levels:
        library = out / library_name(level, _compiler_id(tuple(compiler)))
        _build(_command(compiler, level), library, failed=None)
        library.chmod(0o644)
        built.append(library)
    return built


def _open(library: Path, level: str) -> Kernels:
    """The library's kernels, once it shows that its parallel loops follow torch's thread
    count: a library linked to another OpenMP runtime (e.g. built with clang's libomp) would use
    every core in every rank."""
    loaded = Kernels(ctypes.CDLL(str(library)), library, level)  # AttributeError: a symbol missing
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


# Errors of flock on filesystems without locks: Lustre mounted without -o flock (ENOSYS), NFS
# without a lock daemon (ENOLCK), some FUSE and network filesystems (EOPNOTSUPP).
NO_LOCKS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP})
LOCK_POLL_S = (0.05, 2.0)  # first and longest wait between tries for a lock another holds


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` (one builder per cache), waiting at most
    ``BUILD_TIMEOUT_S`` for it, with waits that double (from 50 ms to 2 s, jittered) so that many
    ranks polling a lock on a network filesystem do not flood its server. The lock goes with
    the process, however it ends. Where the filesystem has no locks, it goes ahead without one:
    builds are written under a private name and renamed into place, so concurrent builders
    each leave a whole library."""
    import fcntl  # POSIX; load() runs on Linux only

    with open(path, "w") as lock:
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        wait = LOCK_POLL_S[0]
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UnavailableError(f"waited {BUILD_TIMEOUT_S:.0f} s for another build ({path})") from None
                time.sleep(wait * random.uniform(0.75, 1.25))
                wait = min(2 * wait, LOCK_POLL_S[1])
            except OSError as why:
                if why.errno not in NO_LOCKS:
                    raise
                log.info("native kernels: no file locks here (%s: %s); building without one", path.parent, why.strerror)
                break
        yield


FAILED_TTL_S = 3600.0  # a failed build is retried after this, or at once on another host


def _raise_if_failed_recently(failed: Path) -> None:
    """Raises ``UnavailableError`` if a build failed on this host within ``FAILED_TTL_S``, as
    recorded in ``failed``: so the other ranks, and runs soon after, do not repeat it. A failure
    on another host (say, a full disk there) or an older one is tried again."""
    record = _read_json(failed)
    if record is None:
        return
    host, when = record.get("host"), float(record.get("time", 0))
    age = time.time() - when
    if host != socket.gethostname() or not 0 <= age < FAILED_TTL_S:
        return
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
    raise UnavailableError(
        f"{record.get('reason', 'build failed')}, on {host} at {at} (retried after {FAILED_TTL_S / 60:.0f} min; "
        f"delete {failed} to try again now)"
    )


def _read_json(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _command(compiler: list[str], level: str) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    include, lib = torch_dir / "include", torch_dir / "lib"
    return [
        *compiler, *_FLAGS, *LEVELS[level], *_torch_flags(), f"-I{include}", str(SOURCE),
        f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip


def _torch_flags() -> list[str]:
    openmp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []
    return [*openmp, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


@functools.cache
def _key(level: str) -> str:
    """What a build of ``level`` depends on besides the compiler: the source, the flags, torch's
    version and ABI, and for ``native`` this CPU's instruction set (``-march=native``)."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    cpu = _cpu_features() if level == "native" else ""
    for part in (*_FLAGS, *LEVELS[level], *_torch_flags(), torch.__version__, platform.machine(), cpu):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def _compiler_id(compiler: tuple[str, ...]) -> str:
    """The compiler's identity for build names: its ``--version`` line and binary."""
    path = shutil.which(compiler[0]) or compiler[0]
    try:
        version = subprocess.run(
            [*compiler, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout.partition("\n")[0]
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    info = os.stat(path)
    identity = f"{' '.join(compiler)}\0{version}\0{info.st_size}:{info.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:8]


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86, ARM
                return line
    except OSError:
        pass
    return platform.machine()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "CPU part")):
                return line
    except OSError:
        pass
    return platform.processor()


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


def _prebuilt_dir() -> Path | None:
    """``$CAI_HPC_KERNELS_DIR``, a directory of prebuilt libraries (``cai-hpc build-kernels
    --out``), if set and nobody but us or root can write to it (the process loads code from it)."""
    given = os.environ.get("CAI_HPC_KERNELS_DIR")
    if not given:
        return None
    directory = Path(given).resolve()
    if not directory.is_dir():
        log.warning("native kernels: CAI_HPC_KERNELS_DIR=%s is not a directory; passed over", given)
        return None
    if not _private_or_root(directory):
        log.warning("native kernels: CAI_HPC_KERNELS_DIR=%s passed over (others can write to it)", given)
        return None
    return directory


def _private_or_root(path: Path) -> bool:
    info = path.stat()
    return info.st_uid in (os.getuid(), 0) and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _build(command: list[str], library: Path, failed: Path | None) -> None:
    """Compiles the library into a private temporary file and renames it into place; on a
    failure, records why, where and when in ``failed`` (so that other processes do not repeat it)
    and raises."""
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
            if failed is not None:
                record = {"reason": reason, "host": socket.gethostname(), "time": time.time()}
                with contextlib.suppress(OSError):  # a full disk may be why: the error still stands
                    _write_atomically(failed, json.dumps(record).encode())
            raise UnavailableError(reason)
        with open(partial, "rb") as built:
            os.fsync(built.fileno())  # on disk before its name is, for a crash in between
        os.replace(partial, library)  # whole or not at all, for the processes that load it
    finally:
        partial.unlink(missing_ok=True)
    log.info("native kernels: built %s in %.1f s (%s)", library.name, time.perf_counter() - t0, library.parent)


def _write_atomically(path: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


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
