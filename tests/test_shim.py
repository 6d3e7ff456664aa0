"""lambda_shim: the rendezvous server and TcpComm, with real processes on loopback."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lambda_shim.launch import start_server
from lambda_shim.tcpcomm import CommError, ShimConfig, TcpComm
from lambda_shim.wire import job_key, new_secret
from tests.conftest import skip_or_fail

PROGRAMS = Path(__file__).with_name("programs")
SUITE = Path(__file__).with_name("test_parallel_engine.py")
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
MODES = ["punch", "direct", "relay", "auto"]


def clean_env() -> dict[str, str]:
    drop = ("PMI_", "MPI_LOCAL", "SLURM_", "CAI_HPC_", "RANK", "WORLD_SIZE")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def launch(ranks: int, *command: str, mode: str = "auto", timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lambda_shim.launch", "-n", str(ranks), "--mode", mode, "--", *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
    )


class Server:
    """A rendezvous server of the test's own, and ranks started by hand against it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.master = new_secret()
        (tmp / "secret").write_text(self.master)
        self.proc, self.address = start_server(tmp, tmp / "secret")

    def rank_env(self, rank: int, size: int, job: str, key: bytes | None = None, **extra: str) -> dict[str, str]:
        key = key or job_key(bytes.fromhex(self.master), job)
        token = self.tmp / f"token-{job}-{rank}"
        token.write_text(key.hex())
        return clean_env() | {
            "RANK": str(rank),
            "WORLD_SIZE": str(size),
            "CAI_HPC_RENDEZVOUS": self.address,
            "CAI_HPC_JOB_ID": job,
            "CAI_HPC_TOKEN_FILE": str(token),
            **extra,
        }

    def start(self, rank: int, size: int, job: str, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(PROGRAMS / "wireup.py"), *args],
            env=self.rank_env(rank, size, job, **kw),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run_job(self, size: int, job: str, *args: str, timeout: float = 120, **kw) -> list[tuple[int, str]]:
        return finish([self.start(r, size, job, *args, **kw) for r in range(size)], timeout)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    """(exit code, output) of each process, its pipe closed."""
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.stop()


# ---- same results as mpi4py ----


@pytest.fixture(scope="module")
def mpi_conformance(tmp_path_factory) -> Path:
    if MPIEXEC is None:
        skip_or_fail("no mpiexec to compare with")
    out = tmp_path_factory.mktemp("conf-mpi")
    result = subprocess.run(
        [MPIEXEC, "-n", "4", sys.executable, str(PROGRAMS / "conformance.py"), "mpi", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("mode", MODES)
def test_every_call_gives_what_mpi4py_gives(mode, mpi_conformance, tmp_path) -> None:
    result = launch(4, sys.executable, str(PROGRAMS / "conformance.py"), "tcp", str(tmp_path), mode=mode)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(4):
        mine = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        theirs = pickle.loads((mpi_conformance / f"rank{rank}.pkl").read_bytes())
        assert mine == theirs
    assert pickle.loads((tmp_path / "rank0.pkl").read_bytes())["big"] == (100 * 2**20, 3.5 * 100 * 2**20 / 8)


@pytest.mark.parametrize("ranks", [2, 4])
def test_engine_suite_runs_on_tcpcomm(ranks) -> None:
    result = launch(ranks, sys.executable, "-m", "pytest", "-p", "no:mpi", "-p", "no:cacheprovider", "-q", str(SUITE))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("3 passed") == ranks


def test_launch_infer_equals_mpiexec(small_dataset, tmp_path) -> None:
    args = ["-m", "cai_hpc", "infer", "--data", str(small_dataset), "--batch-size", "40", "-q"]
    result = launch(4, sys.executable, *args, "--backend", "tcp", "--out", str(tmp_path / "tcp"))
    assert result.returncode == 0, result.stderr[-3000:]
    tcp = json.loads((tmp_path / "tcp" / "summary.json").read_text())
    assert tcp["backend"] == "tcp" and tcp["world_size"] == 4
    if MPIEXEC is None:
        skip_or_fail("no mpiexec to compare with")
    mpi = subprocess.run(
        [MPIEXEC, "-n", "4", sys.executable, *args, "--backend", "mpi", "--out", str(tmp_path / "mpi")],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert mpi.returncode == 0, mpi.stderr
    reference = json.loads((tmp_path / "mpi" / "summary.json").read_text())
    for key, value in reference["metrics"].items():
        assert tcp["metrics"][key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_128_ranks_wire_up_and_complete_collectives(mode) -> None:
    result = launch(128, sys.executable, str(PROGRAMS / "wireup.py"), mode=mode, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if "size=128" in line)
    print(f"{mode}: {line}")


# ---- failures: a clear error, before the deadline, never a hang ----


def test_a_rank_that_never_starts_is_named_on_every_other_rank(server) -> None:
    job = uuid.uuid4().hex
    t0 = time.monotonic()
    results = finish([server.start(r, 4, job, CAI_HPC_CONNECT_TIMEOUT="3") for r in (0, 1, 3)], timeout=60)
    assert time.monotonic() - t0 < 30  # the 3 s deadline, plus start-up
    for code, out in results:
        assert code == 3
        assert f"job {job}: 1 of 4 ranks never arrived before the deadline: 2" in out


def test_a_rank_killed_mid_allreduce_makes_the_others_raise(server) -> None:
    job = uuid.uuid4().hex
    t0 = time.monotonic()
    results = server.run_job(4, job, "2", timeout=120)
    assert time.monotonic() - t0 < 60
    codes = [code for code, _ in results]
    assert codes[2] == -9 and all(c == 3 for i, c in enumerate(codes) if i != 2), results
    assert any("peer rank 2 is gone" in out for _, out in results), results


def test_a_job_id_cannot_be_reused(server) -> None:
    job = uuid.uuid4().hex
    assert [c for c, _ in server.run_job(2, job)] == [0, 0]
    again = server.run_job(2, job)
    assert [c for c, _ in again] == [3, 3]
    assert all(f"job {job} already ran" in out for _, out in again)


def test_a_wrong_token_is_refused(server) -> None:
    job = uuid.uuid4().hex
    [(code, out)] = finish([server.start(0, 1, job, key=b"\x00" * 32)], timeout=60)
    assert code == 3
    assert "rendezvous server closed the connection (wrong token?)" in out


def test_garbage_stalls_and_half_messages_do_not_stop_the_server(server) -> None:
    host, port = server.address.rsplit(":", 1)
    bad = []
    for payload in (b"GET / HTTP/1.1\r\n\r\n" * 50, b"\x00" * 10, b"", os.urandom(4096)):
        s = socket.create_connection((host, int(port)))
        s.recv(64)  # the server's hello
        if payload:
            s.sendall(payload)
        bad.append(s)  # some stay open and silent: stalled clients
    half = socket.create_connection((host, int(port)))
    half.recv(64)
    half.sendall(os.urandom(40))  # part of a handshake, then disconnect
    half.close()
    assert [c for c, _ in server.run_job(3, uuid.uuid4().hex)] == [0, 0, 0]
    for s in bad:
        s.close()
    assert server.proc.poll() is None


def test_a_restarted_server_serves_the_next_job(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Server(tmp_path / "a")
    assert [c for c, _ in first.run_job(2, uuid.uuid4().hex)] == [0, 0]
    first.stop()
    second = Server(tmp_path / "b")
    try:
        assert [c for c, _ in second.run_job(2, uuid.uuid4().hex)] == [0, 0]
    finally:
        second.stop()


def test_an_unreachable_server_is_one_clear_error(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "t").write_text("00" * 32)
    env = clean_env() | {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "CAI_HPC_RENDEZVOUS": f"127.0.0.1:{port}",
        "CAI_HPC_JOB_ID": "x",
        "CAI_HPC_TOKEN_FILE": str(tmp_path / "t"),
        "CAI_HPC_CONNECT_TIMEOUT": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "cai_hpc", "infer", "--backend", "tcp", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"cai-hpc: error: CommError: rank 0: rendezvous server 127.0.0.1:{port} unreachable: "
        "[Errno 111] Connection refused"
    ]


def test_a_failed_registration_leaves_no_socket_open() -> None:
    # A warm Lambda process survives a failed invocation: its listeners must not linger.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ShimConfig(0, 2, "x", bytes(32), ("127.0.0.1", port), connect_timeout=0.3)
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(CommError, match="unreachable"):
            TcpComm(config)
    assert set(os.listdir("/proc/self/fd")) <= before


def test_bench_prints_a_row_per_backend() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lambda_shim.bench", "--ranks", "2", "--repeat", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["backend", "ranks", "lat"]
    names = [line.split()[0] for line in lines[1:]]
    assert names[-3:] == ["tcp-punch", "tcp-direct", "tcp-relay"]
    assert all(float(line.split()[2]) > 0 for line in lines[1:])


def test_an_operation_timeout_bounds_a_wait_on_a_live_but_silent_peer(server) -> None:
    job = uuid.uuid4().hex
    procs = [
        subprocess.Popen(
            [sys.executable, str(PROGRAMS / "stall.py")],
            stdout=subprocess.PIPE,
            text=True,
            env=server.rank_env(rank, 2, job, CAI_HPC_OP_TIMEOUT="1"),
        )
        for rank in range(2)
    ]
    t0 = time.monotonic()
    out, _ = procs[0].communicate(timeout=60)
    assert time.monotonic() - t0 < 20
    procs[1].kill()
    procs[1].communicate()
    assert procs[0].returncode == 3
    assert "no message from rank 1 (tag 0) within 1.0 s" in out


def test_jobs_run_side_by_side_on_one_server(server) -> None:
    jobs = [uuid.uuid4().hex for _ in range(3)]
    procs = [server.start(rank, 3, job) for job in jobs for rank in range(3)]
    assert [code for code, _ in finish(procs)] == [0] * 9


def test_launch_of_a_missing_command_is_one_line() -> None:
    result = launch(2, "/no/such/command")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "launch: error: [Errno 2] No such file or directory: '/no/such/command'"
    ]
