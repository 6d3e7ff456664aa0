"""Bad arguments: the exception class and error class each rank sees (every rank makes the same
bad call, so every rank records what it raised), and that no message moved because of them."""

from __future__ import annotations

from typing import Any

import numpy as np
from harness import Suite


def run(s: Suite) -> None:
    MPI, comm, rank, size = s.MPI, s.comm, s.rank, s.size  # noqa: N806 - the name mpi4py programs use
    bad = size  # one past the last rank

    local = {
        "send.bad_rank": lambda: comm.send(1, dest=bad),
        "send.negative_rank": lambda: comm.send(1, dest=-5),
        "ssend.bad_rank": lambda: comm.ssend(1, dest=bad),
        "isend.bad_rank": lambda: comm.isend(1, dest=bad).wait(),
        "recv.bad_rank": lambda: comm.recv(source=bad),
        "irecv.bad_rank": lambda: comm.irecv(source=bad).wait(),
        "probe.bad_rank": lambda: comm.probe(source=bad),
        "iprobe.bad_rank": lambda: comm.iprobe(source=bad),
        "sendrecv.bad_dest": lambda: comm.sendrecv(1, dest=bad, source=MPI.PROC_NULL),
        "Send.bad_rank": lambda: comm.Send(np.zeros(2), dest=bad),
        "Isend.bad_rank": lambda: comm.Isend(np.zeros(2), dest=-5).Wait(),
        "Recv.bad_rank": lambda: comm.Recv(np.zeros(2), source=bad),
        "Irecv.bad_rank": lambda: comm.Irecv(np.zeros(2), source=bad).Wait(),
        "Sendrecv_replace.bad_rank": lambda: comm.Sendrecv_replace(np.zeros(2), dest=bad, source=MPI.PROC_NULL),
        "send.bad_tag": lambda: comm.send(1, dest=s.right, tag=-5),
        "recv.bad_tag": lambda: comm.recv(source=s.left, tag=-5),
        "isend.bad_tag": lambda: comm.isend(1, dest=s.right, tag=-3).wait(),
        "Send.bad_tag": lambda: comm.Send(np.zeros(2), dest=s.right, tag=-5),
        "Recv.bad_tag": lambda: comm.Recv(np.zeros(2), source=s.left, tag=-7),
        "bcast.bad_root": lambda: comm.bcast(1, root=bad),
        "bcast.negative_root": lambda: comm.bcast(1, root=-5),
        "bcast.proc_null_root": lambda: comm.bcast(1, root=MPI.PROC_NULL),
        "gather.bad_root": lambda: comm.gather(1, root=bad),
        "scatter.bad_root": lambda: comm.scatter(None, root=bad),
        "reduce.bad_root": lambda: comm.reduce(1, root=bad),
        "Bcast.bad_root": lambda: comm.Bcast(np.zeros(2), root=bad),
        "Reduce.bad_root": lambda: comm.Reduce(np.zeros(2), np.zeros(2), root=-5),
        "Gather.bad_root": lambda: comm.Gather(np.zeros(1), None, root=bad),
        "Gatherv.bad_root": lambda: comm.Gatherv(np.zeros(1), None, root=bad),
        "Scatter.bad_root": lambda: comm.Scatter(None, np.zeros(1), root=bad),
        "Scatterv.bad_root": lambda: comm.Scatterv(None, np.zeros(1), root=bad),
        "Allreduce.count_mismatch": lambda: comm.Allreduce(np.zeros(3), np.zeros(4)),
        "Allreduce.type_mismatch": lambda: comm.Allreduce(np.zeros(2), np.zeros(2, dtype=np.int64)),
        "Bcast.negative_count": lambda: comm.Bcast([np.zeros(4), -1]),
        "Alltoall.indivisible": lambda: comm.Alltoall(np.zeros(size + 1), np.zeros(size + 1)),
        "Allgatherv.counts_length": lambda: comm.Allgatherv(np.zeros(1), [np.zeros(size + 1), [1] * (size + 1)]),
        "Reduce_scatter.counts_length": lambda: comm.Reduce_scatter(np.zeros(size), np.zeros(1), [1] * (size + 1)),
        "Reduce_scatter_block.indivisible": lambda: comm.Reduce_scatter_block(np.zeros(size + 1), np.zeros(1)),
        "Allreduce.REPLACE": lambda: comm.Allreduce(np.zeros(2), np.zeros(2), op=MPI.REPLACE),
        "Reduce.NO_OP": lambda: comm.Reduce(np.zeros(2), np.zeros(2), op=MPI.NO_OP, root=0),
        "Scan.REPLACE": lambda: comm.Scan(np.zeros(2), np.zeros(2), op=MPI.REPLACE),
        "Exscan.NO_OP": lambda: comm.Exscan(np.zeros(2), np.zeros(2), op=MPI.NO_OP),
        "comm_null.used": lambda: MPI.COMM_NULL.Get_rank(),
        "send.unpicklable": lambda: comm.send(lambda: 0, dest=s.right),
        "send.str_rank": lambda: comm.send(1, dest=str(s.right)),
        "send.tag_overflow": lambda: comm.send(1, dest=s.right, tag=2**31),
        "send.tag_above_ub": lambda: comm.send(1, dest=s.right, tag=comm.Get_attr(MPI.TAG_UB) + 1),
        "Send.tag_overflow": lambda: comm.Send(np.zeros(2), dest=s.right, tag=2**31),
        "Send.tag_above_ub": lambda: comm.Send(np.zeros(2), dest=s.right, tag=comm.Get_attr(MPI.TAG_UB) + 1),
        "Isend.tag_above_ub": lambda: comm.Isend(np.zeros(2), dest=s.right, tag=comm.Get_attr(MPI.TAG_UB) + 1).Wait(),
        "Bcast.noncontiguous": lambda: comm.Bcast(np.zeros(6)[::2]),
        "Allreduce.LAND_float": lambda: comm.Allreduce(np.ones(2), np.zeros(2), op=MPI.LAND),
        "Allreduce.BXOR_float": lambda: comm.Allreduce(np.ones(2), np.zeros(2), op=MPI.BXOR),
        "Allreduce.MAXLOC_double": lambda: comm.Allreduce(np.ones(2), np.zeros(2), op=MPI.MAXLOC),
        "alltoall.wrong_length": lambda: comm.alltoall(list(range(size + 1))),
    }
    for key, call in local.items():
        s.case(key)(call)

    # Truncation: rank 0 sends 8 doubles to rank 1, which has room for 4.
    @s.case("Recv.truncate")
    def recv_truncate() -> Any:
        if rank == 0:
            return comm.Send(np.ones(8), dest=1, tag=1)
        return comm.Recv(np.zeros(4), source=0, tag=1) if rank == 1 else None

    @s.case("Irecv.truncate")
    def irecv_truncate() -> Any:
        if rank == 0:
            return comm.Send(np.ones(8), dest=1, tag=2)
        return comm.Irecv(np.zeros(4), source=0, tag=2).Wait() if rank == 1 else None

    @s.case("Waitall.truncate")
    def waitall_truncate() -> Any:
        if rank == 0:
            return comm.Send(np.ones(8), dest=1, tag=3)
        if rank != 1:
            return None
        statuses = [MPI.Status()]
        try:
            MPI.Request.Waitall([comm.Irecv(np.zeros(4), source=0, tag=3)], statuses)
        except MPI.Exception as error:
            return s.raised(error), MPI.Get_error_class(statuses[0].Get_error())
        return None

    @s.case("Sendrecv.truncate")
    def sendrecv_truncate() -> Any:
        return comm.Sendrecv(np.ones(3), dest=s.right, recvbuf=np.zeros(2), source=s.left)

    @s.case("freed_comm.used")
    def freed_comm_used() -> Any:
        d = comm.Dup()
        d.Free()
        return d.Get_size()

    @s.case("nothing_pending")
    def nothing_pending() -> Any:
        return comm.iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
