"""The inference engine: one ``run(comm, config)`` for a laptop, MPI ranks or Lambda functions.

It only talks to ``comm`` through the DESIGN.md subset of mpi4py's ``Comm``, and never
assumes a size. Phases, every rank in step:

1. rank 0 validates the dataset's headers, applies ``--limit``, finds finished shards and
   plans contiguous, balanced row ranges; or, when each rank was handed its own shards (a
   Lambda function per rank), every rank checks its own and they share what they found;
2. every rank scans its planned pieces for unreadable rows and NaN/inf, and the ranks agree
   on the outcome before anything is written;
3. batches stream through the model (reading runs ahead on a thread); a shard read whole by
   one rank is written as soon as it is done, split shards are sent to their owner;
4. metrics are reduced across ranks, records gathered, and rank 0 writes ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from cai_hpc import predictions
from cai_hpc.allocator import reuse_freed_memory
from cai_hpc.batches import Batch, Prefetcher, iter_batches
from cai_hpc.checkpoint import inference_weights, weights_id
from cai_hpc.comm import TimedComm
from cai_hpc.embeddings import EMBEDDING_DIM, JointOutput
from cai_hpc.errors import InputError
from cai_hpc.fast import PRECISIONS, FusedAstroMAE
from cai_hpc.flops import ASTROMAE_GFLOP_PER_SAMPLE
from cai_hpc.metrics import regression_metrics
from cai_hpc.plan import Piece, plan_pieces, shard_owners
from cai_hpc.records import build_summary, rank_record, seconds_since_process_start, write_json_atomic
from cai_hpc.resources import DEFAULT_BATCH_SIZE, cpu_has_bf16, pick_device, threads_per_rank
from cai_hpc.shards import ShardInfo, ShardReader, inspect_shard, scan_dataset
from cai_hpc.storage import Location

log = logging.getLogger("cai_hpc")
T = TypeVar("T")
PIECE_TAG = 17  # a rank sends at most one piece (its first) to one owner, so one tag suffices


@dataclass
class RunConfig:
    data: Location | Path | str  # a directory or S3 prefix of shards
    out: Location | Path | str  # a directory or S3 prefix
    checkpoint: Path | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    threads: int | None = None
    limit: int | None = None
    overwrite: bool = False
    device: str = "cpu"
    precision: str = "fp32"
    compare_fp32: bool = False  # with bf16: also run float32 and report the difference
    compile: bool = False  # torch.compile the model before the first batch (counted in startup_s)
    seed: int = 0
    progress: bool = True
    shards: list[str] | None = None  # this rank's own whole shards (cloud); None: plan by rows
    started: float | None = None  # epoch seconds this rank's cold start counts from (default: process start)
    embeddings: bool = False  # also write each sample's joint feature vector (embeddings.py)

    def __post_init__(self) -> None:
        self.data, self.out = Location(self.data), Location(self.out)


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


def run(comm: Any, config: RunConfig) -> dict[str, Any] | None:
    """Run inference over ``config.data``; returns the summary on rank 0, None elsewhere."""

    def since_start() -> float:
        return seconds_since_process_start() if config.started is None else time.time() - config.started

    imports_s = since_start()  # interpreter, imports and argument parsing
    rank, size = comm.Get_rank(), comm.Get_size()
    if config.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {config.batch_size}", agreed=True)
    if config.precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}", agreed=True)
    comm.barrier()
    t_start = time.perf_counter()
    comm = TimedComm(comm)  # from here on, time inside the communicator is this rank's comm_s
    threads, device = _agreed(comm, lambda: (threads_per_rank(config.threads), pick_device(config.device)))
    torch.set_num_threads(threads)
    reuse_freed_memory()
    if config.compile and config.embeddings:
        raise InputError("--embeddings runs the model's stages apart, which a compiled model cannot", agreed=True)
    if config.compile:
        _agreed(comm, _check_toolchain)

    if config.shards is None:
        job = _decided_by_root(comm, lambda: _prepare(config, size))
    else:
        job = _assigned(comm, config)
    shards, rows, plan = job.shards, job.rows, job.plan
    mine = plan[rank]

    t0 = time.perf_counter()
    labels = _agreed(comm, lambda: _prescan(shards, mine, config.batch_size))
    scan_s = time.perf_counter() - t0
    _decided_by_root(comm, lambda: _make_output_dir(config.out))

    split = {"imports_s": imports_s}
    t0 = time.perf_counter()
    state, checkpoint = _agreed(comm, lambda: inference_weights(config.checkpoint, config.seed))
    t1 = time.perf_counter()
    runner = FusedAstroMAE.from_state_dict(state, config.precision).to(device)
    # weights_s: reading the checkpoint (or initialising the seeded random weights).
    split |= {"build_s": time.perf_counter() - t1, "weights_s": t1 - t0}
    t0 = time.perf_counter()
    # Found or built now, so that a first build counts as startup, not as the first batch;
    # compiled, Inductor writes its own kernels instead.
    kernels = "native" if not config.compile and runner.runs_native() else "torch"
    split["kernels_s"] = time.perf_counter() - t0
    if config.compile:
        from cai_hpc.compiled import CompiledModel  # pulls in Inductor: only when asked for

        runner = CompiledModel(runner, config.batch_size)
        split["compile_s"] = runner.warm_up()
    if config.embeddings:
        runner = JointOutput(runner)  # results: redshift in column 0, then the joint features
    stamp = {"checkpoint": checkpoint, "weights": job.weights}
    compare = config.compare_fp32 and config.precision != "fp32"
    reference = FusedAstroMAE.from_state_dict(state).to(device) if compare else None
    del state  # the fused models hold what they need
    if rank == 0:
        _announce(job, size, threads, config, checkpoint)
    startup_s = since_start() - scan_s  # the input check is counted in load_s

    pred, loop = _infer(runner, reference, device, shards, rows, mine, config, stamp, rank)
    t0 = time.perf_counter()
    _gather_split_shards(comm, plan, shards, rows, pred, config.out, stamp)
    write_s = loop["write_s"] + time.perf_counter() - t0

    z_pred, z_true = _labelled_residuals(comm, job, mine, pred, labels, config.out)
    metrics = regression_metrics(comm, z_pred, z_true)
    precision_error = _precision_error(comm, loop) if reference is not None else None
    timing = {
        "startup_s": startup_s,
        "load_s": scan_s + loop["wait_s"],
        "infer_s": loop["infer_s"],
        "write_s": write_s,
        "comm_s": comm.seconds,
    }
    split["first_batch_s"] = loop["first_batch_s"]
    records = comm.gather(rank_record(rank, sum(p.rows for p in mine), timing, split, kernels), root=0)
    comm.barrier()
    wall_s = time.perf_counter() - t_start
    if rank != 0:
        return None
    summary = build_summary(
        backend=getattr(comm, "backend", "mpi"),
        ranks=records,
        wall_s=wall_s,
        metrics=metrics,
        settings={
            "precision": config.precision,
            "device": device.split(":")[0],
            "batch_size": config.batch_size,
            "threads_per_rank": threads,
            "compile": config.compile,
        },
        model={
            "parameters": runner.reference_parameters,
            "gflop_per_sample": ASTROMAE_GFLOP_PER_SAMPLE,
            "checkpoint": checkpoint,
        },
        extra={
            "data": str(config.data),
            "shards": len(job.shards),
            "skipped_shards": len(job.done),
            "precision_error": precision_error,
        },
    )
    write_json_atomic(config.out / "summary.json", summary)
    return summary


def _check_toolchain() -> None:
    from cai_hpc.compiled import missing_toolchain  # pulls in Inductor: only when asked for

    missing = missing_toolchain()
    if missing is not None:
        raise InputError(f"--compile needs {missing}, which this machine lacks; install it or drop --compile")


def _prepare(config: RunConfig, size: int) -> Job:
    """Rank 0: validate the headers, apply the limit, find the shards an earlier run finished,
    and split the rest into ``size`` balanced runs of rows."""
    shards = scan_dataset(config.data)
    rows = [s.rows for s in shards]
    if config.limit is not None:
        if config.limit < 1:
            raise InputError(f"--limit must be at least 1, got {config.limit}")
        left = config.limit
        for i, n in enumerate(rows):
            rows[i] = min(n, left)
            left -= rows[i]
        keep = [i for i, n in enumerate(rows) if n > 0]
        shards, rows = [shards[i] for i in keep], [rows[i] for i in keep]
    # What made the numbers: the weights and the precision they ran in.
    weights = f"{weights_id(config.checkpoint, config.seed)}/{config.precision}"
    done = (
        []
        if config.overwrite
        else [
            i
            for i, shard in enumerate(shards)
            if predictions.is_complete(config.out, shard, rows[i], weights, config.embeddings)
        ]
    )
    todo = [i for i in range(len(shards)) if i not in set(done)]
    plan = [
        [Piece(todo[p.shard], p.start, p.stop) for p in pieces] for pieces in plan_pieces([rows[i] for i in todo], size)
    ]
    return Job(shards, rows, done, weights, plan, [done[rank::size] for rank in range(size)])


def _assigned(comm: Any, config: RunConfig) -> Job:
    """Every rank checks the whole shards it was handed and whether an earlier run finished
    them; the ranks then share what they found. Nothing here grows with the world size on
    one rank but the small allgather, so a thousand functions start as fast as one."""
    if config.limit is not None:
        raise InputError("--limit applies to a dataset planned by rows, not to shards handed to each rank", agreed=True)
    weights = f"{weights_id(config.checkpoint, config.seed)}/{config.precision}"

    def check_mine() -> list[tuple[ShardInfo, bool]]:
        infos = [inspect_shard(where) for where in config.shards or []]
        return [
            (i, not config.overwrite and predictions.is_complete(config.out, i, i.rows, weights, config.embeddings))
            for i in infos
        ]

    found = _agreed(comm, check_mine)
    everyone = comm.allgather(found)
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


def _make_output_dir(out: Location) -> None:
    """Created only once the input passed every check, so bad input leaves no trace."""
    try:
        (out / "predictions").make_dir()
    except OSError as exc:
        raise InputError(f"{out}: cannot create the output directory: {exc.strerror}") from None
    predictions.remove_stale_temporaries(out)


def _prescan(shards: list[ShardInfo], mine: list[Piece], batch_size: int) -> list[np.ndarray | None]:
    """Read every planned row once for readability and NaN/inf; return the pieces' labels."""
    labels: list[np.ndarray | None] = []
    for piece in mine:
        with ShardReader(shards[piece.shard]) as reader:
            parts = [
                reader.read(row, min(row + batch_size, piece.stop)).redshift
                for row in range(piece.start, piece.stop, batch_size)
            ]
        labels.append(np.concatenate(parts) if shards[piece.shard].labelled else None)
    return labels


def _infer(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    reference: torch.nn.Module | None,
    device: str,
    shards: list[ShardInfo],
    rows: list[int],
    mine: list[Piece],
    config: RunConfig,
    stamp: dict[str, str],
    rank: int,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Predict this rank's pieces; write every shard this rank read whole as soon as it is done."""
    width = (1 + EMBEDDING_DIM,) if config.embeddings else ()
    pred = [np.empty((p.rows, *width), np.float32) for p in mine]
    missing = [p.rows for p in mine]
    timing = {"infer_s": 0.0, "write_s": 0.0, "wait_s": 0.0, "first_batch_s": 0.0}
    timing |= {"dz_sum": 0.0, "dz_max": 0.0, "dz_count": 0}
    bar = tqdm(
        total=sum(missing),
        unit="sample",
        desc=f"rank {rank}",
        delay=2.0,
        disable=None if rank == 0 and config.progress else True,
    )
    reader = Prefetcher(_host_tensors(iter_batches(shards, mine, config.batch_size), pin=device != "cpu"))
    try:
        for batch, images, mags in reader:
            t0 = time.perf_counter()
            with torch.inference_mode():
                images, mags = images.to(device, non_blocking=True), mags.to(device, non_blocking=True)
                out = model(images, mags).float().cpu().numpy()
                if not timing["infer_s"]:
                    timing["first_batch_s"] = time.perf_counter() - t0  # one-time kernel set-up shows here
                timing["infer_s"] += time.perf_counter() - t0
                if reference is not None:
                    z = out[:, 0] if out.ndim == 2 else out
                    dz = np.abs(z - reference(images, mags).float().cpu().numpy())
                    timing["dz_sum"] += float(dz.sum())
                    timing["dz_max"] = max(timing["dz_max"], float(dz.max()))
                    timing["dz_count"] += len(dz)
            pos = 0
            for k, offset, n in batch.segments:
                pred[k][offset : offset + n] = out[pos : pos + n]
                pos += n
                missing[k] -= n
                if missing[k] == 0 and mine[k].start == 0 and mine[k].stop == rows[mine[k].shard]:
                    t0 = time.perf_counter()
                    _write(config.out, shards[mine[k].shard], pred[k], stamp)
                    timing["write_s"] += time.perf_counter() - t0
            bar.update(len(batch))
    finally:
        reader.close()
        bar.close()
    timing["wait_s"] = reader.wait_s
    return pred, timing


def _host_tensors(batches: Iterator[Batch], pin: bool) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor]]:
    """Batches as torch tensors, page-locked for a GPU so the copies can run asynchronously;
    this runs on the reader thread, off the compute path."""
    for batch in batches:
        with torch.inference_mode():  # inference tensors, which a compiled model takes without a copy
            images, mags = torch.from_numpy(batch.images), torch.from_numpy(batch.magnitudes)
            if pin:
                images, mags = images.pin_memory(), mags.pin_memory()
        yield batch, images, mags


def _precision_error(comm: Any, loop: dict[str, float]) -> dict[str, float | str | None]:
    """Max and mean |Δz| of this precision against float32, over every rank's samples."""
    total, count = comm.allreduce(np.array([loop["dz_sum"], loop["dz_count"]], dtype=np.float64))
    return {
        "against": "fp32",
        "max_abs_dz": max(comm.allgather(loop["dz_max"])),
        "mean_abs_dz": float(total / count) if count else None,
    }


def _gather_split_shards(
    comm: Any,
    plan: list[list[Piece]],
    shards: list[ShardInfo],
    rows: list[int],
    pred: list[np.ndarray],
    out: Location,
    stamp: dict[str, str],
) -> None:
    """Send the piece of a shard this rank does not own; assemble and write the ones it owns.

    Pieces only travel to lower ranks, and rank 0 only receives, so the sends cannot wait
    on each other in a cycle.
    """
    rank = comm.Get_rank()
    mine = plan[rank]
    owners = shard_owners(plan)
    for k, piece in enumerate(mine):
        if piece.start != 0:
            comm.send(pred[k], dest=owners[piece.shard], tag=PIECE_TAG)
    for k, piece in enumerate(mine):
        if piece.start == 0 and piece.stop < rows[piece.shard]:
            parts = [pred[k]]
            for source in range(rank + 1, len(plan)):
                if any(p.shard == piece.shard for p in plan[source]):
                    parts.append(comm.recv(source=source, tag=PIECE_TAG))
            _write(out, shards[piece.shard], np.concatenate(parts), stamp)


def _write(out: Location, shard: ShardInfo, pred: np.ndarray, stamp: dict[str, str]) -> None:
    if not np.isfinite(pred).all():
        raise RuntimeError(f"{shard.path}: the model predicted NaN/inf (is the checkpoint sound?)")
    if pred.ndim == 2:  # with --embeddings: the redshift, then the joint features
        predictions.write_predictions(out, shard, pred[:, 0], stamp, embeddings=pred[:, 1:])
    else:
        predictions.write_predictions(out, shard, pred, stamp)


def _labelled_residuals(
    comm: Any, job: Job, mine: list[Piece], pred: list[np.ndarray], labels: list[np.ndarray | None], out: Location
) -> tuple[np.ndarray, np.ndarray]:
    """This rank's (predicted, true) pairs: its own pieces, plus its share of the shards an
    earlier run finished, so the metrics always cover the whole dataset."""
    pairs = [(p[:, 0] if p.ndim == 2 else p, t) for p, t in zip(pred, labels, strict=True) if t is not None]
    for i in job.rereads[comm.Get_rank()]:
        pairs.append(predictions.read_labelled(out, job.shards[i], job.rows[i]))
    if not pairs:
        return np.empty(0, np.float32), np.empty(0, np.float32)
    return np.concatenate([p for p, _ in pairs]), np.concatenate([t for _, t in pairs])


def _announce(job: Job, size: int, threads: int, config: RunConfig, checkpoint: str) -> None:
    samples = sum(job.rows[i] for i in job.todo)
    log.info(
        "%d samples in %d shards (%d already done), %d rank(s) x %d thread(s), batch %d",
        samples,
        len(job.todo),
        len(job.done),
        size,
        threads,
        config.batch_size,
    )
    if config.checkpoint is None:
        log.warning("no --checkpoint: %s", checkpoint)
    if config.precision == "bf16" and config.device == "cpu" and cpu_has_bf16() is False:
        log.warning("--precision bf16: this CPU has no bf16 instructions, so bfloat16 is emulated and slower than fp32")


def _decided_by_root(comm: Any, decide: Callable[[], T]) -> T:
    """Rank 0 decides and broadcasts; an InputError there is raised on every rank."""
    outcome: tuple[str, Any] | None = None
    if comm.Get_rank() == 0:
        try:
            outcome = ("ok", decide())
        except InputError as exc:
            outcome = ("error", str(exc))
    status, value = comm.bcast(outcome, root=0)
    if status == "error":
        raise InputError(value, agreed=True)
    return value


def _agreed(comm: Any, work: Callable[[], T]) -> T:
    """Every rank does its own part; if any rank hits an InputError, all raise the first one."""
    try:
        result, error = work(), None
    except InputError as exc:
        result, error = None, str(exc)
    errors = [e for e in comm.allgather(error) if e is not None]
    if errors:
        raise InputError(errors[0], agreed=True)
    return result
