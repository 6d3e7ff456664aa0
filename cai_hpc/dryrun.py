"""``infer --dry-run``: the plan of a run, described without running it or writing anything."""

from __future__ import annotations

from cai_hpc.embeddings import EMBEDDING_DIM
from cai_hpc.job import Job
from cai_hpc.plan import shard_owners
from cai_hpc.shards import SAMPLE_BYTES

# Peak RSS of one rank, from measurements with a checkpoint (issue 21, float32 on CPU): 730 MB
# at batch 128 and 1,065 MB at batch 1024, a line through both; plus what a rank holds per
# planned row until the end (prediction and label; the object id until its shard is written).
BASE_MB = 682.0
MB_PER_BATCH_ROW = 0.374
BYTES_PER_ROW = 16
# With --embeddings: each row's joint features (float32), held while its shard is under way
# and, for a split shard, until the shard's rows are gathered and written.
EMBEDDING_BYTES = 4 * EMBEDDING_DIM
# Samples/s of one float32 thread on the development machine (README, Performance: 690-880);
# `cai-hpc bench kernel` measures the rate of yours.
RATE_PER_THREAD = 700.0
SHOWN_RANKS = 32  # ranks listed one per line; beyond, only the spread


def describe(
    job: Job, threads: int, batch_size: int, planned: tuple[float, float], s3: bool, embeddings: bool = False
) -> str:
    """The plan, rank by rank: rows, shards (split ones apart), memory and time estimates;
    ``planned``: rank 0's wall and CPU seconds spent planning (apart, on a shared machine);
    ``embeddings``: the run also keeps each row's joint features until its shard is written."""
    size = len(job.plan)
    owners = shard_owners(job.plan)
    rows = [sum(p.rows for p in pieces) for pieces in job.plan]
    featured = [_featured_rows(job, rank, owners) if embeddings else 0 for rank in range(size)]
    largest = max((job.rows[i] for i in job.todo), default=0)
    lines = [
        f"plan: {sum(rows)} samples in {len(job.todo)} shard(s) to do ({len(job.done)} already done) on "
        f"{size} rank(s) x {threads} thread(s), batch {batch_size}; planned in {planned[0]:.2f} s on rank 0 "
        f"({planned[1]:.2f} s of its CPU)",
        f"{'rank':>6} {'rows':>10} {'shards':>7} {'split':>6} {'writes':>7} {'memory MB':>10} {'time s':>9}",
    ]
    for rank, pieces in enumerate(job.plan):
        if rank < SHOWN_RANKS or rank == size - 1:
            if rank == SHOWN_RANKS and size - 1 > SHOWN_RANKS:
                lines.append(f"{'...':>6}")
            split = sum(1 for p in pieces if p.rows < job.rows[p.shard])
            writes = sum(1 for p in pieces if owners[p.shard] == rank)
            memory = _memory_mb(rows[rank], batch_size, largest if s3 else 0, featured[rank])
            lines.append(
                f"{rank:>6} {rows[rank]:>10} {len(pieces):>7} {split:>6} {writes:>7} {memory:>10.0f} "
                f"{rows[rank] / (RATE_PER_THREAD * threads):>9.1f}"
            )
    wall = max(rows, default=0) / (RATE_PER_THREAD * threads)
    peak = max(
        (_memory_mb(n, batch_size, largest if s3 else 0, f) for n, f in zip(rows, featured, strict=True)), default=0
    )
    lines.append(
        f"estimates: peak memory {peak:.0f} MB per "
        f"rank (float32, CPU), inference about {wall:.0f} s at {RATE_PER_THREAD:.0f} samples/s per thread "
        "(measure yours with `cai-hpc bench kernel`); nothing was written"
    )
    return "\n".join(lines)


def _memory_mb(rows: int, batch_size: int, s3_shard_rows: int, featured_rows: int = 0) -> float:
    """A rank's peak RSS: model and batch, rows held, an S3 shard held whole in memory, and
    the rows whose joint features it holds at once."""
    held = rows * BYTES_PER_ROW + s3_shard_rows * SAMPLE_BYTES + featured_rows * EMBEDDING_BYTES
    return BASE_MB + MB_PER_BATCH_ROW * batch_size + held / 1e6


def _featured_rows(job: Job, rank: int, owners: dict[int, int]) -> int:
    """Rows whose joint features a rank holds at its peak with ``--embeddings``: its split
    pieces (kept until the gather), plus the larger of its largest whole shard (dropped once
    written, while streaming) and, at the gather, the split shards it owns, each received in
    parts and joined (twice its rows)."""
    pieces = job.plan[rank]
    split = [p for p in pieces if p.rows < job.rows[p.shard]]
    whole = max((p.rows for p in pieces if p.rows == job.rows[p.shard]), default=0)
    joined = sum(2 * job.rows[p.shard] - p.rows for p in split if owners[p.shard] == rank)
    return sum(p.rows for p in split) + max(whole, joined)
