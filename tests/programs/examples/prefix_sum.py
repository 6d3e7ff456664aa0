"""A parallel sum and prefix sum: the numbers 1..N are split into contiguous blocks, one per
rank; scan gives each rank the running total up to its block, exscan where its block starts,
allreduce the grand total (checked against N(N+1)/2); Scan does the same on numpy arrays.
Written for mpi4py: mpiexec -n 4 python prefix_sum.py"""

import numpy as np
from mpi4py import MPI

N = 1000
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

lo = rank * N // size + 1
hi = (rank + 1) * N // size
local = sum(range(lo, hi + 1))
running = comm.scan(local, op=MPI.SUM)
before = comm.exscan(local, op=MPI.SUM)
total = comm.allreduce(local, op=MPI.SUM)
largest = comm.allreduce(hi - lo + 1, op=MPI.MAX)
print(f"rank {rank}: numbers {lo}..{hi}, local sum {local}, running sum {running}, before me {before}")
if rank == 0:
    print(f"total {total} (expected {N * (N + 1) // 2}), largest block {largest}")

counts = np.array([hi - lo + 1, local, 1], dtype=np.int64)
prefix = np.zeros_like(counts)
comm.Scan(counts, prefix, op=MPI.SUM)
print(f"rank {rank}: Scan of [count, sum, 1] = {prefix.tolist()}")
