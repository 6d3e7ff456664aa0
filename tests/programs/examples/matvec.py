"""A distributed matrix-vector product y = A x: each rank owns a block of rows of A and the same
block of x (blocks of unequal size); Allgatherv assembles the whole x on every rank, each rank
multiplies its rows, and Gatherv collects y on rank 0, which checks it against A @ x.
Written for mpi4py: mpiexec -n 4 python matvec.py"""

import numpy as np
from mpi4py import MPI

n = 10
comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

counts = [n // size + (1 if r < n % size else 0) for r in range(size)]
displs = [sum(counts[:r]) for r in range(size)]
rows = slice(displs[rank], displs[rank] + counts[rank])

A = np.add.outer(np.arange(n), 2 * np.arange(n)).astype(np.float64) % 7  # the same on every rank
x_local = np.arange(n, dtype=np.float64)[rows] - 3

x = np.empty(n)
comm.Allgatherv(x_local, [x, counts, displs, MPI.DOUBLE])
y_local = A[rows] @ x
print(f"rank {rank}: rows {rows.start}..{rows.stop - 1}, y_local {y_local.tolist()}")

y = np.empty(n) if rank == 0 else None
comm.Gatherv(y_local, [y, counts, displs, MPI.DOUBLE] if rank == 0 else None, root=0)
if rank == 0:
    print(f"y = {y.tolist()}")
    print(f"matches A @ x: {bool(np.array_equal(y, A @ x))}")
