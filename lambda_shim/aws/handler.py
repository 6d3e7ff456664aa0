"""The Lambda functions: ``handler`` runs one rank of a job, ``summarize`` closes the job.

A rank's event (one item of the Step Functions Distributed Map, written by ``cai-hpc cloud``)::

    {"job": "9f0c...", "rank": 3, "world_size": 8,
     "data": "s3://bucket/survey/", "shards": ["s3://bucket/survey/shard-00003.h5"],
     "model": "s3://bucket/models/astromae.safetensors",      # or null: seeded random weights
     "out": "s3://bucket/runs/r1/",
     "token_secret": "cai-hpc/rendezvous",                    # Secrets Manager secret name
     "batch_size": 128, "threads": null, "precision": "fp32"}

Every field is checked (types, ranges, the job id's form, shards under ``data``, ``out`` and
``data`` under the function's ``$CAI_HPC_OUT_PREFIX`` / ``$CAI_HPC_DATA_PREFIX`` when set,
finite timeouts); a bad one fails in one line. The function joins the job's communicator
through the rendezvous server named by its own configuration (``$CAI_HPC_RENDEZVOUS``: an
event may repeat it but cannot change it; its key is derived from the secret, which never
appears in the event or the logs), then runs the same
``cai_hpc.engine.run`` as a laptop or an MPI rank: shards are read from S3 into memory, each
shard's predictions go back as one PUT, and rank 0 writes ``summary.json``. Finally the rank
PUTs its record (``OUT/ranks/rank-NNNNN.json``: billed time, memory, cold start); a retried
invocation that finds its record returns it and does nothing else.

Importing this module is cheap (Lambda gives an init phase 10 s); torch, the model and the
communicator are loaded inside the first invocation, timed, and reported as its cold start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import sys
import time
from dataclasses import MISSING, dataclass, fields
from functools import cache
from typing import Any

from cai_hpc.resources import DEFAULT_BATCH_SIZE

LOADED_AT = time.time()
MODEL_CACHE = "/tmp/cai-hpc-models"  # survives between warm invocations of one sandbox
_invocations = 0
log = logging.getLogger("lambda_shim")


class RankFailedError(RuntimeError):
    """One line naming the rank and what went wrong; Lambda reports it as the error."""


RENDEZVOUS_ENV = "CAI_HPC_RENDEZVOUS"  # host:port, from the function's configuration
DATA_PREFIX_ENV = "CAI_HPC_DATA_PREFIX"  # optional: every data/shard URI must be under it
OUT_PREFIX_ENV = "CAI_HPC_OUT_PREFIX"  # optional: every out URI must be under it
LAMBDA_MAX_S = 900.0
_SECRET_NAME = re.compile(r"[A-Za-z0-9/_+=.@:-]{1,2048}")  # a name, or an ARN (the stack passes its ARN)


@dataclass(frozen=True)
class RankEvent:
    job: str
    rank: int
    world_size: int
    data: str
    shards: list[str]
    out: str
    token_secret: str
    rendezvous: str | None = None  # if given, it must be the configured address
    model: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: int | None = None
    precision: str = "fp32"
    seed: int = 0
    connect: str = "auto"
    connect_timeout_s: float = 120.0
    op_timeout_s: float = LAMBDA_MAX_S  # finite: no wait outlives the invocation
    liveness_s: float = 60.0

    @classmethod
    def parse(cls, event: Any, environ: dict[str, str] | None = None) -> RankEvent:
        """Check the event field by field, so a malformed one fails in one clear line. The
        rendezvous address comes from the function's configuration (``$CAI_HPC_RENDEZVOUS``),
        never from the event alone."""
        from lambda_shim.tcpcomm import MAX_WORLD, MODES
        from lambda_shim.wire import valid_job_id

        env = os.environ if environ is None else environ
        if not isinstance(event, dict):
            raise ValueError(f"the event must be a JSON object, got {type(event).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(event) - set(known))
        if unknown:
            raise ValueError(f"unknown event field(s): {', '.join(map(str, unknown))[:200]}")
        missing = [n for n, f in known.items() if f.default is MISSING and n not in event]
        if missing:
            raise ValueError(f"event field(s) missing: {', '.join(missing)}")
        ev = cls(**event)

        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"event: {name} must be {rule}, got {getattr(ev, name)!r}"[:300])

        if not valid_job_id(ev.job):
            raise bad("job", "1-64 letters, digits, '.', '_' or '-'")
        if not _int(ev.world_size, 1, MAX_WORLD):
            raise bad("world_size", f"an integer in 1..{MAX_WORLD}")
        if not _int(ev.rank, 0, ev.world_size - 1):
            raise bad("rank", f"an integer in 0..{ev.world_size - 1}")
        if not _s3_uri(ev.data) or not _under(ev.data, env.get(DATA_PREFIX_ENV)):
            raise bad(
                "data", "an s3:// prefix" + (f" under {env[DATA_PREFIX_ENV]}" if env.get(DATA_PREFIX_ENV) else "")
            )
        if not isinstance(ev.shards, list) or not all(_s3_uri(u) and _under(u, ev.data) for u in ev.shards):
            raise bad("shards", f"a list of s3:// URIs under data ({ev.data})")
        if not _s3_uri(ev.out) or not _under(ev.out, env.get(OUT_PREFIX_ENV)):
            raise bad("out", "an s3:// prefix" + (f" under {env[OUT_PREFIX_ENV]}" if env.get(OUT_PREFIX_ENV) else ""))
        if ev.model is not None and not _s3_uri(ev.model):
            raise bad("model", "an s3:// URI or null")
        if not isinstance(ev.token_secret, str) or not _SECRET_NAME.fullmatch(ev.token_secret):
            raise bad("token_secret", "a Secrets Manager secret name or ARN")
        if not _int(ev.batch_size, 1, 1 << 16):
            raise bad("batch_size", "an integer in 1..65536")
        if ev.threads is not None and not _int(ev.threads, 1, 1024):
            raise bad("threads", "null or an integer in 1..1024")
        if ev.precision not in ("fp32", "bf16"):
            raise bad("precision", "fp32 or bf16")
        if not _int(ev.seed, 0, 2**63 - 1):
            raise bad("seed", "a non-negative integer")
        if ev.connect not in MODES:
            raise bad("connect", f"one of {', '.join(MODES)}")
        for name in ("connect_timeout_s", "op_timeout_s", "liveness_s"):
            if not _seconds(getattr(ev, name)):
                raise bad(name, f"a number of seconds in (0, {LAMBDA_MAX_S:g}]")
        configured = env.get(RENDEZVOUS_ENV, "").strip()
        if not configured:
            raise ValueError(
                f"the function's configuration has no {RENDEZVOUS_ENV} (host:port of the rendezvous server)"
            )
        if ev.rendezvous is not None and ev.rendezvous != configured:
            raise bad("rendezvous", f"absent or the configured {configured}")
        return ev


def _int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high  # bool is not an int here


def _seconds(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and 0 < value <= LAMBDA_MAX_S


def _s3_uri(uri: Any) -> bool:
    """``s3://bucket/key...`` without empty, ``.`` or ``..`` segments in the key."""
    if not isinstance(uri, str) or not uri.startswith("s3://") or len(uri) > 1024:
        return False
    bucket, _, key = uri[5:].partition("/")
    parts = key.rstrip("/").split("/") if key else []
    return bool(bucket) and all(p not in ("", ".", "..") for p in parts) and uri.isprintable()


def _under(uri: str, prefix: str | None) -> bool:
    if not prefix:
        return True
    prefix = prefix.rstrip("/") + "/"
    return uri.startswith(prefix) and len(uri) > len(prefix)


def handler(event: Any, context: Any) -> dict[str, Any]:
    """Run one rank; return its record (also stored at ``OUT/ranks/rank-NNNNN.json``)."""
    global _invocations
    started = time.time()
    _invocations += 1
    cold = _invocations == 1
    rank = event.get("rank", "?") if isinstance(event, dict) else "?"
    try:
        ev = RankEvent.parse(event)
        from cai_hpc import storage
        from cai_hpc.records import write_json_atomic

        where = storage.Location(ev.out) / "ranks" / f"rank-{ev.rank:05d}.json"
        if where.exists() and (previous := json.loads(where.read_bytes())).get("job") == ev.job:
            log.info("rank %d of job %s already finished: returning its record", ev.rank, ev.job)
            return previous
        # A cold start counts the sandbox's init (process start to this module loaded) but not
        # the time the sandbox then sat waiting for its first event.
        init_s = LOADED_AT - _process_start() if cold else 0.0
        record = _run_rank(ev, context, started=started - init_s)
        record["cold"] = cold
        record["init_s"] = round(init_s, 3)
        record["duration_s"] = round(time.time() - started, 3)
        write_json_atomic(where, record)
        return record
    except Exception as exc:  # one line for the Step Functions history and the logs
        message = _one_line(exc)
        prefix = f"rank {rank}: "
        raise RankFailedError(message if message.startswith(prefix) else prefix + message) from exc
    finally:
        if "cai_hpc.storage" in sys.modules:
            sys.modules["cai_hpc.storage"].forget()


def _run_rank(ev: RankEvent, context: Any, started: float | None) -> dict[str, Any]:
    t0 = time.time()
    from cai_hpc.engine import RunConfig, run
    from lambda_shim.tcpcomm import ShimConfig, TcpComm, parse_address
    from lambda_shim.wire import job_key

    imports_s = time.time() - t0
    checkpoint = _cached_model(ev.model) if ev.model else None
    host, port = parse_address(os.environ[RENDEZVOUS_ENV])
    shim = ShimConfig(
        rank=ev.rank,
        size=ev.world_size,
        job_id=ev.job,
        key=job_key(_secret(ev.token_secret), ev.job),
        server=(host, port),
        mode=ev.connect,
        connect_timeout=ev.connect_timeout_s,
        op_timeout=ev.op_timeout_s,
        liveness=ev.liveness_s,
    )
    config = RunConfig(
        data=ev.data,
        out=ev.out,
        checkpoint=checkpoint,
        batch_size=ev.batch_size,
        threads=ev.threads,
        precision=ev.precision,
        seed=ev.seed,
        progress=False,
        shards=ev.shards,
        started=started,
    )
    with TcpComm(shim) as comm:
        run(comm, config)
        links = comm.link_modes()
    return {
        "job": ev.job,
        "rank": ev.rank,
        "world_size": ev.world_size,
        "shards": len(ev.shards),
        "request_id": getattr(context, "aws_request_id", None),
        "memory_mb": int(getattr(context, "memory_limit_in_mb", 0) or 0),
        "heavy_imports_s": round(imports_s, 3),
        "links": {str(peer): mode for peer, mode in sorted(links.items())},
    }


@cache
def _secret(name: str) -> bytes:
    """The rendezvous master secret from Secrets Manager (never logged, never in the event)."""
    import boto3

    from lambda_shim.wire import secret_bytes

    value = boto3.client("secretsmanager").get_secret_value(SecretId=name)["SecretString"]
    return secret_bytes(value)


def _cached_model(uri: str) -> Any:
    """The checkpoint in /tmp, fetched once per sandbox (keyed by its S3 ETag, so a new
    upload under the same name is fetched again)."""
    from pathlib import Path

    from cai_hpc.storage import Location

    model = Location(uri)
    if not model.s3:
        return Path(uri)
    etag = model.etag()
    path = Path(MODEL_CACHE) / f"{etag}-{model.name}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_bytes(model.read_bytes())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def summarize(event: Any, context: Any) -> dict[str, Any]:
    """After every rank: read every rank record of the job (all listing pages), check the job
    is whole, add the cloud bill (this invocation's own time included) to rank 0's
    ``summary.json``, and return a short digest."""
    from cai_hpc.records import write_json_atomic
    from cai_hpc.storage import Location
    from lambda_shim.aws.cost import job_cost

    t0 = time.perf_counter()
    try:
        out, world, job = Location(event["out"]), int(event["world_size"]), str(event["job"])
        records = read_rank_records(out, world, job)
        summary = json.loads((out / "summary.json").read_bytes())
        memory_mb = int(getattr(context, "memory_limit_in_mb", 0) or 0) or 1024
        # Summarize runs on the ranks' architecture (the template gives both functions one).
        arch = "arm64" if platform.machine() in ("aarch64", "arm64") else "x86_64"
        _count_links(summary, records)
        spent = time.perf_counter() - t0
        summary["cloud"] = job_cost(records, summarize_s=spent, summarize_mb=memory_mb, architecture=arch)
        write_json_atomic(out / "summary.json", summary)
    except Exception as exc:
        raise RankFailedError(f"summarize: {_one_line(exc)}") from exc
    finally:  # a warm Summarize must not see the last job's records
        if "cai_hpc.storage" in sys.modules:
            sys.modules["cai_hpc.storage"].forget()
    return {
        "job": job,
        "out": str(out),
        "world_size": world,
        "samples": summary["samples"],
        "metrics": summary["metrics"],
        "cost_usd": summary["cloud"]["usd"]["total"],
    }


def _count_links(summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Connection modes into the summary: per rank (each of its links), and per link (once,
    as the lower rank of the two recorded it)."""
    from collections import Counter

    per_link: Counter = Counter()
    entries = {entry.get("rank"): entry for entry in summary.get("ranks", [])}
    for record in records:
        links = record.get("links", {})
        per_link.update(mode for peer, mode in links.items() if int(peer) > record["rank"])
        if record["rank"] in entries:
            entries[record["rank"]]["links"] = dict(Counter(links.values()))
    summary["links"] = dict(per_link)


def read_rank_records(out: Any, world: int, job: str) -> list[dict[str, Any]]:
    """Every rank's record of ``job`` under ``OUT/ranks/``, in rank order. A missing one is an
    error, and so is a record of another job (two jobs writing to one prefix)."""
    from concurrent.futures import ThreadPoolExecutor

    keys = (out / "ranks").list(".json")
    with ThreadPoolExecutor(32) as pool:
        records = list(pool.map(lambda loc: json.loads(loc.read_bytes()), keys))
    others = sorted({str(r.get("job")) for r in records if r.get("job") != job})
    if others:
        raise RankFailedError(f"{out}/ranks holds records of another job ({', '.join(others[:3])}), not only {job}")
    by_rank = {r["rank"]: r for r in records if isinstance(r.get("rank"), int)}
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise RankFailedError(f"{len(missing)} of {world} rank records missing under {out}/ranks: {shown}")
    return [by_rank[r] for r in range(world)]


def _process_start() -> float:
    from cai_hpc.records import seconds_since_process_start

    return time.time() - seconds_since_process_start()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
