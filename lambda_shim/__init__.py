"""The serverless side of cai-hpc: an mpi4py-compatible communicator over TCP (TcpComm), the
rendezvous server its ranks meet at, and a local launcher."""
