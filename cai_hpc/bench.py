"""``cai-hpc bench kernel``: per-rank compute efficiency, measured in one process.

Efficiency = samples/s x GFLOP/sample / GEMM rate, where the GEMM rate is measured by this
same process with the same threads and precision, just before and just after the model: a
ratio taken in one run, so it holds on a noisy shared machine. At the best setting it also
times the model's stages apart and, given a dataset, runs the real ``infer`` engine in the
same process between two kernel measurements, so that end-to-end/kernel ratio is taken in
one run too.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cai_hpc import native
from cai_hpc.allocator import reuse_freed_memory
from cai_hpc.checkpoint import save_weights
from cai_hpc.comm import SelfComm
from cai_hpc.engine import RunConfig, run
from cai_hpc.fast import FusedAstroMAE, Linear, fuse, kernel_choice
from cai_hpc.flops import gflop_per_sample
from cai_hpc.layout import DEPTH, EMBED_DIM, HEADS
from cai_hpc.model import BANDS, IMAGE_SIZE, AstroMAE

GEMM_SIZE = 2048


def _rate(step: Callable[[], None], seconds: float) -> tuple[int, float]:
    """(calls, elapsed) of ``step`` run for at least ``seconds`` and 3 calls, after a warm-up."""
    step()
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        step()
        calls += 1
    return calls, time.perf_counter() - t0


def gemm_gflops(seconds: float, dtype: torch.dtype = torch.float32) -> float:
    """GEMM rate of this process at its current thread count and ``dtype``, in GFLOP/s: the
    faster of torch's matmul and, in float32, the model's own ``Linear`` (oneDNN, its weight
    packed as the model's are). Which library is faster depends on the CPU (float32 on AMD:
    oneDNN, at twice MKL's rate), and the machine's limit is the faster one."""
    a = torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype)
    steps = [lambda: torch.mm(a, b)]
    if dtype == torch.float32:  # bf16 goes to oneDNN either way
        layer = Linear(b, torch.zeros(GEMM_SIZE))
        steps.append(lambda: layer(a))
    rates = []
    for step in steps:
        calls, elapsed = _rate(step, seconds / len(steps))
        rates.append(2 * GEMM_SIZE**3 * calls / elapsed / 1e9)
    return max(rates)


def _inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, BANDS, IMAGE_SIZE, IMAGE_SIZE), torch.randn(batch, BANDS) + 18.0


def model_samples_per_s(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: int, seconds: float
) -> float:
    images, mags = _inputs(batch)

    def step() -> None:
        with torch.inference_mode():
            model(images, mags)

    calls, elapsed = _rate(step, seconds)
    return batch * calls / elapsed


def kernel_table(
    batch_sizes: list[int], threads: list[int], seconds: float, precision: str = "fp32", compile: bool = False
) -> list[dict[str, float]]:
    """One row per (threads, batch): GEMM rate in the run's precision, samples/s of the fused
    model ``infer`` runs (compiled, with ``compile``) and of the plain float32 eager model, and
    the fused model's compute efficiency."""
    reuse_freed_memory()  # as ``infer`` runs
    model = reference_model()
    fused = fuse(model, precision)
    gflop = gflop_per_sample(model)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for batch in batch_sizes:
            runner = _compiled(fused, batch) if compile else fused
            # GEMM just before and just after the model, so a drifting machine moves both alike.
            before = gemm_gflops(seconds / 2, dtype)
            rate = model_samples_per_s(runner, batch, seconds)
            gemm = (before + gemm_gflops(seconds / 2, dtype)) / 2
            rows.append(
                {
                    "threads": t,
                    "batch": batch,
                    "gemm_gflops": gemm,
                    "samples_per_s": rate,
                    "eager_samples_per_s": model_samples_per_s(model, batch, seconds),
                    "gflop_per_sample": gflop,
                    "efficiency": rate * gflop / gemm,
                }
            )
    return rows


def _compiled(model: FusedAstroMAE, batch: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model`` compiled for this batch size and the current thread count, which Inductor
    writes into its kernels: so every row compiles afresh, forgetting the previous row's."""
    from cai_hpc.compiled import CompiledModel

    torch._dynamo.reset()
    compiled = CompiledModel(model, batch)
    compiled.warm_up()
    return compiled


def format_table(rows: list[dict[str, float]]) -> str:
    lines = [f"{'threads':>7} {'batch':>6} {'GEMM GFLOP/s':>13} {'samples/s':>10} {'efficiency':>10} {'eager/s':>8}"]
    for r in rows:
        lines.append(
            f"{r['threads']:>7} {r['batch']:>6} {r['gemm_gflops']:>13.1f} "
            f"{r['samples_per_s']:>10.1f} {r['efficiency']:>10.2f} {r['eager_samples_per_s']:>8.1f}"
        )
    return "\n".join(lines)


def reference_model() -> AstroMAE:
    """The model every measurement here runs: AstroMAE with seeded random weights."""
    torch.manual_seed(0)
    return AstroMAE().eval()


def stage_profile(model: FusedAstroMAE, batch: int, seconds: float) -> dict[str, float]:
    """Milliseconds per batch of each stage of the fused model, each stage timed on its own."""
    images, mags = _inputs(batch)
    with torch.inference_mode():
        vit, incept, mag = model.vit_features(images), model.inception_features(images), model.magnitude_block(mags)
        stages = {
            "ViT encoder": lambda: model.vit_features(images),
            "Inception CNN": lambda: model.inception_features(images),
            "magnitude MLP": lambda: model.magnitude_block(mags),
            "fusion head": lambda: model.fusion(vit, incept, mag),
        }
        timed = {name: _rate(step, seconds / len(stages)) for name, step in stages.items()}
    return {name: 1e3 * elapsed / calls for name, (calls, elapsed) in timed.items()}


def end_to_end(
    data: Path, threads: int, batch: int, precision: str, seconds: float, compile: bool = False
) -> dict[str, Any]:
    """``infer`` over ``data`` in this process at these settings, with the model's kernel rate
    measured just before and just after it; the summary's wall time includes reading,
    checkpoint loading, compiling (with ``compile``) and writing."""
    model = reference_model()
    torch.set_num_threads(threads)
    fused = fuse(model, precision)
    if compile:
        fused = _compiled(fused, batch)
    before = model_samples_per_s(fused, batch, seconds)
    with tempfile.TemporaryDirectory(prefix="cai-hpc-bench-") as tmp:
        checkpoint = Path(tmp) / "model.safetensors"
        save_weights(model, checkpoint)
        config = RunConfig(
            data=data,
            out=Path(tmp) / "out",
            checkpoint=checkpoint,
            batch_size=batch,
            threads=threads,
            precision=precision,
            compile=compile,
            progress=False,
            started=time.time(),
        )
        summary = run(SelfComm(), config)
    after = model_samples_per_s(fused, batch, seconds)
    assert summary is not None  # rank 0 of 1
    rank = summary["ranks"][0]
    wall = summary["timing"]["wall_s"]
    compile_s = rank["startup_split"].get("compile_s", 0.0)
    return {
        "samples": summary["samples"],
        "wall_s": wall,
        "samples_per_s": summary["throughput"]["samples_per_s"],
        "kernel_samples_per_s": (before + after) / 2,
        "kernel_before_after": (before, after),
        "shares": {
            "data read (waited for)": rank["load_s"] / wall,
            "model": rank["infer_s"] / wall,
            "write": rank["write_s"] / wall,
            **({"compile": compile_s / wall} if compile else {}),
            "checkpoint, build, rest": max(
                0.0, 1 - (rank["load_s"] + rank["infer_s"] + rank["write_s"] + compile_s) / wall
            ),
        },
    }


def format_profile(stages: dict[str, float], threads: int, batch: int) -> str:
    total = sum(stages.values())
    lines = [f"where the model's time goes ({threads} thread(s), batch {batch}):"]
    lines.append(f"{'stage':>16} {'ms/batch':>9} {'share':>6}")
    lines += [f"{name:>16} {ms:>9.2f} {ms / total:>6.1%}" for name, ms in stages.items()]
    # The benchmark runs on the CPU, where there is no copy to a device to time.
    lines.append(f"{'host-to-device':>16} {'-':>9} {'-':>6}  (CPU: batches are used where they are read)")
    return "\n".join(lines)


def format_end_to_end(result: dict[str, Any], data: Path) -> str:
    before, after = result["kernel_before_after"]
    ratio = result["samples_per_s"] / result["kernel_samples_per_s"]
    lines = [
        f"end to end: infer on {data} ({result['samples']} samples) in this process, same settings:",
        f"  {result['samples_per_s']:.1f} samples/s over the job wall ({result['wall_s']:.2f} s) = {ratio:.0%} of the "
        f"kernel's {result['kernel_samples_per_s']:.1f} (before {before:.1f}, after {after:.1f})",
        "  share of the job wall: " + ", ".join(f"{name} {share:.1%}" for name, share in result["shares"].items()),
    ]
    return "\n".join(lines)


def block_step_profile(model: FusedAstroMAE, batch: int, seconds: float) -> list[tuple[str, float, float | None]]:
    """The ViT encoder's time by step: (step, ms per batch over all blocks, GFLOP/s or None),
    each step of one block timed on its own at the model's shapes (batch x 17 tokens), on the
    kernels ``infer`` would run (``kernel_choice``). The linear maps' rates, set beside the
    GEMM rate, show how far they are from it; the other steps are memory-bound."""
    block, tokens = model.blocks[0], native.TOKENS
    choice = kernel_choice()
    kernels = choice.kernels
    x = torch.randn(batch, tokens, EMBED_DIM)
    pcm = (block.pcm_w1, block.pcm_b1, block.pcm_w2, block.pcm_b2)
    rows = batch * tokens
    hidden = block.mlp[0].out_features
    with torch.inference_mode():
        normed = block.norm1(x)
        qkv = block.qkv(normed)
        attended = kernels.attention(qkv) if kernels is not None else _torch_attention(qkv)
        h = block.mlp[0](normed)
        steps: dict[str, tuple[Callable[[], object], float | None]] = {
            "qkv linear": (lambda: block.qkv(normed), 2 * rows * EMBED_DIM * 3 * EMBED_DIM),
            "attention": (
                (lambda: kernels.attention(qkv)) if kernels is not None else (lambda: _torch_attention(qkv)),
                None,
            ),
            "proj linear": (lambda: block.proj(attended), 2 * rows * EMBED_DIM * EMBED_DIM),
        }
        if kernels is not None:
            pcm_step = lambda: kernels.pcm_residual_norm(x, attended.clone(), pcm, block.norm2)  # noqa: E731
            steps["PCM+residual+norm2"] = (pcm_step, None)
        fc1 = lambda: block.hidden(normed, choice.gelu_after_gemm)  # noqa: E731  (the GELU where infer has it)
        steps["fc1 linear+GELU"] = (fc1, 2 * rows * EMBED_DIM * hidden)
        steps["fc2 linear"] = (lambda: block.mlp[1](h), 2 * rows * hidden * EMBED_DIM)
        if kernels is not None:
            steps["residual+norm1"] = (lambda: kernels.add_norm(attended.clone(), x, block.norm1), None)
        else:  # torch's block in one piece; its steps besides the above, by difference
            steps["whole block"] = (lambda: block.norm1(block(x)), None)
        timed = {name: (_rate(step, seconds / len(steps)), flop) for name, (step, flop) in steps.items()}
    profile = []
    for name, ((calls, elapsed), flop) in timed.items():
        per_call = elapsed / calls
        profile.append((name, 1e3 * per_call * DEPTH, flop / per_call / 1e9 if flop else None))
    if kernels is None:
        whole = profile.pop()[1]
        profile.append(("PCM, norms, residuals", max(0.0, whole - sum(ms for _, ms, _ in profile)), None))
    return profile


def _torch_attention(qkv: torch.Tensor) -> torch.Tensor:
    b, n, _ = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, HEADS, EMBED_DIM // HEADS).permute(2, 0, 3, 1, 4)
    return ((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, EMBED_DIM)


def shape_gemm_gflops(rows: int, seconds: float) -> dict[str, dict[str, float]]:
    """GFLOP/s at the ViT's own shapes, M = batch x 17 rows, K = 192 -> N = 768 (fc1's) and
    K = 768 -> N = 192 (fc2's), of the model's ``Linear`` (oneDNN, weight packed) and of torch's
    ``F.linear`` (its BLAS, MKL on x86): whether the model's linear maps take the faster one on
    this CPU, and how near the 2048² rate they can come."""
    rates: dict[str, dict[str, float]] = {}
    for k, n in ((EMBED_DIM, 4 * EMBED_DIM), (4 * EMBED_DIM, EMBED_DIM)):
        x, layer = torch.randn(rows, k), Linear(torch.randn(n, k), torch.zeros(n))
        paths = {
            "oneDNN": lambda layer=layer, x=x: layer(x),
            "F.linear": lambda layer=layer, x=x: F.linear(x, layer.weight),
        }
        with torch.inference_mode():
            timed = {name: _rate(step, seconds / 4) for name, step in paths.items()}
        rates[f"K={k} N={n}"] = {
            name: 2 * rows * k * n * calls / elapsed / 1e9 for name, (calls, elapsed) in timed.items()
        }
    return rates


def format_block_profile(
    profile: list[tuple[str, float, float | None]], shapes: dict[str, dict[str, float]], gemm: float, batch: int
) -> str:
    choice = kernel_choice()
    total = sum(ms for _, ms, _ in profile)
    lines = [f"ViT encoder by step ({DEPTH} blocks, batch {batch}, {choice.label} kernels), each step timed alone:"]
    lines.append(f"{'step':>20} {'ms/batch':>9} {'share':>6} {'GFLOP/s':>8} {'of 2048²':>8}")
    for name, ms, rate in profile:
        rated = f"{rate:>8.1f} {rate / gemm:>8.2f}" if rate is not None else f"{'-':>8} {'-':>8}"
        lines.append(f"{name:>20} {ms:>9.2f} {ms / total:>6.1%} {rated}")
    rows = batch * native.TOKENS
    lines.append(
        f"GEMM at the model's shapes (M = {batch} x {native.TOKENS} = {rows}): GFLOP/s (of the 2048² rate {gemm:.1f})"
    )
    for shape, paths in shapes.items():
        lines.append(
            f"  {shape}: " + ", ".join(f"{name} {rate:.1f} ({rate / gemm:.2f})" for name, rate in paths.items())
        )
    return "\n".join(lines)
