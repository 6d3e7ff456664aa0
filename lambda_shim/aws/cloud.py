"""``cai-hpc cloud plan|run|status|fetch``: a job of Lambda ranks, driven from a laptop.

``plan`` lists the shards under an S3 prefix (every listing page) and gives each rank one or
several whole shards, in name order; the plan's items (one Lambda event per rank) go to S3 as
one JSON object that the state machine's Distributed Map reads, so no payload limit applies.
A communicator needs all its ranks alive at once, so a plan with more ranks than the
deployment runs concurrently (the Map's MaxConcurrency, the rank function's or the account's
Lambda concurrency) is refused rather than left to deadlock, and each rank waits for the others
only until the plan's connect deadline (``lambda_shim.aws.gang``). ``run`` starts the
execution and follows it; ``status`` reports one; ``fetch`` copies ``summary.json`` and the
predictions to a local directory.
``run --local`` does all of it on this machine (``lambda_shim.aws.local``).

With ``--stack NAME`` every fact of the deployment (state machine, bucket and run prefix,
rendezvous address, secret, MaxRanks, memory, architecture) comes from the CloudFormation
stack's outputs (``lambda_shim/aws/template.yaml``), and a plan whose data, model or output the
stack's roles may not reach is refused before anything is listed or written.

Credentials and region come from boto3's standard chain; the job's secret stays in Secrets
Manager, named in the events, never in them.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_hpc.errors import InputError
from cai_hpc.resources import DEFAULT_BATCH_SIZE
from cai_hpc.shards import SAMPLE_BYTES
from cai_hpc.storage import Location
from lambda_shim.aws import gang
from lambda_shim.aws.cost import estimate_cost, vcpus
from lambda_shim.aws.limits import check_rank_limits
from lambda_shim.aws.workflow import load_definition

DEFAULT_MAX_RANKS = 1000  # the template's MaxRanks, and Lambda's default account concurrency
DEFAULT_MEMORY_MB = 4096
# Per-vCPU samples/s for cost estimates: the float32 one-thread rate measured on the
# development machine (README, Performance); Lambda's vCPUs may differ.
DEFAULT_RATE = 270.0
COLD_START_S = 10.0  # imports, model download and first batch, for estimates


class JobFailedError(RuntimeError):
    """The execution ended without a summary; the message names the failing state and cause."""


@dataclass
class Plan:
    job: str
    data: Location
    out: Location
    events: list[dict[str, Any]]
    shard_bytes: list[int]  # per rank
    memory_mb: int
    connect_timeout_s: float  # how long a rank waits for the others (gang.connect_deadline_s)
    architecture: str = "x86_64"
    state_machine: str | None = None  # from the stack, when planned with one

    @property
    def world_size(self) -> int:
        return len(self.events)

    def estimate(self, rate: float = DEFAULT_RATE) -> dict[str, Any]:
        samples = [b // SAMPLE_BYTES for b in self.shard_bytes]
        shards = sum(len(e["shards"]) for e in self.events)
        return estimate_cost(samples, shards, self.memory_mb, rate, COLD_START_S, self.architecture)

    def describe(self, rate: float = DEFAULT_RATE) -> str:
        cost = self.estimate(rate)
        shards = [len(e["shards"]) for e in self.events]
        mb = sum(self.shard_bytes) / 1e6
        return "\n".join(
            [
                f"job {self.job}: {sum(shards)} shards ({mb:.1f} MB) under {self.data} -> {self.out}",
                f"{self.world_size} ranks, {min(shards)}-{max(shards)} shards each, "
                f"{self.memory_mb} MB ({vcpus(self.memory_mb)} vCPU, {self.architecture}) per function; every rank "
                f"must start within the {self.connect_timeout_s:.0f} s connect deadline or the job fails",
                f"estimate: ~{cost['estimated_wall_s']:.0f} s wall, {cost['lambda_gb_s']:.0f} GB-s, "
                f"${cost['usd']['total']:.4f} (Lambda ${cost['usd']['lambda']:.4f}, "
                f"Step Functions ${cost['usd']['step_functions']:.4f}, S3 ${cost['usd']['s3']:.5f}); "
                f"at {rate:.0f} samples/s per vCPU, {COLD_START_S:.0f} s cold start per rank",
            ]
        )


def list_shard_sizes(data: Location) -> list[tuple[Location, int]]:
    """Every ``.h5`` directly under the prefix (or directory) with its size, in name order."""
    if not data.s3 and not data.is_dir():
        raise InputError(f"{data}: no such dataset directory")
    found = data.list_sized(".h5")
    if not found:
        raise InputError(f"{data}: no .h5 shards here")
    return found


def assign(count: int, ranks: int | None, per_rank: int | None) -> list[range]:
    """Contiguous runs of shard indices, one per rank: ``per_rank`` shards each, or spread over
    ``ranks`` ranks as evenly as counts allow; by default one shard per rank."""
    if ranks is not None and per_rank is not None:
        raise InputError("give --ranks or --shards-per-rank, not both")
    if per_rank is not None:
        if per_rank < 1:
            raise InputError(f"--shards-per-rank must be at least 1, got {per_rank}")
        return [range(a, min(a + per_rank, count)) for a in range(0, count, per_rank)]
    ranks = count if ranks is None else ranks
    if not 1 <= ranks <= count:
        raise InputError(f"--ranks {ranks}: choose 1..{count} (one rank per shard at most: {count} shards)")
    base, extra = divmod(count, ranks)
    bounds = [0]
    for r in range(ranks):
        bounds.append(bounds[-1] + base + (r < extra))
    return [range(bounds[r], bounds[r + 1]) for r in range(ranks)]


def make_plan(
    data: str,
    out: str,
    *,
    model: str | None,
    rendezvous: str,
    token_secret: str,
    ranks: int | None = None,
    shards_per_rank: int | None = None,
    max_ranks: int = DEFAULT_MAX_RANKS,
    memory_mb: int = DEFAULT_MEMORY_MB,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
    precision: str = "fp32",
    connect: str = "auto",
    architecture: str = "x86_64",
    cold_start_s: float = gang.COLD_START_S,
    rate: float = DEFAULT_RATE,
) -> Plan:
    """Plan a job: which shards each rank reads, as the Lambda events the Map will send."""
    data_loc, out_loc = Location(data), Location(out)
    shards = list_shard_sizes(data_loc)
    groups = assign(len(shards), ranks, shards_per_rank)
    if len(groups) > max_ranks:
        raise InputError(
            f"the plan needs {len(groups)} ranks running at once but the deployment runs at most {max_ranks} "
            f"(MaxRanks: the Map's concurrency); every rank of a communicator must be alive together, so "
            f"use --ranks {max_ranks} or fewer, or --shards-per-rank {-(-len(shards) // max_ranks)}"
        )
    if not 128 <= memory_mb <= 10240:
        raise InputError(f"--memory-mb must be within Lambda's 128..10240, got {memory_mb}")
    sizes = [sum(shards[i][1] for i in group) for group in groups]
    check_rank_limits(sizes, [b // SAMPLE_BYTES for b in sizes], memory_mb, rate * vcpus(memory_mb), COLD_START_S)
    definition = load_definition({"RankFunctionArn": "rank", "SummarizeFunctionArn": "summarize"})
    deadline = gang.connect_deadline_s(len(groups), definition, cold_start_s)
    job = uuid.uuid4().hex
    events = [
        {
            "job": job,
            "rank": rank,
            "world_size": len(groups),
            "data": str(data_loc),
            "shards": [str(shards[i][0]) for i in group],
            "model": model,
            "out": str(out_loc),
            "rendezvous": rendezvous,
            "token_secret": token_secret,
            "batch_size": batch_size,
            "threads": threads,
            "precision": precision,
            "connect": connect,
            "connect_timeout_s": deadline,
        }
        for rank, group in enumerate(groups)
    ]
    return Plan(job, data_loc, out_loc, events, sizes, memory_mb, deadline, architecture)


# The template's outputs a run reads (lambda_shim/aws/template.yaml, Outputs).
STACK_OUTPUTS = (
    "StateMachineArn",
    "ResultsBucketName",
    "RunPrefix",
    "ReadOnlyBuckets",
    "RendezvousAddress",
    "TokenSecretArn",
    "MaxRanks",
    "MemorySize",
    "Architecture",
)


@dataclass(frozen=True)
class Deployment:
    """What a deployed stack offers a run: read from its outputs, never typed in again."""

    stack: str
    state_machine: str
    bucket: str
    run_prefix: str
    read_only_buckets: tuple[str, ...]
    rendezvous: str
    token_secret: str
    max_ranks: int
    memory_mb: int
    architecture: str

    def check_reach(self, data: str, out: str, model: str | None) -> None:
        """Refuse data or a model the ranks may not read, or an output they may not write."""
        readable = (self.bucket, *self.read_only_buckets)
        for what, uri in (("--data", data), ("--model", model)):
            if uri is not None and (not uri.startswith("s3://") or Location(uri).bucket not in readable):
                raise InputError(
                    f"{what} {uri}: stack {self.stack}'s functions read only s3://{' and s3://'.join(readable)} "
                    f"(upload it there, or redeploy with ReadOnlyBuckets naming its bucket)"
                )
        where = Location(out)
        if not (out.startswith("s3://") and where.bucket == self.bucket and where.key.startswith(self.run_prefix)):
            raise InputError(
                f"--out {out}: stack {self.stack}'s functions write only under s3://{self.bucket}/{self.run_prefix}"
            )


def read_stack(name: str) -> Deployment:
    """The deployment facts of a stack, from its outputs (one describe_stacks call)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        (stack,) = _client("cloudformation").describe_stacks(StackName=name)["Stacks"]
    except (BotoCoreError, ClientError) as exc:
        raise InputError(f"stack {name}: cannot read it: {exc}") from None
    if not stack["StackStatus"].endswith("_COMPLETE") or "ROLLBACK" in stack["StackStatus"]:
        raise InputError(f"stack {name} is {stack['StackStatus']}: deploy it (sam deploy) before a run")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    missing = [key for key in STACK_OUTPUTS if key not in outputs]
    if missing:
        raise InputError(f"stack {name} lacks the outputs {', '.join(missing)}: deploy lambda_shim/aws/template.yaml")
    if not outputs["RendezvousAddress"].rpartition(":")[2].isdigit():
        raise InputError(f"stack {name}: no rendezvous server (RendezvousAddress is {outputs['RendezvousAddress']!r})")
    return Deployment(
        stack=name,
        state_machine=outputs["StateMachineArn"],
        bucket=outputs["ResultsBucketName"],
        run_prefix=outputs["RunPrefix"],
        read_only_buckets=tuple(b for b in outputs["ReadOnlyBuckets"].split(",") if b not in ("", "-")),
        rendezvous=outputs["RendezvousAddress"],
        token_secret=outputs["TokenSecretArn"],
        max_ranks=int(outputs["MaxRanks"]),
        memory_mb=int(outputs["MemorySize"]),
        architecture=outputs["Architecture"],
    )


def job_prefix(plan: Plan) -> Location:
    return plan.out / "_job" / plan.job


def write_items(plan: Plan) -> Location:
    """The Map's items object: the rank events as one JSON array, in one PUT."""
    where = job_prefix(plan) / "items.json"
    where.write_bytes(json.dumps(plan.events).encode())
    return where


def execution_input(plan: Plan, items: Location) -> dict[str, Any]:
    results = job_prefix(plan) / "map-results"
    return {
        "job": plan.job,
        "items": {"bucket": items.bucket, "key": items.key},
        "world_size": plan.world_size,
        "out": str(plan.out),
        "results": {"bucket": results.bucket, "prefix": results.key},
        "memory_mb": plan.memory_mb,
    }


# ----------------------------------------------------------------------------- AWS side
def _client(service: str) -> Any:
    """A boto3 client, or one line saying what the standard chain lacks."""
    import boto3

    session = boto3.Session()
    if session.get_credentials() is None:
        raise InputError("no AWS credentials: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if session.region_name is None:
        raise InputError("no AWS region: set AWS_REGION or a profile's region")
    return session.client(service)


def start(plan: Plan, state_machine: str) -> str:
    """Write the items and start the execution; return its ARN."""
    from botocore.exceptions import BotoCoreError, ClientError

    model = plan.events[0]["model"]
    local = [str(where) for where in (plan.data, plan.out) if not where.s3]
    local += [model] if model is not None and not model.startswith("s3://") else []
    if local:
        raise InputError(f"Lambda functions read and write S3 only: {', '.join(local)} is not s3:// (or use --local)")
    check_concurrency(plan, state_machine)
    items = write_items(plan)
    try:
        reply = _client("stepfunctions").start_execution(
            stateMachineArn=state_machine, name=f"cai-hpc-{plan.job}", input=json.dumps(execution_input(plan, items))
        )
    except (BotoCoreError, ClientError) as exc:
        raise InputError(f"cannot start {state_machine}: {exc}") from None
    return reply["executionArn"]


def check_concurrency(plan: Plan, state_machine: str) -> None:
    """Refuse, before anything starts, a plan whose ranks the rank function cannot all run at once
    (the function named by the deployed state machine; its concurrency from Lambda)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        definition = json.loads(
            _client("stepfunctions").describe_state_machine(stateMachineArn=state_machine)["definition"]
        )
        concurrency = gang.read_concurrency(_client("lambda"), gang.rank_function(definition))
    except (BotoCoreError, ClientError) as exc:
        print(f"cai-hpc: warning: the rank function's concurrency is not checked: {exc}", file=sys.stderr)
        return
    gang.check_concurrency(plan.world_size, concurrency)


def status(execution: str) -> dict[str, Any]:
    """The execution's state and its ranks' counts (from the Distributed Map's run)."""
    from botocore.exceptions import BotoCoreError, ClientError

    sfn = _client("stepfunctions")
    try:
        described = sfn.describe_execution(executionArn=execution)
        runs = sfn.list_map_runs(executionArn=execution).get("mapRuns", [])
        counts = sfn.describe_map_run(mapRunArn=runs[0]["mapRunArn"])["itemCounts"] if runs else {}
    except (BotoCoreError, ClientError) as exc:
        raise InputError(f"cannot read {execution}: {exc}") from None
    return {
        "status": described["status"],
        "started": described["startDate"].timestamp(),
        "stopped": described["stopDate"].timestamp() if described.get("stopDate") else None,
        "ranks": counts,
        "error": described.get("error"),
        "cause": described.get("cause"),
    }


def progress_line(state: dict[str, Any], memory_mb: int | None = None, architecture: str = "x86_64") -> str:
    counts = state["ranks"]
    elapsed = (state["stopped"] or time.time()) - state["started"]
    line = (
        f"{state['status'].lower()}: ranks done {counts.get('succeeded', 0)}/{counts.get('total', '?')}, "
        f"running {counts.get('running', 0)}, failed {counts.get('failed', 0)}, {elapsed:.0f} s"
    )
    if memory_mb:
        from lambda_shim.aws.cost import LAMBDA_GB_S

        # Every rank started since the execution did, so this bounds the Lambda time so far.
        started = sum(counts.get(k, 0) for k in ("running", "succeeded", "failed", "timedOut", "aborted"))
        spent = started * elapsed * memory_mb / 1024 * LAMBDA_GB_S[architecture]
        line += f", at most ${spent:.4f} so far in Lambda time"
    return line


def follow(
    execution: str, memory_mb: int | None = None, every_s: float = 5.0, architecture: str = "x86_64"
) -> dict[str, Any]:
    """Print a progress line until the execution ends; return its last state."""
    while True:
        state = status(execution)
        print(f"\r{progress_line(state, memory_mb, architecture)}", end="", file=sys.stderr, flush=True)
        if state["status"] != "RUNNING":
            print(file=sys.stderr)
            return state
        time.sleep(every_s)


def fetch(out: str, to: Path, predictions: bool = True) -> dict[str, Any]:
    """Copy ``summary.json`` (and the predictions) of a run to a local directory; return the summary."""
    source = Location(out)
    summary_bytes = (source / "summary.json").read_bytes()
    to.mkdir(parents=True, exist_ok=True)
    if predictions:
        (to / "predictions").mkdir(exist_ok=True)
        for obj in (source / "predictions").list(".h5"):
            Location(to / "predictions" / obj.name).write_bytes(obj.read_bytes())
    Location(to / "summary.json").write_bytes(summary_bytes)
    return json.loads(summary_bytes)
