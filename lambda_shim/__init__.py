"""lambda_shim: mpi4py's communicator over TCP, for places without MPI (AWS Lambda first).

Two wings, kept apart:

- the communicator (this package's top level): ``MPI`` (mpi4py's names), ``tcpcomm`` (the
  communicator), ``wire`` (sealed frames), ``rendezvous`` (where ranks meet), ``launch`` (ranks
  on one machine) and ``bench``. It imports nothing from cai_hpc or from ``aws``.
- ``lambda_shim.aws``: what runs cai-hpc jobs on AWS Lambda (handler, plan, workflow, local
  emulation, Lambda Runtime API, sandbox, cost) and the deployment files.
"""
