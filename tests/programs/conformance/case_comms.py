"""Communicator management: Dup, Split, Free, Compare, COMM_SELF, COMM_NULL; every
communicator a message space of its own."""

from __future__ import annotations

from typing import Any

import numpy as np
from harness import Suite


def run(s: Suite) -> None:
    MPI, comm, rank, size = s.MPI, s.comm, s.rank, s.size  # noqa: N806 - the name mpi4py programs use

    @s.case("constants")
    def constants() -> Any:
        return MPI.ANY_SOURCE, MPI.ANY_TAG, MPI.PROC_NULL, MPI.UNDEFINED, MPI.SUCCESS

    @s.case("constants.compare")
    def constants_compare() -> Any:
        return MPI.IDENT, MPI.CONGRUENT, MPI.SIMILAR, MPI.UNEQUAL

    @s.case("world")
    def world() -> Any:
        w = MPI.COMM_WORLD
        return w.Get_rank(), w.Get_size(), w.rank, w.size, w == MPI.COMM_WORLD, w != MPI.COMM_NULL

    @s.case("self")
    def comm_self() -> Any:
        c = MPI.COMM_SELF
        return c.Get_rank(), c.Get_size(), c.allreduce(rank + 1), c.bcast("only"), c.gather(rank), c.alltoall([rank])

    @s.case("self.buffer")
    def comm_self_buffer() -> Any:
        recv = np.zeros(2)
        MPI.COMM_SELF.Allreduce(np.array([rank, 1.0]), recv, op=MPI.SUM)
        return recv

    @s.case("dup")
    def dup() -> Any:
        d = comm.Dup()
        got = d.Get_rank(), d.Get_size(), d.allgather(rank)
        d.Free()
        return got

    @s.case("compare")
    def compare() -> Any:
        d = comm.Dup()
        sub = comm.Split(rank % 2, -rank)
        got = [MPI.Comm.Compare(comm, comm), MPI.Comm.Compare(comm, d), MPI.Comm.Compare(comm, sub)]
        got += [comm.Compare(d), MPI.Comm.Compare(MPI.COMM_WORLD, MPI.COMM_WORLD)]
        sub.Free()
        d.Free()
        return got

    @s.case("clone")
    def clone() -> Any:
        c = comm.Clone()
        got = c.Get_rank(), c.Get_size(), c.allreduce(rank)
        c.Free()
        return got

    @s.case("dup.isolated")
    def dup_isolated() -> Any:
        # Same source, same tag on two communicators: each receive sees only its own.
        d = comm.Dup()
        d.send(("dup", rank), dest=s.right, tag=1)
        comm.send(("parent", rank), dest=s.right, tag=1)
        comm.Barrier()
        first = comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        second = d.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
        nothing = comm.iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG), d.iprobe()
        d.Free()
        return first, second, nothing

    @s.case("dup.collectives_isolated")
    def dup_collectives_isolated() -> Any:
        d = comm.Dup()
        req = d.irecv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)  # a collective on comm must not match it
        total = comm.allreduce(rank)
        got = comm.bcast("parent" if rank == 0 else None), d.bcast("dup" if rank == 0 else None)
        d.send("p2p", dest=s.left, tag=0)
        msg = req.wait()
        d.Free()
        return total, got, msg

    @s.case("dup.of_dup")
    def dup_of_dup() -> Any:
        d = comm.Dup()
        dd = d.Dup()
        got = dd.Get_rank(), dd.Get_size(), dd.allreduce(1)
        dd.Free()
        d.Free()
        return got

    @s.case("split.parity")
    def split_parity() -> Any:
        sub = comm.Split(rank % 2, -rank)  # keys reversed: the highest rank of a color is rank 0
        got = sub.Get_rank(), sub.Get_size(), sub.allgather(rank), sub.bcast(rank * 100)
        sub.Free()
        return got

    @s.case("split.p2p")
    def split_p2p() -> Any:
        sub = comm.Split(rank % 2, rank)
        me, n = sub.Get_rank(), sub.Get_size()
        status = MPI.Status()
        got = sub.sendrecv(("sub", rank), dest=(me + 1) % n, source=(me - 1) % n, status=status)
        buf = np.zeros(1, dtype=np.int32)
        sub.Allreduce(np.array([rank], dtype=np.int32), buf, op=MPI.SUM)
        sub.Free()
        return got, s.status(status), buf

    @s.case("split.isolated")
    def split_isolated() -> Any:
        # A message sent on the parent before the split is still there for the parent after it.
        comm.send(("before split", rank), dest=s.right, tag=2)
        sub = comm.Split(0, rank)
        sub.send(("on sub", rank), dest=(sub.Get_rank() + 1) % sub.Get_size(), tag=2)
        on_sub = sub.recv(source=MPI.ANY_SOURCE, tag=2)
        on_parent = comm.recv(source=MPI.ANY_SOURCE, tag=2)
        sub.Free()
        return on_sub, on_parent

    @s.case("split.keywords")
    def split_keywords() -> Any:
        sub = comm.Split(color=rank // 2, key=-rank)
        got = sub.Get_rank(), sub.Get_size(), sub.allgather(rank)
        sub.Free()
        default = comm.Split()
        got += (default.Get_rank(), default.Get_size())
        default.Free()
        return got

    @s.case("split.undefined")
    def split_undefined() -> Any:
        sub = comm.Split(MPI.UNDEFINED if rank == 0 else 1, 0)
        if rank == 0:
            return sub == MPI.COMM_NULL
        got = sub == MPI.COMM_NULL, sub.Get_size(), sub.Get_rank(), sub.allreduce(rank)
        sub.Free()
        return got

    @s.case("split.singletons")
    def split_singletons() -> Any:
        sub = comm.Split(rank, 0)
        got = sub.Get_size(), sub.Get_rank(), sub.allreduce(rank)
        sub.Free()
        return got

    @s.case("free")
    def free() -> Any:
        d = comm.Dup()
        d.Free()
        return d == MPI.COMM_NULL

    @s.case("size_rank_after_split_dup")
    def size_rank_after() -> Any:
        return comm.Get_rank(), comm.Get_size(), size
