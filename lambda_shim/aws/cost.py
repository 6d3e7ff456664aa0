"""What a cloud run costs: from the rank records after a run, or estimated before one.

List prices of us-east-1 (Lambda x86_64 and arm64 at the first duration tier, Step Functions
STANDARD, S3 Standard); check them against your region's price page before quoting a figure.
Since August 2025 Lambda also bills the init phase, so a cold start's init time is billed with
the invocation.
"""

from __future__ import annotations

import math
from typing import Any

# Lambda's price per GB-s by architecture: arm64 (Graviton) is 20 % cheaper.
LAMBDA_GB_S = {"x86_64": 0.0000166667, "arm64": 0.0000133334}
PRICES = {
    "lambda_gb_s": LAMBDA_GB_S["x86_64"],
    "lambda_request": 0.20 / 1e6,
    "state_transition": 0.025 / 1000,
    "s3_put_or_list": 0.005 / 1000,
    "s3_get": 0.0004 / 1000,
}
MB_PER_VCPU = 1769  # Lambda gives one vCPU per 1,769 MB of memory
MAX_VCPUS = 6
TRANSITIONS_PER_RANK = 2  # each child execution: enter and leave its one Task state
TRANSITIONS_PER_JOB = 3  # the parent: Ranks, Summarize, end


def vcpus(memory_mb: int) -> int:
    """The vCPUs Lambda gives a function of this memory size (at least one to compute with)."""
    return max(1, min(MAX_VCPUS, memory_mb // MB_PER_VCPU))


def job_cost(
    records: list[dict[str, Any]], summarize_s: float = 0.0, summarize_mb: int = 1024, architecture: str = "x86_64"
) -> dict[str, Any]:
    """The bill of a finished job from its rank records (billed ms are rounded up, as Lambda does)."""
    gb_s = sum(
        math.ceil(1000 * (r["duration_s"] + r.get("init_s", 0.0))) / 1000 * r["memory_mb"] / 1024 for r in records
    )
    gb_s += math.ceil(1000 * summarize_s) / 1000 * summarize_mb / 1024
    shards = sum(r.get("shards", 0) for r in records)
    return _bill(gb_s, len(records), shards, sum(1 for r in records if r.get("cold")), architecture)


def estimate_cost(
    rank_samples: list[int],
    shards: int,
    memory_mb: int,
    samples_per_s_per_vcpu: float,
    cold_start_s: float,
    architecture: str = "x86_64",
) -> dict:
    """The bill of a planned job of ``shards`` shards: every rank cold, computing at the given
    per-vCPU rate."""
    rate = samples_per_s_per_vcpu * vcpus(memory_mb)
    seconds = [cold_start_s + n / rate for n in rank_samples]
    gb_s = sum(seconds) * memory_mb / 1024
    bill = _bill(gb_s, len(rank_samples), shards, len(rank_samples), architecture)
    bill["estimated_wall_s"] = round(max(seconds, default=0.0), 1)
    return bill


def _bill(gb_s: float, ranks: int, shards: int, cold: int, architecture: str) -> dict[str, Any]:
    requests = ranks + 1  # every rank and Summarize
    transitions = TRANSITIONS_PER_RANK * ranks + TRANSITIONS_PER_JOB
    gets = 2 * shards + cold + ranks  # shard and, on a cold start, the model; the record check
    puts = shards + ranks + 2  # predictions, rank records, the items object and summary.json
    usd = {
        "lambda": gb_s * LAMBDA_GB_S[architecture],
        "requests": requests * PRICES["lambda_request"],
        "step_functions": transitions * PRICES["state_transition"],
        "s3": puts * PRICES["s3_put_or_list"] + gets * PRICES["s3_get"],
    }
    usd["total"] = sum(usd.values())
    return {
        "lambda_gb_s": round(gb_s, 3),
        "lambda_requests": requests,
        "state_transitions": transitions,
        "s3_requests": {"get": gets, "put": puts},
        "usd": {k: round(v, 6) for k, v in usd.items()},
        "architecture": architecture,
        "prices_usd": {**PRICES, "lambda_gb_s": LAMBDA_GB_S[architecture]},
    }
