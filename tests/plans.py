"""A dataset to plan (uneven shards, some finished by an earlier run) and the plan a single
process makes of it the straightforward way: the reference for the distributed planning."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cai_hpc import predictions
from cai_hpc.job import Job
from cai_hpc.plan import Piece, plan_pieces
from cai_hpc.shards import Columns, ShardInfo, ShardReader, scan_dataset, write_shard
from cai_hpc.storage import Location
from cai_hpc.synth import synthesize

WEIGHTS = "random-seed-0/fp32"


def planning_dataset(root: Path) -> tuple[Path, Path]:
    """30 shards of 4 rows and two odd ones (7 rows unlabelled, 1 row), with predictions of an
    earlier run: three shards finished, one with other weights, one with only 2 of 4 rows (done
    when a limit of 38 cuts it there)."""
    data, out = root / "data", root / "out"
    synthesize(data, 120, 0.1, seed=3)
    with ShardReader(scan_dataset(data)[0]) as r:
        cols = r.read(0, 4)
    seven = Columns(np.repeat(cols.images, 2, 0)[:7], np.repeat(cols.magnitudes, 2, 0)[:7], None, None)
    write_shard(data / "shard-00010x.h5", seven)
    write_shard(data / "shard-00020x.h5", Columns(cols.images[:1], cols.magnitudes[:1], None, cols.object_id[:1]))
    shards = scan_dataset(data)
    (out / "predictions").mkdir(parents=True)
    earlier = [(0, 4, WEIGHTS), (1, 4, WEIGHTS), (11, 7, WEIGHTS), (5, 4, "sha256:other/fp32"), (9, 2, WEIGHTS)]
    for i, rows, weights in earlier:
        stamp = {"checkpoint": "test", "weights": weights}
        write_finished(out, shards[i], rows, stamp)
    return data, out


def write_finished(out: Path, shard: ShardInfo, rows: int, stamp: dict, embeddings: np.ndarray | None = None) -> None:
    """Predictions of ``shard``'s first ``rows`` rows as a run writes them, with the ids and
    labels it copies from the shard (what tells a finished shard from a namesake's)."""
    with ShardReader(shard) as reader:
        cols = reader.read(0, rows, images=False)
    carried = {name: getattr(cols, name) for name in predictions.CARRIED if getattr(cols, name) is not None}
    predictions.write_predictions(Location(out), shard, np.zeros(rows, np.float32), stamp, carried, embeddings)


def serial_job(data: Path, out: Path, weights: str, limit: int | None, overwrite: bool, size: int) -> Job:
    """Every header checked, the limit applied, finished shards found, rows split: one process."""
    shards = scan_dataset(data)
    rows = [s.rows for s in shards]
    if limit is not None:
        left = limit
        for i, n in enumerate(rows):
            rows[i] = min(n, left)
            left -= rows[i]
        keep = [i for i, n in enumerate(rows) if n > 0]
        shards, rows = [shards[i] for i in keep], [rows[i] for i in keep]
    done = [
        i
        for i, shard in enumerate(shards)
        if not overwrite and predictions.is_complete(Location(out), shard, rows[i], weights)
    ]
    todo = [i for i in range(len(shards)) if i not in done]
    pieces = plan_pieces([rows[i] for i in todo], size)
    plan = [[Piece(todo[p.shard], p.start, p.stop) for p in mine] for mine in pieces]
    return Job(shards, rows, done, weights, plan, [done[rank::size] for rank in range(size)])
