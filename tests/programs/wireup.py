"""A light rank (no torch): wire up, then barrier + allreduce + gather, and report timings.
Usage: wireup.py [die-at-allreduce-rank]"""

from __future__ import annotations

import os
import signal
import sys
import time

t0 = time.perf_counter()
from lambda_shim.tcpcomm import CommError, TcpComm  # noqa: E402

doomed = int(sys.argv[1]) if len(sys.argv) > 1 else -1
try:
    comm = TcpComm.from_env()
    wired = time.perf_counter() - t0
    comm.barrier()
    if comm.rank == doomed:
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-collective, without a word
    total = comm.allreduce(comm.rank)
    ranks = comm.gather(comm.rank)
    comm.barrier()
except CommError as exc:
    print(f"CommError: {exc}", flush=True)
    sys.exit(3)
if comm.rank == 0:
    assert total == comm.size * (comm.size - 1) // 2 and ranks == list(range(comm.size))
    print(f"size={comm.size} wireup_s={wired:.3f} total_s={time.perf_counter() - t0:.3f}", flush=True)
