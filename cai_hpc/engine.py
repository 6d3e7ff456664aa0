"""The inference engine: one ``run(comm, config)`` for a laptop, MPI ranks or Lambda functions.

It only talks to ``comm`` through the DESIGN.md subset of mpi4py's ``Comm``, and never
assumes a size. Phases, every rank in step:

1. the ranks check the dataset's headers and find finished shards, each a block of them,
   and plan contiguous, balanced row ranges (cai_hpc.job); or, when each rank was handed its
   own shards (a Lambda function per rank), every rank checks its own and they share what
   they found;
2. batches stream through the model (reading runs ahead on a thread), every input byte read
   once: rows are checked for unreadable data and NaN/inf as they arrive, and the ranks agree
   at regular batch counts whether any met bad input (``--validate full`` instead reads every
   planned row first and agrees before anything is written); a shard read whole by one rank is
   written as soon as it is done, split shards are sent to their owner;
3. metrics are reduced across ranks, records gathered, and rank 0 writes ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cai_hpc import predictions
from cai_hpc.agree import StreamCheck, agreed, decided_by_root
from cai_hpc.allocator import reuse_freed_memory
from cai_hpc.batches import Batch, Prefetcher, iter_batches
from cai_hpc.checkpoint import inference_weights, weights_id
from cai_hpc.comm import TimedComm
from cai_hpc.embeddings import EMBEDDING_DIM, JointOutput
from cai_hpc.errors import InputError
from cai_hpc.fast import PRECISIONS, FusedAstroMAE
from cai_hpc.flops import ASTROMAE_GFLOP_PER_SAMPLE
from cai_hpc.job import Job, assigned_job, planned_job
from cai_hpc.metrics import regression_metrics
from cai_hpc.plan import Piece, shard_owners
from cai_hpc.records import build_summary, rank_record, seconds_since_process_start, write_json_atomic
from cai_hpc.resources import DEFAULT_BATCH_SIZE, cpu_has_bf16, pick_device, threads_per_rank
from cai_hpc.shards import ShardInfo, ShardReader
from cai_hpc.storage import Location

log = logging.getLogger("cai_hpc")
PIECE_TAG = 17  # a rank sends at most one piece (its first) to one owner, so one tag suffices
VALIDATE = ("stream", "full")
# Rows each rank streams between two agreements on bad input: how far the others run on after
# one rank met it (each agreement is a small allgather that also lines the ranks up).
AGREE_ROWS = 1024


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
    validate: str = "stream"  # "full": read every planned row before writing anything
    agree_rows: int = AGREE_ROWS
    started: float | None = None  # epoch seconds this rank's cold start counts from (default: process start)
    embeddings: bool = False  # also write each sample's joint feature vector (embeddings.py)

    def __post_init__(self) -> None:
        self.data, self.out = Location(self.data), Location(self.out)


def run(comm: Any, config: RunConfig) -> dict[str, Any] | None:
    """Run inference over ``config.data``; returns the summary on rank 0, None elsewhere."""

    def since_start() -> float:
        return seconds_since_process_start() if config.started is None else time.time() - config.started

    imports_s = since_start()  # interpreter, imports and argument parsing
    rank, size = comm.Get_rank(), comm.Get_size()
    _check_settings(config)
    comm.barrier()
    t_start = time.perf_counter()
    comm = TimedComm(comm)  # from here on, time inside the communicator is this rank's comm_s
    threads, device = agreed(comm, lambda: (threads_per_rank(config.threads), pick_device(config.device)))
    torch.set_num_threads(threads)
    reuse_freed_memory()
    if config.compile:
        agreed(comm, _check_toolchain)

    t0 = time.perf_counter()
    job = plan_job(comm, config)
    plan_s = time.perf_counter() - t0
    shards, rows, plan = job.shards, job.rows, job.plan
    mine = plan[rank]

    t0 = time.perf_counter()
    if config.validate == "full":
        agreed(comm, lambda: _prescan(shards, mine, config.batch_size))
    scan_s = time.perf_counter() - t0
    decided_by_root(comm, lambda: _make_output_dir(config.out))

    split = {"imports_s": imports_s}
    t0 = time.perf_counter()
    state, checkpoint = agreed(comm, lambda: inference_weights(config.checkpoint, config.seed))
    t1 = time.perf_counter()
    runner = FusedAstroMAE.from_state_dict(state, config.precision).to(device)
    # weights_s: reading the checkpoint (or initialising the seeded random weights).
    split |= {"build_s": time.perf_counter() - t1, "weights_s": t1 - t0}
    t0 = time.perf_counter()
    # Found, built and chosen now, so that a first build counts as startup, not as the first
    # batch; compiled, Inductor writes its own kernels instead.
    compiled = ("torch", "--compile: Inductor writes its own kernels")
    kernels, kernels_reason = compiled if config.compile else runner.kernels_used()
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

    longest = max(-(-sum(p.rows for p in pieces) // config.batch_size) for pieces in plan)
    check = StreamCheck(comm, max(1, config.agree_rows // config.batch_size), longest)
    held, loop = _infer(runner, reference, device, shards, rows, mine, config, stamp, rank, check)
    t0 = time.perf_counter()
    _gather_split_shards(comm, plan, shards, rows, held, config.out, stamp)
    write_s = loop["write_s"] + time.perf_counter() - t0

    z_pred, z_true = _labelled_residuals(comm, job, held, config.out)
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
    record = rank_record(rank, sum(p.rows for p in mine), timing, split, kernels) | {"kernels_reason": kernels_reason}
    records = comm.gather(record, root=0)
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
            "plan_s": plan_s,
            "precision_error": precision_error,
        },
    )
    write_json_atomic(config.out / "summary.json", summary)
    return summary


def dry_run(comm: Any, config: RunConfig) -> str | None:
    """Plan the run as ``run`` would and describe the plan (on rank 0; None elsewhere), reading
    only headers and writing nothing."""
    _check_settings(config)
    threads = agreed(comm, lambda: threads_per_rank(config.threads))
    t0, cpu0 = time.perf_counter(), time.process_time()
    job = plan_job(comm, config)
    plan_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    if comm.Get_rank() != 0:
        return None
    from cai_hpc.dryrun import describe

    return describe(job, threads, config.batch_size, (plan_s, cpu_s), s3=config.data.s3, embeddings=config.embeddings)


def _check_settings(config: RunConfig) -> None:
    """Settings every rank holds alike: a bad one is an agreed error, no collective needed."""
    if config.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {config.batch_size}", agreed=True)
    if config.precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}", agreed=True)
    if config.validate not in VALIDATE:
        raise InputError(f"--validate must be one of {', '.join(VALIDATE)}, got {config.validate!r}", agreed=True)
    if config.limit is not None and config.limit < 1:
        raise InputError(f"--limit must be at least 1, got {config.limit}", agreed=True)
    if config.compile and config.embeddings:
        raise InputError("--embeddings runs the model's stages apart, which a compiled model cannot", agreed=True)


def _check_toolchain() -> None:
    from cai_hpc.compiled import missing_toolchain  # pulls in Inductor: only when asked for

    missing = missing_toolchain()
    if missing is not None:
        raise InputError(f"--compile needs {missing}, which this machine lacks; install it or drop --compile")


def plan_job(comm: Any, config: RunConfig) -> Job:
    """The job every rank agrees on: planned by rows over the dataset, or from the shards each
    rank was handed."""
    # What made the numbers: the weights (rank 0 reads the checkpoint) and their precision.
    weights = decided_by_root(comm, lambda: f"{weights_id(config.checkpoint, config.seed)}/{config.precision}")
    if config.shards is None:
        return planned_job(
            comm, config.data, config.out, weights, config.limit, config.overwrite, embeddings=config.embeddings
        )
    if config.limit is not None:
        raise InputError("--limit applies to a dataset planned by rows, not to shards handed to each rank", agreed=True)
    return assigned_job(comm, config.shards, config.out, weights, config.overwrite, embeddings=config.embeddings)


def _make_output_dir(out: Location) -> None:
    """Created once planning passed (every header checked): a run refused at planning leaves no trace."""
    try:
        (out / "predictions").make_dir()
    except OSError as exc:
        raise InputError(f"{out}: cannot create the output directory: {exc.strerror}") from None
    predictions.remove_stale_temporaries(out)


def _prescan(shards: list[ShardInfo], mine: list[Piece], batch_size: int) -> None:
    """``--validate full``: read every planned row for readability and NaN/inf before anything
    is written (the rows are read again to predict)."""
    for piece in mine:
        with ShardReader(shards[piece.shard], part=piece.rows < shards[piece.shard].rows) as reader:
            for row in range(piece.start, piece.stop, batch_size):
                reader.read(row, min(row + batch_size, piece.stop))
        shards[piece.shard].path.release()


@dataclass
class Held:
    """What a rank keeps of one piece: its predictions, the labels and object ids that came
    with its rows (carried into the predictions file, so the input is not read twice), and
    with ``--embeddings`` the rows' joint feature vectors."""

    pred: np.ndarray
    redshift: np.ndarray | None
    object_id: np.ndarray | None
    embeddings: np.ndarray | None = None  # made as the piece's first rows arrive (_infer)

    @classmethod
    def empty(cls, shard: ShardInfo, rows: int) -> Held:
        return cls(
            np.empty(rows, np.float32),
            np.empty(rows, np.float32) if shard.labelled else None,
            np.empty(rows, np.int64) if shard.has_object_id else None,
        )

    @classmethod
    def joined(cls, parts: list[Held]) -> Held:
        def join(arrays: list[np.ndarray | None]) -> np.ndarray | None:
            return None if arrays[0] is None else np.concatenate(arrays)

        return cls(*(join([getattr(h, f.name) for h in parts]) for f in fields(cls)))

    def parts(self) -> tuple[np.ndarray | None, ...]:
        """The arrays as they travel to the rank that writes the shard (``Held(*parts)``)."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def carried(self) -> dict[str, np.ndarray]:
        return {name: v for name, v in (("object_id", self.object_id), ("redshift", self.redshift)) if v is not None}


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
    check: StreamCheck,
) -> tuple[list[Held], dict[str, float]]:
    """Predict this rank's pieces; write every shard this rank read whole as soon as it is done.

    Bad input met on the way ends this rank's stream; ``check`` makes every rank raise it."""
    held = [Held.empty(shards[p.shard], p.rows) for p in mine]
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
    batches, bad = 0, None
    try:
        for batch, images, mags in reader:
            t0 = time.perf_counter()
            with torch.inference_mode():
                images, mags = images.to(device, non_blocking=True), mags.to(device, non_blocking=True)
                out = model(images, mags).float().cpu().numpy()
                if not timing["infer_s"]:
                    timing["first_batch_s"] = time.perf_counter() - t0  # one-time kernel set-up shows here
                timing["infer_s"] += time.perf_counter() - t0
                z = out[:, 0] if config.embeddings else out  # JointOutput: the redshift, then the features
                if reference is not None:
                    dz = np.abs(z - reference(images, mags).float().cpu().numpy())
                    timing["dz_sum"] += float(dz.sum())
                    timing["dz_max"] = max(timing["dz_max"], float(dz.max()))
                    timing["dz_count"] += len(dz)
            pos = 0
            for k, offset, n in batch.segments:
                h = held[k]
                h.pred[offset : offset + n] = z[pos : pos + n]
                if config.embeddings:
                    if h.embeddings is None:  # only pieces under way or kept for their owner hold features
                        h.embeddings = np.empty((len(h.pred), EMBEDDING_DIM), np.float32)
                    h.embeddings[offset : offset + n] = out[pos : pos + n, 1:]
                for name in ("redshift", "object_id"):
                    if getattr(h, name) is not None:
                        getattr(h, name)[offset : offset + n] = getattr(batch, name)[pos : pos + n]
                pos += n
                missing[k] -= n
                if missing[k] == 0 and mine[k].start == 0 and mine[k].stop == rows[mine[k].shard]:
                    t0 = time.perf_counter()
                    _write(config.out, shards[mine[k].shard], h, stamp)
                    h.object_id = h.embeddings = None  # written: only the labels stay, for the metrics
                    timing["write_s"] += time.perf_counter() - t0
            bar.update(len(batch))
            batches += 1
            check.after_batch(batches)
    except InputError as exc:
        if exc.agreed:
            raise
        bad = str(exc)
    finally:
        reader.close()
        bar.close()
    check.finish(bad)
    timing["wait_s"] = reader.wait_s
    return held, timing


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
    held: list[Held],
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
            comm.send(held[k].parts(), dest=owners[piece.shard], tag=PIECE_TAG)
            held[k].embeddings = None  # sent: the features are not needed here again
    for k, piece in enumerate(mine):
        if piece.start == 0 and piece.stop < rows[piece.shard]:
            parts = [held[k]]
            for source in range(rank + 1, len(plan)):
                if any(p.shard == piece.shard for p in plan[source]):
                    parts.append(Held(*comm.recv(source=source, tag=PIECE_TAG)))
            _write(out, shards[piece.shard], Held.joined(parts), stamp)
            held[k].embeddings = None  # written


def _write(out: Location, shard: ShardInfo, held: Held, stamp: dict[str, str]) -> None:
    if not np.isfinite(held.pred).all() or (held.embeddings is not None and not np.isfinite(held.embeddings).all()):
        raise RuntimeError(f"{shard.path}: the model predicted NaN/inf (is the checkpoint sound?)")
    predictions.write_predictions(out, shard, held.pred, stamp, held.carried(), held.embeddings)


def _labelled_residuals(comm: Any, job: Job, held: list[Held], out: Location) -> tuple[np.ndarray, np.ndarray]:
    """This rank's (predicted, true) pairs: its own pieces, plus its share of the shards an
    earlier run finished, so the metrics always cover the whole dataset."""
    pairs = [(h.pred, h.redshift) for h in held if h.redshift is not None]
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
