"""Rank 0 waits for a message rank 1 never sends (rank 1 just sleeps): with an operation
timeout, rank 0 must raise CommError instead of waiting."""

from __future__ import annotations

import sys
import time

from lambda_shim.tcpcomm import CommError, TcpComm

comm = TcpComm.from_env()
comm.barrier()
if comm.rank == 1:
    time.sleep(60)
    sys.exit(0)
try:
    comm.recv(source=1, tag=0)
except CommError as exc:
    print(f"CommError: {exc}", flush=True)
    sys.exit(3)
