"""What the ranks agree on before reading: every shard of the run and the rows used of each,
which shards an earlier run finished, and each rank's pieces.

Planning is spread over the ranks. Rank 0 lists the dataset once and broadcasts the names;
every rank checks the headers of its own contiguous block of shards, then whether an earlier
run finished them; each finding is allgathered, so every rank derives the same plan from the
same facts. No rank checks 40,000 headers alone, and no plan is broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cai_hpc import predictions
from cai_hpc.agree import decided_by_root, gathered
from cai_hpc.errors import InputError
from cai_hpc.plan import Piece, plan_pieces, rank_bounds
from cai_hpc.shards import ShardInfo, inspect_shard, list_shards
from cai_hpc.storage import Location


@dataclass
class Job:
    """What the ranks agreed on: every shard of the run and the rows to use of each, which
    an earlier run finished, and each rank's pieces (``Piece.shard`` indexes ``shards``)."""

    shards: list[ShardInfo]
    rows: list[int]
    done: list[int]
    weights: str
    plan: list[list[Piece]]
    rereads: list[list[int]]  # per rank: finished shards whose predictions it reads for metrics

    @property
    def todo(self) -> list[int]:
        return sorted({p.shard for pieces in self.plan for p in pieces})


def planned_job(
    comm: Any,
    data: Location,
    out: Location,
    weights: str,
    limit: int | None,
    overwrite: bool,
    embeddings: bool = False,
) -> Job:
    """Check the dataset's headers, apply ``limit``, find the shards an earlier run finished
    with ``weights`` (and their embeddings, when asked for), and split the rest into balanced
    runs of rows, one per rank."""
    rank, size = comm.Get_rank(), comm.Get_size()
    names = decided_by_root(comm, lambda: [where.name for where in list_shards(data)])
    lo, hi = rank_bounds(len(names), size, rank)
    headers = gathered(comm, lambda: [_header(inspect_shard(data / name)) for name in names[lo:hi]])
    shards = [ShardInfo(data / name, *facts) for name, facts in zip(names, _joined(headers), strict=True)]
    rows = [s.rows for s in shards]
    if limit is not None:
        left = limit
        for i, n in enumerate(rows):
            rows[i] = min(n, left)
            left -= rows[i]
        keep = [i for i, n in enumerate(rows) if n > 0]
        shards, rows = [shards[i] for i in keep], [rows[i] for i in keep]

    lo, hi = rank_bounds(len(shards), size, rank)
    finished = gathered(
        comm,
        lambda: [
            not overwrite and predictions.is_complete(out, shard, n, weights, embeddings)
            for shard, n in zip(shards[lo:hi], rows[lo:hi], strict=True)
        ],
    )
    done = [i for i, flag in enumerate(_joined(finished)) if flag]
    finished_set = set(done)
    todo = [i for i in range(len(shards)) if i not in finished_set]
    plan = [
        [Piece(todo[p.shard], p.start, p.stop) for p in pieces] for pieces in plan_pieces([rows[i] for i in todo], size)
    ]
    return Job(shards, rows, done, weights, plan, [done[r::size] for r in range(size)])


def assigned_job(
    comm: Any, mine: list[str], out: Location, weights: str, overwrite: bool, embeddings: bool = False
) -> Job:
    """Every rank checks the whole shards it was handed (``mine``) and whether an earlier run
    finished them (with their embeddings, when asked for); the ranks then share what they
    found. Nothing here grows with the world size on one rank but the small allgather, so a
    thousand functions start as fast as one."""

    def check_mine() -> list[tuple[ShardInfo, bool]]:
        infos = [inspect_shard(where) for where in mine]
        return [(i, not overwrite and predictions.is_complete(out, i, i.rows, weights, embeddings)) for i in infos]

    everyone = gathered(comm, check_mine)
    names = [info.name for theirs in everyone for info, _ in theirs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"shards handed to more than one rank: {', '.join(twice[:5])}", agreed=True)
    shards, done, plan, rereads = [], [], [], []
    for theirs in everyone:
        plan.append([])
        rereads.append([])
        for info, finished in theirs:
            index = len(shards)
            shards.append(info)
            if finished:
                done.append(index)
                rereads[-1].append(index)
            else:
                plan[-1].append(Piece(index, 0, info.rows))
    return Job(shards, [s.rows for s in shards], done, weights, plan, rereads)


def _header(info: ShardInfo) -> tuple[int, bool, bool, int]:
    """A checked header as it travels between ranks: the fields of ShardInfo after ``path``."""
    return info.rows, info.labelled, info.has_object_id, info.version


def _joined(blocks: list[list[Any]]) -> list[Any]:
    return [item for block in blocks for item in block]
