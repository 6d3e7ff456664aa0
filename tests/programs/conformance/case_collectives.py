"""The object (pickle) collectives, on the first and the last rank as root."""

from __future__ import annotations

from typing import Any

import numpy as np
from harness import Suite


def run(s: Suite) -> None:
    MPI, comm, rank, size, last = s.MPI, s.comm, s.rank, s.size, s.last  # noqa: N806 - the name mpi4py programs use

    cases = {
        "barrier": lambda: comm.barrier(),
        "bcast.root0": lambda: comm.bcast({"a": [1, 2, 3]} if rank == 0 else None),
        "bcast.root_last": lambda: comm.bcast(("tuple", rank) if rank == last else None, root=last),
        "bcast.empty": lambda: comm.bcast([] if rank == 0 else None),
        "bcast.array": lambda: comm.bcast(np.arange(5, dtype=np.int16) if rank == 1 else None, root=1),
        "gather.root0": lambda: comm.gather(rank * 3),
        "gather.root_last": lambda: comm.gather({"r": rank}, root=last),
        "gather.empty_lists": lambda: comm.gather([], root=1),
        "scatter.root0": lambda: comm.scatter([i * i for i in range(size)] if rank == 0 else None),
        "scatter.root_last": lambda: comm.scatter([[i] * i for i in range(size)] if rank == last else None, root=last),
        "scatter.tuple": lambda: comm.scatter(tuple(str(i) for i in range(size)) if rank == 1 else None, root=1),
        "allgather": lambda: comm.allgather(str(rank)),
        "allgather.none": lambda: comm.allgather(None),
        "alltoall": lambda: comm.alltoall([(rank, dest) for dest in range(size)]),
        "alltoall.tuple": lambda: comm.alltoall(tuple(rank * 10 + dest for dest in range(size))),
        "reduce.default": lambda: comm.reduce(rank + 1),
        "reduce.root_last": lambda: comm.reduce(rank + 1, root=last),
        "allreduce.default": lambda: comm.allreduce(rank + 1),
        "allreduce.lists": lambda: comm.allreduce([rank]),  # SUM of lists concatenates, in rank order
        "allreduce.strings": lambda: comm.allreduce(str(rank)),
        "allreduce.array": lambda: comm.allreduce(np.arange(4) * rank),
        "allreduce.float": lambda: comm.allreduce(rank + 0.5, op=MPI.MAX),
        "scan.default": lambda: comm.scan(rank + 1),
        "scan.lists": lambda: comm.scan([rank]),
        "scan.array": lambda: comm.scan(np.full(2, rank + 1), op=MPI.PROD),
        "exscan.default": lambda: comm.exscan(rank + 1),
        "exscan.lists": lambda: comm.exscan([rank]),
        "exscan.max": lambda: comm.exscan(-rank, op=MPI.MAX),
    }
    for key, call in cases.items():
        s.case(key)(call)

    @s.case("keywords")
    def keywords() -> Any:
        got = [comm.bcast(obj=rank * 2, root=last), comm.gather(sendobj=rank, root=1)]
        got += [comm.scatter(sendobj=list(range(size)) if rank == 0 else None, root=0)]
        got += [comm.allgather(sendobj=-rank), comm.alltoall(sendobj=[rank] * size)]
        got += [comm.reduce(sendobj=rank, op=MPI.MAX, root=0), comm.allreduce(sendobj=rank, op=MPI.MIN)]
        got += [comm.scan(sendobj=rank, op=MPI.SUM), comm.exscan(sendobj=rank, op=MPI.SUM)]
        return got

    # A Python callable as the operator (mpi4py's object collectives take one), applied in rank order.
    concat = lambda a, b: a + b  # noqa: E731 - an operator given inline, as a user would
    s.case("allreduce.callable")(lambda: comm.allreduce(str(rank), op=concat))
    s.case("reduce.callable")(lambda: comm.reduce([rank], op=concat, root=last))
    s.case("scan.callable")(lambda: comm.scan((rank,), op=concat))
    s.case("exscan.callable")(lambda: comm.exscan(str(rank), op=concat))
