"""Two ranks in a scripted situation, for the liveness and attack tests.
Usage: scenario.py NAME [SECONDS]; prints "ok ..." on success, "CommError: ..." (exit 3) on failure.

  wait    rank 1 sends "hello" after SECONDS, without any earlier contact; rank 0 waits for it
  stop    after a barrier rank 1 stops itself (SIGSTOP); rank 0 waits for a message from it
  stop-send  as stop, but rank 0 sends 200 MB to the stopped rank
  slow    after a barrier rank 1 works SECONDS before it answers (slower than the liveness deadline)
  marker  the ranks exchange a recognisable text (is it visible on the wire?)
"""

from __future__ import annotations

import os
import signal
import sys
import time

from lambda_shim.tcpcomm import CommError, TcpComm

name = sys.argv[1]
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
MARKER = "plaintext-marker-7f3a9c"
try:
    comm = TcpComm.from_env()
    if name == "wait":
        if comm.rank == 1:
            time.sleep(seconds)
            comm.send("hello", dest=0)
        else:
            print(f"ok {comm.recv(source=1)}", flush=True)
    elif name in ("stop", "stop-send"):
        comm.barrier()
        if comm.rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        elif name == "stop":
            comm.recv(source=1)
        else:
            comm.send(bytes(200 * 2**20), dest=1)
            comm.recv(source=1)
    elif name == "slow":
        comm.barrier()
        if comm.rank == 1:
            time.sleep(seconds)  # alive: its heartbeats still go out
            comm.send("done", dest=0)
        else:
            print(f"ok {comm.recv(source=1)}", flush=True)
        comm.barrier()
    elif name == "marker":
        got = comm.allgather(f"{MARKER} from {comm.rank}")
        comm.barrier()
        print(f"ok {len(got)}", flush=True)
    comm.close()
except CommError as exc:
    print(f"CommError: {exc}", flush=True)
    sys.exit(3)
