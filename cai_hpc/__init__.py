"""cai-hpc: AstroMAE redshift inference over HDF5 shards, on a laptop, under MPI, or on Lambda."""

__version__ = "0.1.0"
