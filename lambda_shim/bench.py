"""Communicator micro-benchmarks: TcpComm (each connection mode) beside mpi4py + MPICH,
measured on the same machine in the same run.

    python -m lambda_shim.bench [--ranks 2,4,8] [--repeat 200]

Point to point (ranks 0 and 1 of a 2-rank job), with the object API and ``bytes`` payloads:
latency of an 8-byte message (half a round trip, as OSU's osu_latency measures it: ping-pongs
back to back, timed ``BATCH`` at a time, so the barrier before each batch does not count) and
bandwidth of 1 MB and 64 MB messages (one ping-pong after each barrier). Collectives at each
rank count: allreduce of one float, bcast of 1 MB, gather of 1 KB per rank. Times are medians
over repeats.

Then the cost of protecting frames, in one process (no network): sealing and opening 1 MB
and 64 MB payloads with today's AES-GCM frames beside the HMAC-SHA256 frames used before
(authenticated, not encrypted), in MB/s of payload through both ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("punch", "direct", "relay")
BATCH = 10  # latency ping-pongs timed together


def _world(backend: str):
    if backend == "mpi":
        from mpi4py import MPI

        return MPI.COMM_WORLD
    from lambda_shim.tcpcomm import TcpComm

    return TcpComm.from_env()


def _median_time(comm, step, repeat: int, batch: int = 1) -> float:
    """The median time of one ``step`` over ``repeat`` timings of ``batch`` steps, each timing
    after a barrier."""
    times = []
    for _ in range(repeat):
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(batch):
            step()
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times)


def worker(backend: str, repeat: int, out: Path) -> None:
    comm = _world(backend)
    rank, size = comm.Get_rank(), comm.Get_size()
    row: dict[str, float] = {}
    if size == 2:
        for label, nbytes, reps, batch in (
            ("lat_8B_us", 8, repeat, BATCH),
            ("bw_1MB", 2**20, max(5, repeat // 10), 1),
            ("bw_64MB", 64 * 2**20, 3, 1),
        ):
            data = bytes(nbytes)

            def pingpong(data=data) -> None:
                if rank == 0:
                    comm.send(data, dest=1, tag=1)
                    comm.recv(source=1, tag=2)
                else:
                    comm.recv(source=0, tag=1)
                    comm.send(data, dest=0, tag=2)

            half_rtt = _median_time(comm, pingpong, reps, batch) / 2
            row[label] = half_rtt * 1e6 if label.startswith("lat") else nbytes / half_rtt / 1e6
    mb = bytes(2**20)
    kb = bytes(1024)
    row["allreduce_us"] = _median_time(comm, lambda: comm.allreduce(1.0), repeat) * 1e6
    row["bcast_1MB_ms"] = _median_time(comm, lambda: comm.bcast(mb if rank == 0 else None), max(5, repeat // 10)) * 1e3
    row["gather_1KB_us"] = _median_time(comm, lambda: comm.gather(kb), repeat) * 1e6
    if rank == 0:
        out.write_text(json.dumps(row))


def _run(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed: {result.stderr.strip()[-500:]}")


def driver(ranks: list[int], repeat: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "CAI_HPC_", "SLURM_"))}
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    me = [sys.executable, "-m", "lambda_shim.bench", "--repeat", str(repeat), "--worker"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in ranks:
            runs = [("mpi4py+MPICH", [mpiexec, "-n", str(n), *me, "mpi"])] if mpiexec else []
            runs += [
                (f"tcp-{m}", [sys.executable, "-m", "lambda_shim.launch", "-n", str(n), "--mode", m, "--", *me, "tcp"])
                for m in MODES
            ]
            for name, command in runs:
                out = Path(tmp) / f"{name}-{n}.json"
                _run([*command, "--out", str(out)], env)
                rows.append({"backend": name, "ranks": n, **json.loads(out.read_text())})
    return rows


COLUMNS = (  # key, heading, width, number format
    ("backend", "backend", 13, "s"),
    ("ranks", "ranks", 5, "d"),
    ("lat_8B_us", "lat 8B us", 10, ".1f"),
    ("bw_1MB", "1MB MB/s", 9, ".0f"),
    ("bw_64MB", "64MB MB/s", 9, ".0f"),
    ("allreduce_us", "allreduce us", 12, ".1f"),
    ("bcast_1MB_ms", "bcast 1MB ms", 12, ".2f"),
    ("gather_1KB_us", "gather 1KB us", 13, ".1f"),
)


def format_rows(rows: list[dict]) -> str:
    def cell(text: str, width: int, left: bool) -> str:
        return text.ljust(width) if left else text.rjust(width)

    lines = [" ".join(cell(head, w, fmt == "s") for _, head, w, fmt in COLUMNS)]
    for row in rows:
        lines.append(
            " ".join(
                cell("-" if row.get(key) is None else format(row[key], fmt), w, fmt == "s")
                for key, _, w, fmt in COLUMNS
            )
        )
    return "\n".join(lines)


def frame_rates(repeat: int = 5) -> list[dict]:
    """MB/s of payload sealed and opened (both ends, one thread) per frame protection."""
    import hashlib
    import hmac

    from lambda_shim.landing import new_bytearray
    from lambda_shim.wire import HEADER, KIND_BYTES, RecordBuffers, Session, chunk_sizes

    key = bytes(range(32))
    a, b = Session(key, key[::-1]), Session(key[::-1], key)
    buffers = RecordBuffers(1)

    def aes_gcm(payload: bytes) -> None:
        """As the transport does it: each record opened as it comes (the sender seals the next
        into the same buffer), into a payload allocated once the header is checked."""
        records = a.seal_frame(KIND_BYTES, 0, 0, payload, buffers=buffers)
        length = b.open_header(next(records))[0].length
        out, off = memoryview(new_bytearray(length)), 0
        for record, n in zip(records, chunk_sizes(length), strict=True):
            b.open_into(record, out[off : off + n])
            off += n

    def hmac_sha256(payload: bytes, seq: list[int] = [0]) -> None:  # noqa: B006 - a counter, as before
        header = HEADER.pack(KIND_BYTES, 0, 0, 0, len(payload))
        for _side in range(2):  # the sender computes it, the receiver checks it
            mac = hmac.new(key, seq[0].to_bytes(8, "big"), hashlib.sha256)
            mac.update(header)
            mac.update(payload)
            mac.digest()
        seq[0] += 1

    rows = []
    for name, protect in (("hmac-sha256 (before)", hmac_sha256), ("aes-gcm (now)", aes_gcm)):
        row: dict = {"frames": name}
        for label, nbytes in (("1MB", 2**20), ("64MB", 64 * 2**20)):
            payload = bytes(nbytes)
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                protect(payload)
                times.append(time.perf_counter() - t0)
            row[label] = nbytes / statistics.median(times) / 1e6
        rows.append(row)
    return rows


def format_frames(rows: list[dict]) -> str:
    lines = [f"{'frames':<21} {'1MB MB/s':>9} {'64MB MB/s':>9}"]
    lines += [f"{r['frames']:<21} {r['1MB']:>9.0f} {r['64MB']:>9.0f}" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lambda_shim.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="2,4,8", help="rank counts for the collectives (2 also runs point to point)")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--worker", choices=["mpi", "tcp"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.repeat, args.out)
        return 0
    print(format_rows(driver([int(n) for n in args.ranks.split(",")], args.repeat)))
    print()
    print(format_frames(frame_rates()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
