"""Many ranks of one job in one process (a thread each), for wire-up at scale.

    many_ranks.py FIRST COUNT          # ranks FIRST..FIRST+COUNT-1; the rest of the job from the
                                       # environment: WORLD_SIZE, CAI_HPC_RENDEZVOUS, CAI_HPC_JOB_ID,
                                       # CAI_HPC_TOKEN_FILE
    many_ranks.py --drive N --procs P  # start a rendezvous server and P such processes for N ranks

Every rank wires up, then runs barrier + allreduce + gather, then leaves. A process prints
one line: its slowest wire-up, collectives and teardown (seconds); the driver prints the job's.
A process still running 30 s after the connect timeout dumps every thread's stack to stderr
and exits (a hang shows where each rank waits).
"""

from __future__ import annotations

import argparse
import faulthandler
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path


def run_ranks(first: int, count: int) -> int:
    from lambda_shim.tcpcomm import CommError, ShimConfig, TcpComm

    threading.stack_size(512 * 1024)  # thousands of threads: keep each one small
    base = ShimConfig.from_env(os.environ | {"RANK": "0"})
    faulthandler.dump_traceback_later(base.connect_timeout + 30, exit=True)
    size = base.size
    times: dict[str, list[float]] = {"wireup": [], "collectives": [], "teardown": []}
    errors: list[str] = []
    start = threading.Barrier(count + 1)

    def rank(r: int) -> None:
        start.wait()
        t0 = time.perf_counter()
        try:
            comm = TcpComm(
                ShimConfig(
                    r, size, base.job_id, base.key, base.server, base.mode, base.connect_timeout, None, base.liveness
                )
            )
            t1 = time.perf_counter()
            comm.barrier()
            total = comm.allreduce(r)
            ranks = comm.gather(r)
            comm.barrier()
            t2 = time.perf_counter()
            comm.close()
            t3 = time.perf_counter()
        except CommError as exc:
            errors.append(str(exc))
            if "comm" in locals():
                comm.close()  # leave, as a process ending on the error would: the others must see it
            return
        if total != size * (size - 1) // 2 or (r == 0 and ranks != list(range(size))):
            errors.append(f"rank {r}: wrong results")
        times["wireup"].append(t1 - t0)
        times["collectives"].append(t2 - t1)
        times["teardown"].append(t3 - t2)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(first, first + count)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    if errors:
        print(f"CommError: {len(errors)} ranks failed, first: {errors[0]}", flush=True)
        return 3
    print(" ".join(f"{k}_s={max(v):.3f}" for k, v in times.items()), flush=True)
    return 0


def drive(n: int, procs: int, timeout: float) -> int:
    from lambda_shim.launch import start_server
    from lambda_shim.wire import job_key, new_secret

    with tempfile.TemporaryDirectory() as tmp:
        master = new_secret()
        job = uuid.uuid4().hex
        token = Path(tmp) / "token"
        token.write_text(job_key(bytes.fromhex(master), job).hex())
        server, address = start_server(Path(tmp), secret=master, verbose=bool(os.environ.get("VERBOSE")))
        env = os.environ | {
            "WORLD_SIZE": str(n),
            "CAI_HPC_RENDEZVOUS": address,
            "CAI_HPC_JOB_ID": job,
            "CAI_HPC_TOKEN_FILE": str(token),
            "CAI_HPC_CONNECT": os.environ.get("CAI_HPC_CONNECT", "direct"),
            "CAI_HPC_CONNECT_TIMEOUT": str(timeout),
        }
        bounds = [n * i // procs for i in range(procs + 1)]
        t0 = time.perf_counter()
        try:
            children = [
                subprocess.Popen(
                    [sys.executable, __file__, str(a), str(b - a)], env=env, stdout=subprocess.PIPE, text=True
                )
                for a, b in itertools.pairwise(bounds)
            ]
            outs = [c.communicate(timeout=timeout + 60)[0].strip() for c in children]
        finally:
            server.terminate()
            server.wait(timeout=10)
        wall = time.perf_counter() - t0
        for c, out in zip(children, outs, strict=True):
            print(f"process: {out}")
            if c.returncode:
                return c.returncode
        print(f"ranks={n} processes={procs} wall_s={wall:.1f}")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("first", nargs="?", type=int)
    parser.add_argument("count", nargs="?", type=int)
    parser.add_argument("--drive", type=int)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.drive:
        return drive(args.drive, args.procs, args.timeout)
    return run_ranks(args.first, args.count)


if __name__ == "__main__":
    sys.exit(main())
