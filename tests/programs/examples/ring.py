"""A ring: every rank passes what it holds to its right-hand neighbour with isend/irecv, size - 1
times, so each rank sees every other rank's value once; then the same with numpy arrays and
Isend/Irecv/Waitall. Written for mpi4py: mpiexec -n 4 python ring.py"""

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
right, left = (rank + 1) % size, (rank - 1) % size

held = {"origin": rank, "word": f"w{rank}"}
seen = [held["origin"]]
for step in range(size - 1):
    incoming = comm.irecv(source=left, tag=step)
    outgoing = comm.isend(held, dest=right, tag=step)
    status = MPI.Status()
    held = incoming.wait(status)
    outgoing.wait()
    seen.append(held["origin"])
    print(f"rank {rank} step {step}: got {held['word']} from rank {status.Get_source()}")
print(f"rank {rank}: saw {sorted(seen)}, sum {sum(seen)}")

block = np.full(3, float(rank))
for _step in range(size - 1):
    received = np.empty_like(block)
    requests = [comm.Irecv(received, source=left, tag=99), comm.Isend(block, dest=right, tag=99)]
    MPI.Request.Waitall(requests)
    block = received + 0.5
print(f"rank {rank}: block after {size - 1} steps {block.tolist()}")
