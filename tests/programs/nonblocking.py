"""mpi4py's nonblocking collectives on mpi4py (``mpi``) or on lambda_shim (``shim``: the same
program with only the import changed). Each rank writes ``case -> repr(outcome)`` as JSON to
OUT/rank<r>.json. Needs 3 or more ranks.

Usage: nonblocking.py {mpi|shim} OUT_DIR"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

if sys.argv[1] == "mpi":
    from mpi4py import MPI
else:
    from lambda_shim import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
got: dict[str, str] = {}


def case(name: str, call) -> None:
    try:
        value = call()
    except Exception as exc:  # noqa: BLE001 - what was raised is the outcome
        is_mpi = isinstance(exc, MPI.Exception)
        value = ("raised", type(exc).__name__, is_mpi, exc.Get_error_class() if is_mpi else None)
    got[name] = repr(value)


def nbx() -> list:
    """The NBX sparse exchange: synchronous sends to a few ranks, receive whatever arrives,
    and once this rank's sends are matched, join a nonblocking barrier; done when it is.
    Rank 0 sends nothing, so it joins the barrier at once and must go on receiving."""
    dests = [] if rank == 0 else [0, *range(rank + 1, size, 2)]
    sends = [comm.Issend(np.full(rank + 1, rank, dtype="i"), dest, tag=7) for dest in dests]
    if rank == size - 1:
        time.sleep(0.5)  # rank 0 is surely inside the barrier before this rank's message lands
    received, barrier, status = [], None, MPI.Status()
    deadline = time.monotonic() + 60
    while True:
        if time.monotonic() > deadline:  # an Ibarrier that blocked would leave us here for ever
            print(f"rank {rank}: NBX not done within 60 s", file=sys.stderr, flush=True)
            comm.Abort(3)
        if comm.iprobe(MPI.ANY_SOURCE, 7, status):
            buf = np.empty(status.Get_count(MPI.INT), dtype="i")
            comm.Recv(buf, status.Get_source(), 7)
            received.append((status.Get_source(), buf.tolist()))
        if barrier is None:
            if MPI.Request.Testall(sends):
                barrier = comm.Ibarrier()
        elif barrier.Test():
            return sorted(received)


def ibarrier_returns_before_the_others_arrive() -> tuple:
    """Rank 0's Ibarrier cannot complete while rank 1 sleeps; its first Test says so."""
    if rank == 1:
        time.sleep(0.5)
    request = comm.Ibarrier()
    first = request.Test()
    request.Wait()
    return (first if rank == 0 else None), bool(request)


def each_collective() -> dict:
    """Every I* call, all started before any is waited for, then completed by one Waitall."""
    i, d = MPI.INT, MPI.DOUBLE
    out = {
        "bcast": np.arange(4, dtype="i") if rank == 1 else np.zeros(4, dtype="i"),
        "gather": np.zeros(size * 2, dtype="i") if rank == 0 else None,
        "gatherv": np.zeros(sum(range(1, size + 1)), dtype="d"),
        "scatter": np.zeros(2, dtype="i"),
        "scatterv": np.zeros(rank + 1, dtype="d"),
        "allgather": np.zeros(size, dtype="i"),
        "allgatherv": np.zeros(sum(range(1, size + 1)), dtype="i"),
        "alltoall": np.zeros(size, dtype="i"),
        "alltoallv": np.zeros(size * (rank + 1), dtype="i"),
        "reduce": np.zeros(3, dtype="d"),
        "allreduce": np.zeros(3, dtype="i"),
        "allreduce_max": np.zeros(2, dtype="d"),
        "rsb": np.zeros(2, dtype="i"),
        "rs": np.zeros(rank + 1, dtype="i"),
        "scan": np.zeros(2, dtype="i"),
        "exscan": np.full(2, -1, dtype="i"),
        "inplace": np.full(2, rank + 1, dtype="i"),
    }
    counts = list(range(1, size + 1))
    displs = [sum(counts[:r]) for r in range(size)]
    v_counts = [rank + 1] * size  # alltoallv: rank r takes r+1 entries from each rank
    v_send = [r + 1 for r in range(size)]
    requests = [
        comm.Ibcast([out["bcast"], i], root=1),
        comm.Igather(np.full(2, rank, dtype="i"), out["gather"], root=0),
        comm.Igatherv(np.full(rank + 1, rank / 2), [out["gatherv"], (counts, displs), d], root=2),
        comm.Iscatter(np.arange(size * 2, dtype="i") * 10 if rank == 0 else None, out["scatter"], root=0),
        comm.Iscatterv(
            [np.arange(sum(counts), dtype="d"), (counts, displs), d] if rank == 1 else None, out["scatterv"], root=1
        ),
        comm.Iallgather(np.array([rank * rank], dtype="i"), out["allgather"]),
        comm.Iallgatherv(np.full(rank + 1, rank, dtype="i"), [out["allgatherv"], (counts, displs), i]),
        comm.Ialltoall(np.arange(size, dtype="i") + 100 * rank, out["alltoall"]),
        comm.Ialltoallv(
            [np.arange(sum(v_send), dtype="i") + 100 * rank, v_send, i],
            [out["alltoallv"], v_counts, i],
        ),
        comm.Ireduce(np.array([rank, 1.5, -rank]), out["reduce"], op=MPI.SUM, root=2),
        comm.Iallreduce(np.array([rank, 2, 3], dtype="i"), out["allreduce"], op=MPI.PROD),
        comm.Iallreduce(np.array([rank, -rank], dtype="d"), out["allreduce_max"], op=MPI.MAX),
        comm.Ireduce_scatter_block(np.arange(size * 2, dtype="i") + rank, out["rsb"]),
        comm.Ireduce_scatter(np.arange(sum(counts), dtype="i") * (rank + 1), out["rs"], counts),
        comm.Iscan(np.array([rank + 1, 2], dtype="i"), out["scan"], op=MPI.PROD),
        comm.Iexscan(np.array([rank + 1, 1], dtype="i"), out["exscan"]),
        comm.Iallreduce(MPI.IN_PLACE, out["inplace"]),
    ]
    statuses = [MPI.Status() for _ in requests]
    MPI.Request.Waitall(requests, statuses)
    got["status_errors"] = repr({s.Get_error() for s in statuses})  # MPICH leaves source and tag unset
    got["all_null"] = repr(all(r == MPI.REQUEST_NULL for r in requests))
    return {k: None if v is None else v.tolist() for k, v in out.items()}


def mixed_with_point_to_point() -> tuple:
    """An Ibcast and a ring Irecv/Isend in one Waitany loop."""
    data = np.array([7, 8], dtype="i") if rank == 0 else np.zeros(2, dtype="i")
    ring = np.zeros(1, dtype="i")
    requests = [
        comm.Ibcast(data, root=0),
        comm.Irecv(ring, (rank - 1) % size, tag=3),
        comm.Isend(np.array([rank], dtype="i"), (rank + 1) % size, tag=3),
    ]
    while MPI.Request.Waitany(requests) != MPI.UNDEFINED:
        pass
    return data.tolist(), ring.tolist()


def bad_arguments() -> tuple:
    """A bad root is refused by the call itself; the collectives after it still match."""
    outcomes = []
    for call in (
        lambda: comm.Ibcast(np.zeros(1, dtype="i"), root=size),
        lambda: comm.Ireduce(np.zeros(1, dtype="d"), np.zeros(1, dtype="d"), op=MPI.LAND),
        lambda: comm.Iallreduce(np.zeros(2, dtype="i"), np.zeros(3, dtype="i")),
    ):
        try:
            call()
            outcomes.append("returned")
        except Exception as exc:  # noqa: BLE001 - what was raised is the outcome
            is_mpi = isinstance(exc, MPI.Exception)
            outcomes.append((type(exc).__name__, exc.Get_error_class() if is_mpi else None))
    after = np.zeros(1, dtype="i")
    comm.Iallreduce(np.array([rank], dtype="i"), after).Wait()
    return outcomes, after.tolist()


def failure_raised_by_wait() -> tuple:
    """A broadcast larger than a non-root's buffer: the call returns, its Wait raises
    MPI.Exception (MPICH: ERR_OTHER, lambda_shim: ERR_TRUNCATE), and the next collective is right."""
    buf = np.arange(4, dtype="i") if rank == 0 else np.zeros(2, dtype="i")
    request = comm.Ibcast(buf, root=0)
    try:
        request.Wait()
        outcome = ("completed", buf.tolist())
    except MPI.Exception:
        outcome = ("Wait raised MPI.Exception", None)
    after = np.zeros(1, dtype="i")
    comm.Iallreduce(np.array([rank], dtype="i"), after).Wait()
    return outcome, after.tolist()


def persistent() -> tuple:
    """Send_init/Recv_init around the ring, started three times; what a finished persistent
    request is (inactive, not null), and a persistent PROC_NULL send."""
    out, into = np.zeros(2, dtype="i"), np.zeros(2, dtype="i")
    requests = [
        comm.Recv_init(into, (rank - 1) % size, tag=5),
        comm.Ssend_init(out, (rank + 1) % size, tag=5),
        comm.Send_init(out, MPI.PROC_NULL),
    ]
    seen, status = [], MPI.Status()
    for step in range(3):
        out[:] = [rank, step]
        MPI.Prequest.Startall(requests)
        requests[0].Wait(status)
        MPI.Request.Waitall(requests[1:])
        seen.append((into.tolist(), status.Get_source(), status.Get_tag(), status.Get_count(MPI.INT)))
    after = (bool(requests[0]), requests[0] == MPI.REQUEST_NULL, requests[0].Test())
    requests[0].Wait(status)
    inactive = (status.Get_source(), status.Get_tag())
    for request in requests:
        request.Free()
    return seen, after, inactive, [r == MPI.REQUEST_NULL for r in requests]


case("nbx", nbx)
case("ibarrier_returns_before_the_others_arrive", ibarrier_returns_before_the_others_arrive)
case("each_collective", each_collective)
case("mixed_with_point_to_point", mixed_with_point_to_point)
case("bad_arguments", bad_arguments)
case("failure_raised_by_wait", failure_raised_by_wait)
case("persistent", persistent)
comm.Barrier()
Path(sys.argv[2], f"rank{rank}.json").write_text(json.dumps(got, indent=1, sort_keys=True))
