"""A Lambda-like sandbox for the emulated functions of ``cloud run --local`` (bubblewrap).

What a Lambda execution environment enforces, and how each is imitated here:

* a read-only file system except ``/tmp``, sized by ``EphemeralStorage`` (512 MB by default):
  the root is bound read-only, ``/tmp`` is a tmpfs of that size, the code is at
  ``LAMBDA_TASK_ROOT`` (``/var/task``, read-only; this machine's ``/var`` is not seen) and is
  the working directory;
* a non-root user (``sbx_user1051``, uid 993, listed in ``/etc/passwd`` with a home directory
  that does not exist, and no ``HOME``): a user namespace maps it onto this process's user,
  without capabilities; when that is root, ``/root`` is hidden (only the interpreter's prefix is
  bound back from it);
* no ``/dev/shm`` (Python's multiprocessing locks fail there): ``/dev`` holds only the usual
  character devices;
* memory: ``MemorySize`` MB for everything in the sandbox, and at most 1,024 processes and
  threads. With cgroups (v1 ``memory`` and ``pids`` controllers below this process's own, which
  a root caller can make) they count what Lambda counts: resident memory (the kernel kills the
  sandbox beyond it) and tasks. Otherwise ``RLIMIT_AS`` and ``RLIMIT_NPROC``: address space is
  stricter than Lambda's limit, and the process count is per user outside (so it includes the
  caller's other processes); :attr:`Sandbox.limits` says which;
* Lambda's environment variables, and nothing else of the caller's environment.

Where bubblewrap cannot run, :func:`unavailable` says why and the functions run as plain
processes, as before.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lambda_shim

LAMBDA_UID, LAMBDA_GID = 993, 990  # sbx_user1051 in Lambda's environments
LAMBDA_USER = f"sbx_user1051:x:{LAMBDA_UID}:{LAMBDA_GID}::/home/sbx_user1051:/sbin/nologin\n"
MAX_THREADS = 1024  # processes + threads per environment (Lambda's quota)
EPHEMERAL_MB = 512  # Lambda's default EphemeralStorage
TASK_ROOT = "/var/task"
CODE_ROOT = Path(lambda_shim.__file__).resolve().parents[1]  # the checkout holding lambda_shim and cai_hpc
CLOSE_WAIT_S = 5.0
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_counter = itertools.count()


def unavailable() -> str | None:
    """Why the sandbox cannot run here (one line), or None when it can."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    probe = Sandbox("probe", memory_mb=256, cgroups=False)
    try:
        done = subprocess.run(probe.command(["true"], {}), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap cannot start: {exc}"
    finally:
        probe.close()
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return f"bubblewrap cannot start: {lines[-1] if lines else f'exit code {done.returncode}'}"
    return None


class Sandbox:
    """One emulated execution environment. ``command`` wraps a command line; ``close`` removes
    what was made for it outside (its processes must have ended)."""

    def __init__(self, function: str, memory_mb: int, ephemeral_mb: int = EPHEMERAL_MB, cgroups: bool = True) -> None:
        self.function = function
        self.memory_mb = memory_mb
        self.ephemeral_mb = ephemeral_mb
        name = f"cai-hpc-{function}-{os.getpid()}-{next(_counter)}"
        self._workdir = tempfile.TemporaryDirectory(prefix=f"{name}-")
        self.cgroups: list[Path] = []
        if cgroups:
            memory, pids = _cgroup("memory", name), _cgroup("pids", name)
            if memory is not None and pids is not None:
                limit = str(memory_mb * 2**20)
                (memory / "memory.limit_in_bytes").write_text(limit)
                if (memory / "memory.memsw.limit_in_bytes").exists():  # no swap in Lambda
                    (memory / "memory.memsw.limit_in_bytes").write_text(limit)
                (pids / "pids.max").write_text(str(MAX_THREADS))
                self.cgroups = [memory, pids]
            else:
                for group in (memory, pids):
                    if group is not None:
                        group.rmdir()

    @property
    def limits(self) -> str:
        if self.cgroups:
            return "memory and pids cgroups"
        return "RLIMIT_AS and RLIMIT_NPROC (address space and the user's processes: stricter than Lambda)"

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        """Lambda's variables for this function, plus ``extra`` (runtime API, credentials...)."""
        return {
            "AWS_LAMBDA_FUNCTION_NAME": self.function,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{self.function}",
            "AWS_LAMBDA_LOG_STREAM_NAME": "local/[$LATEST]emulated",
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "LAMBDA_TASK_ROOT": TASK_ROOT,
            "LAMBDA_RUNTIME_DIR": "/var/runtime",
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "PYTHONPATH": TASK_ROOT,
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            **extra,
        }

    def command(self, argv: list[str], env: dict[str, str]) -> list[str]:
        """``argv`` inside the sandbox with exactly the environment ``env``."""
        passwd = Path(self._workdir.name) / "passwd"
        users = [
            line
            for line in Path("/etc/passwd").read_text().splitlines(True)
            if line.split(":")[2:3] != [str(LAMBDA_UID)]
        ]
        passwd.write_text("".join(users) + LAMBDA_USER)
        hidden = []
        if os.getuid() == 0:  # the sandbox user maps onto root: keep root's home out of sight
            hidden = ["--tmpfs", "/root", *_bind_back("/root", {sys.base_prefix, sys.prefix}), "--remount-ro", "/root"]
        bwrap = [
            "bwrap", "--ro-bind", "/", "/", *hidden, "--ro-bind", str(passwd), "/etc/passwd",
            "--tmpfs", "/var", "--ro-bind", str(CODE_ROOT), TASK_ROOT, "--remount-ro", "/var",
            "--size", str(self.ephemeral_mb * 2**20), "--tmpfs", "/tmp",
            "--tmpfs", "/dev", *_pairs("--dev-bind", [(f"/dev/{d}", f"/dev/{d}") for d in DEVICES]),
            "--symlink", "/proc/self/fd", "/dev/fd", "--remount-ro", "/dev",
            "--proc", "/proc", "--unshare-user", "--uid", str(LAMBDA_UID), "--gid", str(LAMBDA_GID),
            "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--new-session",
            "--clearenv", *_pairs("--setenv", list(env.items())), "--chdir", TASK_ROOT, "--", *argv,
        ]  # fmt: skip
        if not self.cgroups:
            return ["prlimit", f"--as={self.memory_mb * 2**20}", f"--nproc={MAX_THREADS}", "--", *bwrap]
        enter = " && ".join(f'echo $$ > "${i + 1}"' for i in range(len(self.cgroups)))  # then nothing escapes
        procs = [str(group / "cgroup.procs") for group in self.cgroups]
        return ["sh", "-c", f'{enter} && shift {len(procs)} && exec "$@"', "sandbox", *procs, *bwrap]

    def close(self) -> None:
        """Remove the cgroups (the killed sandbox may take a moment to leave them) and files."""
        self._workdir.cleanup()
        deadline = time.monotonic() + CLOSE_WAIT_S
        for group in self.cgroups:
            while group.exists():
                try:
                    group.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)


def _pairs(option: str, pairs: list[tuple[str, str]]) -> list[str]:
    return [word for a, b in pairs for word in (option, a, b)]


def _bind_back(hidden: str, paths: set[str]) -> list[str]:
    """Read-only binds of those ``paths`` that lie under the ``hidden`` directory."""
    inside = sorted(p for p in paths if Path(p).is_relative_to(hidden) and p != hidden)
    return _pairs("--ro-bind", [(p, p) for p in inside])


def _cgroup(controller: str, name: str) -> Path | None:
    """A new v1 cgroup of ``controller`` below this process's own, or None where none can be made."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            group = Path("/sys/fs/cgroup", controller, path.lstrip("/"), name)
            try:
                group.mkdir()
            except OSError:
                return None
            return group
    return None
