"""Planning and bad input on real MPI ranks (``mpiexec -n 3 python -m pytest --with-mpi``, from
tests/test_input_io.py; a plain ``pytest`` run skips them)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from cai_hpc import predictions
from cai_hpc.engine import RunConfig, run
from cai_hpc.errors import InputError
from cai_hpc.job import planned_job
from cai_hpc.shards import scan_dataset
from cai_hpc.storage import Location
from cai_hpc.synth import synthesize
from tests.plans import WEIGHTS, planning_dataset, serial_job


@pytest.fixture(scope="module")
def world():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def shared_dir(world):
    """A directory every rank sees: made by rank 0, its name broadcast."""
    path = Path(tempfile.mkdtemp(prefix="cai-hpc-mpi-")) if world.rank == 0 else None
    path = world.bcast(path, root=0)
    yield path
    world.barrier()
    if world.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.mpi(min_size=2)
def test_distributed_planning_gives_the_serial_plan(world, shared_dir) -> None:
    data, out = planning_dataset(shared_dir) if world.rank == 0 else (None, None)
    data, out = world.bcast((data, out), root=0)
    for limit in (None, 1, 38, 60):
        for overwrite in (False, True):
            got = planned_job(world, Location(data), Location(out), WEIGHTS, limit, overwrite)
            assert got == serial_job(data, out, WEIGHTS, limit, overwrite, world.size), (limit, overwrite)


@pytest.mark.mpi(min_size=3)
def test_bad_rows_mid_stream_end_every_rank_at_the_next_agreement(world, shared_dir) -> None:
    if world.rank == 0:
        synthesize(shared_dir / "data", 301, 1.0, seed=5)
        # Global row 210 (shard 4, row 18) is read by the last of 3 ranks (rows 201-301).
        with h5py.File(shared_dir / "data" / "shard-00004.h5", "a") as f:
            f["images"][18, 0, 0, 0] = np.nan
    world.barrier()
    message = f"{shared_dir / 'data' / 'shard-00004.h5'}: dataset 'images' holds NaN or inf (first at row 18)"
    written = {}
    for agree_rows in (8, 1024):
        out = shared_dir / f"out-{agree_rows}"
        config = RunConfig(shared_dir / "data", out, batch_size=8, threads=1, progress=False, agree_rows=agree_rows)
        with pytest.raises(InputError) as caught:
            run(world, config)
        assert caught.value.agreed and str(caught.value) == message  # on every rank alike
        world.barrier()
        written[agree_rows] = sorted(p.name for p in (out / "predictions").iterdir())
        assert not (out / "summary.json").exists()
        shards = {s.name: s for s in scan_dataset(shared_dir / "data")}
        for name in written[agree_rows]:
            assert predictions.is_complete(Location(out), shards[name], shards[name].rows, "random-seed-0/fp32")
    if world.size == 3:
        # Agreeing after every batch, the others stop within a batch of the bad one, before
        # finishing a shard; agreeing every 128 batches, they finish their whole shards first.
        assert written == {8: [], 1024: ["shard-00000.h5", "shard-00001.h5", "shard-00003.h5"]}
