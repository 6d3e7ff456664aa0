"""``infer --dry-run``: the plan of a run, described without running it or writing anything."""

from __future__ import annotations

from cai_hpc.job import Job
from cai_hpc.plan import shard_owners
from cai_hpc.shards import SAMPLE_BYTES

# Peak RSS of one rank, from measurements with a checkpoint (issue 21, float32 on CPU): 730 MB
# at batch 128 and 1,065 MB at batch 1024, a line through both; plus what a rank holds per
# planned row until the end (prediction and label; the object id until its shard is written).
BASE_MB = 682.0
MB_PER_BATCH_ROW = 0.374
BYTES_PER_ROW = 16
# Samples/s of one float32 thread on the development machine (README, Performance: 690-880);
# `cai-hpc bench kernel` measures the rate of yours.
RATE_PER_THREAD = 700.0
SHOWN_RANKS = 32  # ranks listed one per line; beyond, only the spread


def describe(job: Job, threads: int, batch_size: int, planned: tuple[float, float], s3: bool) -> str:
    """The plan, rank by rank: rows, shards (split ones apart), memory and time estimates;
    ``planned``: rank 0's wall and CPU seconds spent planning (apart, on a shared machine)."""
    size = len(job.plan)
    owners = shard_owners(job.plan)
    rows = [sum(p.rows for p in pieces) for pieces in job.plan]
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
            memory = _memory_mb(rows[rank], batch_size, largest if s3 else 0)
            lines.append(
                f"{rank:>6} {rows[rank]:>10} {len(pieces):>7} {split:>6} {writes:>7} {memory:>10.0f} "
                f"{rows[rank] / (RATE_PER_THREAD * threads):>9.1f}"
            )
    wall = max(rows, default=0) / (RATE_PER_THREAD * threads)
    lines.append(
        f"estimates: peak memory {_memory_mb(max(rows, default=0), batch_size, largest if s3 else 0):.0f} MB per "
        f"rank (float32, CPU), inference about {wall:.0f} s at {RATE_PER_THREAD:.0f} samples/s per thread "
        "(measure yours with `cai-hpc bench kernel`); nothing was written"
    )
    return "\n".join(lines)


def _memory_mb(rows: int, batch_size: int, s3_shard_rows: int) -> float:
    """A rank's peak RSS: model and batch, rows held, and an S3 shard held whole in memory."""
    held = rows * BYTES_PER_ROW + s3_shard_rows * SAMPLE_BYTES
    return BASE_MB + MB_PER_BATCH_ROW * batch_size + held / 1e6
