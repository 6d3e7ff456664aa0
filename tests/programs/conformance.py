"""Run every supported communicator call and record what each rank got, for comparing
mpi4py's COMM_WORLD with TcpComm. Usage: conformance.py {mpi|tcp} OUT_DIR"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

backend, out = sys.argv[1], Path(sys.argv[2])
if backend == "mpi":
    from mpi4py import MPI

    comm, ops, ANY_SOURCE, ANY_TAG, Status = MPI.COMM_WORLD, MPI, MPI.ANY_SOURCE, MPI.ANY_TAG, MPI.Status
else:
    from cai_hpc import comm as ops
    from cai_hpc.comm import ANY_SOURCE, ANY_TAG, Status
    from lambda_shim.tcpcomm import TcpComm

    comm = TcpComm.from_env()

rank, size = comm.Get_rank(), comm.Get_size()
last = size - 1
got: dict[str, object] = {"rank": rank, "size": size, "attrs": (comm.rank, comm.size)}

got["bcast_root0"] = comm.bcast({"a": [1, 2, 3]} if rank == 0 else None)
got["bcast_root_last"] = comm.bcast(("tuple", rank) if rank == last else None, root=last)
got["bcast_empty"] = comm.bcast([] if rank == 0 else None)
got["gather_root0"] = comm.gather(rank * 3)
got["gather_root_last"] = comm.gather({"r": rank}, root=last)
got["gather_empty_lists"] = comm.gather([], root=1 % size)
got["allgather"] = comm.allgather(str(rank))
got["scatter_root0"] = comm.scatter([i * i for i in range(size)] if rank == 0 else None)
got["scatter_root_last"] = comm.scatter([[i] * i for i in range(size)] if rank == last else None, root=last)
for op in ("SUM", "MAX", "MIN", "PROD"):
    got[f"reduce_{op}"] = comm.reduce(rank + 1, op=getattr(ops, op), root=last)
    got[f"allreduce_{op}"] = comm.allreduce(rank + 1, op=getattr(ops, op))
got["allreduce_lists"] = comm.allreduce([rank])  # SUM of lists concatenates, in rank order
got["allreduce_array"] = comm.allreduce(np.arange(4) * rank).tolist()
comm.barrier()

# Point to point: tags out of order, ANY_SOURCE / ANY_TAG with a status.
if rank == 0:
    for dest in range(1, size):
        comm.send(f"tag7-to-{dest}", dest=dest, tag=7)
        comm.send(f"tag3-to-{dest}", dest=dest, tag=3)
    seen = []
    for _ in range(1, size):
        status = Status()
        msg = comm.recv(source=ANY_SOURCE, tag=ANY_TAG, status=status)
        seen.append((status.Get_source(), status.Get_tag(), msg))
    got["any_source"] = sorted(seen)
else:
    got["tag3_first"] = comm.recv(source=0, tag=3)
    got["tag7_second"] = comm.recv(source=0, tag=7)
    comm.send(("hello", rank), dest=0, tag=10 + rank)

# Large object (100 MB) from the last rank to rank 0.
if rank == last and size > 1:
    comm.send(np.full(100 * 2**20 // 8, 3.5), dest=0, tag=99)
if rank == 0 and size > 1:
    big = comm.recv(source=last, tag=99)
    got["big"] = (big.nbytes, float(big.sum()))

# Buffer forms on numpy arrays.
buf = np.arange(6, dtype=np.float64) if rank == last else np.zeros(6)
comm.Bcast(buf, root=last)
got["Bcast"] = buf.tolist()
result = np.zeros(3, dtype=np.int64)
comm.Allreduce(np.array([rank, 1, -rank], dtype=np.int64), result, op=ops.SUM)
got["Allreduce_SUM"] = result.tolist()
comm.Allreduce(np.array([rank, -rank], dtype=np.float64), res := np.zeros(2), op=ops.MAX)
got["Allreduce_MAX"] = res.tolist()
red = np.zeros(2)
comm.Reduce(np.array([1.0, rank]), red, op=ops.SUM, root=last)
got["Reduce_root_last"] = red.tolist() if rank == last else None
counts = [r + 1 for r in range(size)]
displs = [sum(counts[:r]) for r in range(size)]
gv = np.zeros(sum(counts), dtype=np.float32)
comm.Gatherv(
    np.full(rank + 1, rank, dtype=np.float32),
    [gv, counts, displs, None] if backend == "tcp" else [gv, counts, displs, MPI.FLOAT],
    root=0,
)
got["Gatherv"] = gv.tolist() if rank == 0 else None
comm.barrier()

out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.pkl").write_bytes(pickle.dumps(got))
