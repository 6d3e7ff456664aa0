"""mpi4py conformance: run every call and message-spec form of mpi4py's Comm, Request and
Status APIs and record, per rank, what each returned or raised (tests/test_conformance.py runs
it under mpiexec and under lambda_shim.launch and compares the records).

    suite.py {mpi|tcp} OUT_DIR

``mpi`` imports mpi4py's MPI, ``tcp`` lambda_shim's: the import line is the only difference."""

from __future__ import annotations

import sys
from pathlib import Path

import case_buffers
import case_collectives
import case_comms
import case_errors
import case_ops
import case_p2p
import case_requests
from harness import Suite

backend, out = sys.argv[1], Path(sys.argv[2])
if backend == "mpi":
    from mpi4py import MPI
else:
    from lambda_shim import MPI

suite = Suite(MPI, out)
for name, case in [
    ("p2p", case_p2p),
    ("requests", case_requests),
    ("collectives", case_collectives),
    ("ops", case_ops),
    ("buffers", case_buffers),
    ("comms", case_comms),
    ("errors", case_errors),
]:
    with suite.section(name):
        case.run(suite)
suite.close()
