"""What one Lambda rank can hold and how long it may run, checked when a job is planned.

A rank reads its shards from S3 into memory, so its shards' bytes plus the model's working
set must fit the function's memory; and an invocation ends at 900 s, so its estimated time
(cold start plus its samples at the assumed rate) must fit too. A plan that breaks either is
refused with the ``--ranks`` that would fit.
"""

from __future__ import annotations

import math

from cai_hpc.errors import InputError

LAMBDA_TIMEOUT_S = 900.0
# Peak RSS of one rank with the model loaded and running (torch, weights, kernels, batch 128,
# one thread): 921 MB measured with `cai-hpc infer --batch-size 128 --threads 1` on this
# project's development machine, rounded up for more threads and larger batches.
MODEL_WORKING_SET_MB = 1024


def check_rank_limits(
    shard_bytes: list[int],
    samples: list[int],
    memory_mb: int,
    samples_per_s: float,
    cold_start_s: float,
) -> None:
    """Refuse a plan whose busiest rank would not fit the function's memory or Lambda's 900 s.
    ``shard_bytes`` and ``samples`` are per rank; ``samples_per_s`` is one rank's rate."""
    room = (memory_mb - MODEL_WORKING_SET_MB) * 2**20
    heaviest = max(shard_bytes)
    if heaviest > room:
        ranks = math.ceil(sum(shard_bytes) / room) if room > 0 else None
        fix = f"use --ranks {ranks} or more, or more --memory-mb" if ranks else "use more --memory-mb"
        raise InputError(
            f"a rank would hold {heaviest / 2**20:.0f} MB of shards but a {memory_mb} MB function has "
            f"{max(room, 0) / 2**20:.0f} MB beside the model's working set ({MODEL_WORKING_SET_MB} MB): {fix}"
        )
    longest = cold_start_s + max(samples) / samples_per_s
    if longest > LAMBDA_TIMEOUT_S:
        per_rank = (LAMBDA_TIMEOUT_S - cold_start_s) * samples_per_s
        raise InputError(
            f"a rank would run ~{longest:.0f} s ({max(samples)} samples at {samples_per_s:.0f} samples/s plus a "
            f"{cold_start_s:.0f} s cold start) but Lambda stops a function at {LAMBDA_TIMEOUT_S:.0f} s: "
            f"use --ranks {math.ceil(sum(samples) / per_rank)} or more"
        )
