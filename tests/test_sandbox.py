"""lambda_shim.aws.sandbox: the emulated functions' bubblewrap sandbox holds them to Lambda's rules."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from lambda_shim.aws.sandbox import MAX_THREADS, Sandbox, unavailable
from tests.conftest import requires_infra, skip_or_fail

WHY = unavailable()
pytestmark = requires_infra(None if WHY is None else f"no sandbox here: {WHY}")

PROBE = textwrap.dedent(
    """
    import json, os, sys
    seen = {"uid": os.getuid(), "cwd": os.getcwd(), "shm": os.path.exists("/dev/shm"), "env": sorted(os.environ)}
    for path in ("/var/task/x", "/etc/x", "/x", "/home/x", "/tmp/x"):
        try:
            with open(path, "w") as f:
                f.write("x")
            seen[path] = "written"
        except OSError as exc:
            seen[path] = exc.strerror
    try:
        import multiprocessing
        multiprocessing.Lock()
        seen["lock"] = "made"
    except OSError as exc:
        seen["lock"] = exc.strerror
    print(json.dumps(seen))
    """
)


def _run(sandbox: Sandbox, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = sandbox.environment({"PYTHONUNBUFFERED": "1"})
    return subprocess.run(
        sandbox.command([sys.executable, "-c", code], env), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def sandbox():
    box = Sandbox("cai-hpc-rank", memory_mb=512, ephemeral_mb=16)
    yield box
    box.close()


@pytest.fixture(params=["cgroups", "rlimits"])
def any_sandbox(request):
    """Both ways of limiting memory: cgroups where they can be made, else RLIMIT_AS."""
    box = Sandbox("cai-hpc-rank", memory_mb=512, ephemeral_mb=16, cgroups=request.param == "cgroups")
    if request.param == "cgroups" and not box.cgroups:
        box.close()
        skip_or_fail("no cgroups can be made here")
    yield box
    box.close()


@pytest.mark.timeout(60)
def test_only_tmp_is_writable_and_the_rest_is_lambdas(sandbox) -> None:
    done = _run(sandbox, PROBE)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["/tmp/x"] == "written"
    for path in ("/var/task/x", "/etc/x", "/x", "/home/x"):
        assert seen[path] == "Read-only file system", path
    assert (seen["uid"], seen["cwd"], seen["shm"]) == (993, "/var/task", False)
    assert seen["lock"] != "made"  # no /dev/shm: multiprocessing's semaphores fail, as on Lambda
    assert {"AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "LAMBDA_TASK_ROOT"} <= set(seen["env"])
    assert "HOME" not in seen["env"] and not [v for v in seen["env"] if v.startswith("PYTEST")]


@pytest.mark.timeout(60)
def test_tmp_is_as_large_as_the_ephemeral_storage(sandbox) -> None:
    fill = "open('/tmp/big', 'wb').write(bytes({n} * 2**20))"
    assert _run(sandbox, fill.format(n=8)).returncode == 0
    full = _run(sandbox, fill.format(n=24))
    assert full.returncode != 0 and "No space left on device" in full.stderr


@pytest.mark.timeout(60)
def test_memory_beyond_the_function_memory_ends_the_sandbox(any_sandbox) -> None:
    assert _run(any_sandbox, "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096])").returncode == 0
    over = _run(any_sandbox, "b = bytearray(700 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('survived')")
    assert over.returncode != 0 and "survived" not in over.stdout


@pytest.mark.timeout(60)
def test_at_most_1024_threads(sandbox) -> None:
    code = textwrap.dedent(
        """
        import threading, time
        threading.stack_size(65536)
        stop, started = threading.Event(), 0
        try:
            for _ in range(1100):
                threading.Thread(target=stop.wait, daemon=True).start()
                started += 1
        except RuntimeError:
            pass
        stop.set()
        print(started)
        """
    )
    done = _run(sandbox, code)
    assert done.returncode == 0, done.stderr
    # The interpreter, bubblewrap's init and the main thread count too.
    assert MAX_THREADS - 8 <= int(done.stdout) < MAX_THREADS


def test_without_bubblewrap_the_reason_is_one_line(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run here
    assert unavailable() == "bubblewrap (bwrap) is not installed"
