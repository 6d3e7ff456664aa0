"""lambda_shim: the rendezvous server and TcpComm, with real processes on loopback."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from lambda_shim.launch import start_server
from lambda_shim.tcpcomm import CommError, ShimConfig, TcpComm
from lambda_shim.wire import (
    KIND_CONTROL,
    KIND_HEARTBEAT,
    KIND_TABLE,
    SERVER,
    AuthError,
    Session,
    encode_control,
    handshake_connect,
    job_key,
    new_secret,
    read_frame,
    send_frame,
    unpack_table,
)
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
    assert f"refused our key for job {job} (wrong token?)" in out


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
        f"cai-hpc: error: CommError: rank 0: rendezvous server 127.0.0.1:{port} unreachable within 1 s: "
        "connection refused"
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
    table, frames = result.stdout.strip().split("\n\n")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["backend", "ranks", "lat"]
    assert [line.split("(")[0].strip() for line in frames.splitlines()[1:]] == ["hmac-sha256", "aes-gcm"]
    assert all(float(line.split()[-1]) > 0 for line in frames.splitlines()[1:])
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


# ---- issue 17: a hostile network, floods, stopped peers, big jobs ----


class Proxy:
    """An on-path attacker without the key: forwards every connection to ``target`` and
    records what it sees; ``inject(i, data)`` writes into the i-th connection's stream
    towards the client."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.clients: list[socket.socket] = []
        self.upstreams: list[socket.socket] = []
        self.seen = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.clients.append(client)
            self.upstreams.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                with self.lock:
                    if len(self.seen) < 64 * 2**20:
                        self.seen += data
                    b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def inject(self, index: int, data: bytes) -> None:
        with self.lock:
            self.clients[index].sendall(data)

    def close(self) -> None:
        self.listener.close()
        for s in self.clients + self.upstreams:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def scenario(server: Server, job: str, name: str, *args: str, size: int = 2, **env: str) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, str(PROGRAMS / "scenario.py"), name, *args],
            env=server.rank_env(rank, size, job, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(size)
    ]


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_huge_header_injected_into_a_relayed_link_ends_the_wait_with_comm_error(server) -> None:
    """Finding 1: 17 bytes claiming 100 GB, injected through the relay after the handshake."""
    proxy = Proxy(server.address)
    job = uuid.uuid4().hex
    procs = scenario(server, job, "slow", "8", CAI_HPC_RENDEZVOUS=proxy.address, CAI_HPC_CONNECT="relay")
    try:
        wait_for(lambda: len(proxy.clients) >= 4)  # two registrations, then the two halves of a relay
        time.sleep(1.0)  # the barrier is done: rank 0 now waits for rank 1
        forged = struct.pack("!Biiq", 1, 1, 0, 100 * 10**9)  # today's 17-byte header
        for i in range(2, len(proxy.clients)):
            proxy.inject(i, forged + bytes(16))
        t0 = time.monotonic()
        out0, _ = procs[0].communicate(timeout=30)
        assert time.monotonic() - t0 < 20
    finally:
        for p in procs:
            p.kill()
            p.communicate()
        proxy.close()
    assert procs[0].returncode == 3, out0
    assert "CommError: rank 0: peer rank 1 is gone while we wait for it" in out0
    assert "failed its check" in out0


def test_an_injected_gone_notice_does_not_make_a_live_rank_gone(server) -> None:
    """Finding 2: a proxy writes {"op": "gone", "rank": 1} into rank 0's server connection."""
    proxy = Proxy(server.address)
    job = uuid.uuid4().hex
    procs = scenario(
        server,
        job,
        "wait",
        "4",
        CAI_HPC_RENDEZVOUS=proxy.address,
        CAI_HPC_CONNECT="direct",
        CAI_HPC_CONNECT_TIMEOUT="10",
    )
    try:
        wait_for(lambda: len(proxy.clients) >= 2)
        time.sleep(1.0)
        gone = json.dumps({"op": "gone", "rank": 1, "ranks": [1]}).encode()
        for i in range(len(proxy.clients)):
            proxy.inject(i, struct.pack("!I", len(gone)) + gone)
        results = finish(procs, timeout=60)
    finally:
        proxy.close()
    assert all("peer rank 1 is gone" not in out for _, out in results), results
    # The tampering is noticed (the server connection fails its check), never believed.
    assert "ok hello" in results[0][1] or "failed its check" in results[0][1], results


def test_a_fake_rendezvous_relaying_the_handshake_cannot_join_the_job(server) -> None:
    """Finding 2: the fake server forwards the real server's challenge to a rank with the job
    key, forwards the answer, then sends its own register as rank 1."""
    job = uuid.uuid4().hex
    host, port = server.address.rsplit(":", 1)
    fake = socket.create_server(("127.0.0.1", 0))
    victim = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "wireup.py")],
        env=server.rank_env(1, 2, job, CAI_HPC_RENDEZVOUS=f"127.0.0.1:{fake.getsockname()[1]}")
        | {"CAI_HPC_CONNECT_TIMEOUT": "5"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    rank0 = server.start(0, 2, job, CAI_HPC_CONNECT_TIMEOUT="20")
    fake.settimeout(30)
    v, _ = fake.accept()
    real = socket.create_connection((host, int(port)), timeout=10)
    v.settimeout(10)
    v.sendall(real.recv(42))  # the server's greeting
    time.sleep(0.5)
    real.sendall(v.recv(4096))  # the rank's proof
    v.sendall(real.recv(32))  # the server's proof
    time.sleep(0.3)
    v.close()
    register = json.dumps({"op": "register", "rank": 1, "size": 2, "addrs": [["127.0.0.1", 9]], "wait_s": 5}).encode()
    real.sendall(struct.pack("!I", len(register)) + register)
    stolen = b""
    try:
        while chunk := real.recv(65536):
            stolen += chunk
    except OSError:
        pass
    real.close()
    fake.close()
    victim.kill()
    victim.communicate()
    # The real rank 1 can still take its place, and the job completes.
    honest = server.start(1, 2, job)
    results = finish([rank0, honest], timeout=60)
    assert b"table" not in stolen and b"127.0.0.1" not in stolen and len(stolen) < 100, stolen[:200]
    assert [c for c, _ in results] == [0, 0], results


def test_frames_on_the_wire_are_encrypted(server) -> None:
    """Finding 9: pickles and the address table are not readable on the path."""
    proxy = Proxy(server.address)
    job = uuid.uuid4().hex
    try:
        results = finish(scenario(server, job, "marker", CAI_HPC_RENDEZVOUS=proxy.address, CAI_HPC_CONNECT="relay"))
    finally:
        proxy.close()
    assert [c for c, _ in results] == [0, 0], results
    assert len(proxy.seen) > 1000
    assert b"plaintext-marker" not in proxy.seen and b"register" not in proxy.seen and b"table" not in proxy.seen


def test_a_short_secret_is_refused_in_one_line(server) -> None:
    [(code, out)] = finish([server.start(0, 1, uuid.uuid4().hex, key=b"short-secret")], timeout=60)
    assert code == 3 and "at least 32" in out.strip().splitlines()[-1]


def logged_server(tmp: Path, files: int | None = None) -> tuple[subprocess.Popen, str, str, str]:
    """A rendezvous server whose log the test reads (and a file limit, if given):
    (process, host, port, master secret)."""
    master = new_secret()
    ready = tmp / "addr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lambda_shim.rendezvous", "--port", "0", "--ready-file", str(ready), "--secret-stdin"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
        preexec_fn=None if files is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files)),
    )
    proc.stdin.write(master + "\n")
    proc.stdin.close()
    proc.stdin = None  # given: communicate() has nothing more to send
    wait_for(ready.exists)
    host, port = ready.read_text().strip().rsplit(":", 1)
    return proc, host, port, master


def test_idle_connections_beyond_the_file_limit_do_not_stop_a_job(tmp_path) -> None:
    """Finding 3: a server limited to 256 files, 400 idle unauthenticated connections from
    another address; a job still wires up, and the server writes a few lines, no tracebacks."""
    proc, host, port, master = logged_server(tmp_path, files=256)
    flood = []
    for _ in range(400):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        try:
            s.connect((host, int(port)))
        except OSError:
            s.close()
            continue
        flood.append(s)
    server = Server.__new__(Server)
    server.tmp, server.master, server.proc, server.address = tmp_path, master, proc, f"{host}:{port}"
    try:
        results = server.run_job(3, uuid.uuid4().hex, timeout=120, CAI_HPC_CONNECT_TIMEOUT="60")
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        _, log = proc.communicate(timeout=10)
    assert [c for c, _ in results] == [0, 0, 0], results
    assert "Traceback" not in log and len(log.splitlines()) < 20, log[-2000:]


def test_a_job_of_1500_ranks_gets_its_table(server) -> None:
    """Finding 4: the table of a job this size was over the 64 KiB cap; registrations here
    speak the protocol directly (1,500 ranks, no listeners)."""
    job = uuid.uuid4().hex
    key = job_key(bytes.fromhex(server.master), job)
    host, port = server.address.rsplit(":", 1)
    size = 1500

    def register(rank: int) -> tuple[socket.socket, Session]:
        for _ in range(100):
            try:
                sock = socket.create_connection((host, int(port)), timeout=60)
                session = handshake_connect(sock, key, job, rank, SERVER)
                break
            except (OSError, EOFError):
                time.sleep(0.1)
        message = {"op": "register", "size": size, "host": "127.0.0.1", "port": 1000 + rank, "wait_s": 60}
        send_frame(sock, session, KIND_CONTROL, rank, 0, encode_control(message | {"liveness_s": 60}))
        return sock, session

    links = [register(r) for r in range(size)]
    tables = [read_frame(sock, session, 12 * size).payload for sock, session in links[:: size // 5]]
    for sock, _ in links:
        sock.close()
    assert all(len(t) == 12 * size for t in tables)
    assert unpack_table(tables[0], size)[1234][0] == ("127.0.0.1", 2234)


def test_a_slowloris_on_a_rank_listener_is_bounded_and_the_job_goes_on(server) -> None:
    """Finding 5: 300 connections trickling bytes at rank 0's listener."""
    job = uuid.uuid4().hex
    key = job_key(bytes.fromhex(server.master), job)
    host, port = server.address.rsplit(":", 1)
    configs = [ShimConfig(r, 2, job, key, (host, int(port)), mode="direct", connect_timeout=60) for r in range(2)]
    comms: list[TcpComm] = []
    threads = [threading.Thread(target=lambda c=c: comms.append(TcpComm(c))) for c in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    comms.sort(key=lambda c: c.rank)
    before = threading.active_count()
    target = comms[0]._transport._listener.getsockname()
    slow = []
    for _ in range(300):
        s = socket.create_connection(target)
        s.sendall(b"\x00")
        slow.append(s)
    time.sleep(1.0)
    threads_under_attack = threading.active_count() - before
    done: list[int] = []
    workers = [threading.Thread(target=lambda c=c: done.append(c.allreduce(1))) for c in comms]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    for s in slow:
        s.close()
    for c in comms:
        c.close()
    assert threads_under_attack <= 40, threads_under_attack
    assert done == [2, 2]


def test_a_stopped_peer_is_declared_dead_within_the_liveness_deadline(server) -> None:
    """Finding 6: SIGSTOP leaves the kernel answering, so only heartbeats can tell."""
    procs = scenario(server, uuid.uuid4().hex, "stop", CAI_HPC_LIVENESS="2")
    t0 = time.monotonic()
    out0, _ = procs[0].communicate(timeout=60)
    took = time.monotonic() - t0
    procs[1].kill()
    procs[1].communicate()
    assert procs[0].returncode == 3 and took < 30, out0
    assert "peer rank 1 is gone while we wait for it: nothing from rank 1 for 2 s" in out0


def test_a_send_to_a_stopped_peer_fails_within_the_liveness_deadline(server) -> None:
    procs = scenario(server, uuid.uuid4().hex, "stop-send", CAI_HPC_LIVENESS="2")
    out0, _ = procs[0].communicate(timeout=60)
    procs[1].kill()
    procs[1].communicate()
    assert procs[0].returncode == 3, out0
    assert "rank 1" in out0 and ("took nothing for 2 s" in out0 or "nothing from rank 1 for 2 s" in out0), out0


def test_a_slow_but_alive_peer_is_not_declared_dead(server) -> None:
    results = finish(scenario(server, uuid.uuid4().hex, "slow", "5", CAI_HPC_LIVENESS="1"), timeout=60)
    assert [c for c, _ in results] == [0, 0], results
    assert "ok done" in results[0][1]


def test_losing_the_server_while_waiting_on_an_unconnected_peer_is_comm_error(server) -> None:
    procs = scenario(server, uuid.uuid4().hex, "wait", "60", CAI_HPC_LIVENESS="2", CAI_HPC_CONNECT="direct")
    time.sleep(3)  # both registered; rank 0 waits for rank 1, which has not connected
    server.proc.kill()
    server.proc.wait()
    out0, _ = procs[0].communicate(timeout=60)
    procs[1].kill()
    procs[1].communicate()
    assert procs[0].returncode == 3, out0
    assert "waiting for rank 1, which has no connection to this rank, and the rendezvous server is lost" in out0


def _raw_client(server: Server, job: str, rank: int) -> tuple[socket.socket, Session]:
    host, port = server.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock, handshake_connect(sock, job_key(bytes.fromhex(server.master), job), job, rank, SERVER)


def test_a_finished_job_gets_no_relay(server) -> None:
    """Finding 7: a relay request with the key of a job that has ended is refused at once."""
    job = uuid.uuid4().hex
    assert [c for c, _ in server.run_job(2, job)] == [0, 0]
    sock, session = _raw_client(server, job, 0)
    send_frame(sock, session, KIND_CONTROL, 0, 0, encode_control({"op": "relay", "peer": 1, "wait_s": 30}))
    payload = read_frame(sock, session, 65536).payload
    sock.close()
    assert json.loads(payload)["message"].startswith("relay refused")


def test_a_request_past_the_request_limit_is_refused_and_the_server_goes_on(server) -> None:
    """Attack F4: a member's 60 KB control message (of the kind that made the depth check
    quadratic) held the server's only loop for minutes; requests are under 200 bytes."""
    sock, session = _raw_client(server, uuid.uuid4().hex, 0)
    send_frame(sock, session, KIND_CONTROL, 0, 0, b'"' + b'\\"' * 30_000)
    assert sock.recv(1) == b""  # refused: the connection ends
    sock.close()
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as other:
        assert other.recv(64)  # another client's greeting, at once
    assert [c for c, _ in server.run_job(2, uuid.uuid4().hex)] == [0, 0]


def test_a_rank_whose_first_registration_dropped_can_register_again(server) -> None:
    """Finding 8: the server notices the end of the first connection."""
    job = uuid.uuid4().hex
    sock, session = _raw_client(server, job, 1)
    message = {"op": "register", "size": 2, "host": "127.0.0.1", "port": 9, "wait_s": 30, "liveness_s": 60}
    send_frame(sock, session, KIND_CONTROL, 1, 0, encode_control(message))
    time.sleep(0.5)
    sock.close()
    time.sleep(0.5)
    assert [c for c, _ in server.run_job(2, job)] == [0, 0]


def test_failed_handshakes_and_deep_json_are_logged_briefly(tmp_path) -> None:
    """Finding 11: 200 wrong-key handshakes with an attacker's job id, and deeply nested JSON
    after a good one: a few lines, none with the attacker's text, no traceback."""
    proc, host, port, master = logged_server(tmp_path)
    for _ in range(200):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            try:
                handshake_connect(s, bytes(32), "EVIL-TEXT-x", 0, SERVER)
            except (AuthError, EOFError):
                pass
    job = uuid.uuid4().hex
    with socket.create_connection((host, int(port)), timeout=10) as s:
        session = handshake_connect(s, job_key(bytes.fromhex(master), job), job, 0, SERVER)
        send_frame(s, session, KIND_CONTROL, 0, 0, b"[" * 30000 + b"]" * 30000)
        assert s.recv(100) == b""
    proc.terminate()
    _, log = proc.communicate(timeout=10)
    assert "Traceback" not in log and "RecursionError" not in log and "EVIL" not in log
    assert 1 <= len(log.splitlines()) <= 5, log


def test_launched_ranks_get_the_job_key_only() -> None:
    """Finding 11: nothing a rank can read holds the server's master secret."""
    probe = (
        "import os, pathlib; d = pathlib.Path(os.environ['CAI_HPC_TOKEN_FILE']).parent; "
        "print(sorted(p.name for p in d.iterdir()), sorted(k for k in os.environ if 'TOKEN' in k))"
    )
    result = launch(1, sys.executable, "-c", probe)
    assert result.returncode == 0, result.stderr
    assert "'job.token'" in result.stdout and "secret" not in result.stdout
    assert result.stdout.strip().endswith("] ['CAI_HPC_TOKEN_FILE']")


def test_256_ranks_in_two_processes_wire_up_and_leave() -> None:
    """Finding 11 at CI size: many ranks per process through one server (2,000 in the note)."""
    result = subprocess.run(
        [sys.executable, str(PROGRAMS / "many_ranks.py"), "--drive", "256", "--procs", "2", "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ranks=256 processes=2" in result.stdout


GOOD_EVENT = {
    "job": "run-1",
    "rank": 1,
    "world_size": 4,
    "data": "s3://bucket/survey/",
    "shards": ["s3://bucket/survey/shard-00001.h5"],
    "out": "s3://bucket/runs/r1/",
    "token_secret": "cai-hpc/rendezvous",
}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"out": "/tmp/elsewhere"}, "out must be an s3:// prefix under s3://bucket/runs"),
        ({"out": "s3://other-bucket/runs/r1/"}, "out must be an s3:// prefix under s3://bucket/runs"),
        ({"out": "s3://bucket/runs/../r0/"}, "out must be"),
        ({"shards": ["s3://bucket/secret/x.h5"]}, "shards must be a list of s3:// URIs under data"),
        ({"shards": ["s3://bucket/survey/../secret/x.h5"]}, "shards must be"),
        ({"data": "/etc"}, "data must be an s3:// prefix"),
        ({"rendezvous": "203.0.113.66:7000"}, "rendezvous must be absent or the configured 127.0.0.1:7777"),
        ({"job": ""}, "job must be 1-64 letters"),
        ({"job": "x" * 300}, "job must be 1-64 letters"),
        ({"job": "a/../b"}, "job must be 1-64 letters"),
        ({"connect": "carrier-pigeon"}, "connect must be one of auto, punch, direct, relay"),
        ({"op_timeout_s": float("nan")}, "op_timeout_s must be a number of seconds"),
        ({"connect_timeout_s": "10"}, "connect_timeout_s must be a number of seconds"),
        ({"op_timeout_s": None}, "op_timeout_s must be a number of seconds"),
        ({"world_size": 10**9}, "world_size must be an integer in 1..100000"),
        ({"rank": True}, "rank must be an integer in 0..3"),
        ({"rank": 4}, "rank must be an integer in 0..3"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"precision": "fp8"}, "precision must be fp32 or bf16"),
        ({"token_secret": "a b"}, "token_secret must be a Secrets Manager secret name"),
    ],
)
def test_the_handler_refuses_a_bad_event_field_in_one_line(monkeypatch, change, words) -> None:
    """Finding 10: every field is checked before anything runs."""
    from lambda_shim.aws import handler

    monkeypatch.setenv("CAI_HPC_RENDEZVOUS", "127.0.0.1:7777")
    monkeypatch.setenv("CAI_HPC_OUT_PREFIX", "s3://bucket/runs/")
    monkeypatch.setenv("CAI_HPC_DATA_PREFIX", "s3://bucket/")
    with pytest.raises(handler.RankFailedError) as refused:
        handler.handler(GOOD_EVENT | change, None)
    assert str(refused.value).startswith(f"rank {change.get('rank', 1)}: event: ") and "\n" not in str(refused.value)
    assert words in str(refused.value)
    assert handler.RankEvent.parse(GOOD_EVENT | {"rendezvous": "127.0.0.1:7777"}).op_timeout_s == 900.0


def test_the_handler_needs_the_rendezvous_address_in_its_configuration(monkeypatch) -> None:
    from lambda_shim.aws import handler

    monkeypatch.delenv("CAI_HPC_RENDEZVOUS", raising=False)
    with pytest.raises(handler.RankFailedError, match="configuration has no CAI_HPC_RENDEZVOUS"):
        handler.handler(GOOD_EVENT | {"rendezvous": "127.0.0.1:7777"}, None)


# ---------------------------------------------------------------- wire3: a request read whole or not at all
def _member(server: Server, liveness_s: float) -> tuple[socket.socket, Session]:
    """A raw rank registered alone in a fresh job (so wired up at once), its table read."""
    sock, session = _raw_client(server, uuid.uuid4().hex, 0)
    message = {"op": "register", "size": 1, "host": "127.0.0.1", "port": 9, "wait_s": 30, "liveness_s": liveness_s}
    send_frame(sock, session, KIND_CONTROL, 0, 0, encode_control(message))
    assert read_frame(sock, session, 65536).kind == KIND_TABLE
    return sock, session


def test_a_request_whose_payload_record_comes_past_the_liveness_deadline_is_read_whole(server) -> None:
    """attack2's note: the server's liveness wait could give up between a request's header
    record and its payload record; its next read was then out of step and ended the member.
    A frame whose header came within the deadline is read whole (its rest has a deadline of its
    own), and the member is served after it."""
    sock, session = _member(server, liveness_s=2.0)
    header, payload = session.seal_frame(KIND_CONTROL, 0, 0, encode_control({"op": "noop", "pad": "x" * 60}))
    time.sleep(1.0)
    sock.sendall(header)  # within the liveness deadline
    time.sleep(1.6)
    sock.sendall(payload)  # past it, counted from the last request; within it, from the header
    send_frame(sock, session, KIND_HEARTBEAT, 0, 0)
    assert read_frame(sock, session, 65536).kind == KIND_HEARTBEAT  # still a member
    sock.close()


def test_a_request_that_stops_after_its_header_ends_the_member_with_that_reason(tmp_path, capfd) -> None:
    """A started frame that never finishes ends the member within its deadline, and the
    server says why (not "no heartbeat": the rank did send something)."""
    master = new_secret()
    (tmp_path / "secret").write_text(master)
    server = Server.__new__(Server)
    server.tmp, server.master = tmp_path, master
    server.proc, server.address = start_server(tmp_path, tmp_path / "secret", verbose=True)
    try:
        sock, session = _member(server, liveness_s=1.0)
        header, _ = session.seal_frame(KIND_CONTROL, 0, 0, encode_control({"op": "noop", "pad": "x" * 60}))
        sock.sendall(header)
        started = time.monotonic()
        assert sock.recv(1) == b""  # the server ended the member (the socket's timeout: 10 s)
        assert time.monotonic() - started < 8
        sock.close()
    finally:
        server.stop()
    assert "rank 0 is gone: a request stopped after its header for 1 s" in capfd.readouterr().err
