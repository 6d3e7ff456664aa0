"""The command line as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cai_hpc.cli import main
from tests.conftest import cai_hpc

REPO = Path(__file__).resolve().parents[1]


def test_python_m_cai_hpc_alone_runs_on_the_embedded_sample(tmp_path) -> None:
    result = cai_hpc("--out", str(tmp_path / "out"), cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["samples"] == 2048 and summary["shards"] == 5
    assert "random weights" in result.stderr  # the user is told the predictions mean nothing
    assert len(list((tmp_path / "out" / "predictions").glob("*.h5"))) == 5


def test_synth_infer_plot(tmp_path) -> None:
    assert (
        cai_hpc("synth", "--out", str(tmp_path / "d"), "--samples", "120", "--shard-mb", "1", "--seed", "4").returncode
        == 0
    )
    result = cai_hpc("infer", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--batch-size", "32", "-q")
    assert result.returncode == 0, result.stderr
    # --quiet: no progress and no info lines, only the warning about random weights
    assert result.stderr.splitlines() == [
        "cai-hpc: no --checkpoint: none: seeded random weights (seed 0), predictions are not meaningful"
    ]
    plotted = cai_hpc("plot", str(tmp_path / "o"))
    assert plotted.returncode == 0, plotted.stderr
    png = (tmp_path / "o" / "redshift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_without_predictions_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    assert "no predictions/*.h5 files" in capsys.readouterr().err


def test_bench_kernel_prints_efficiency_stages_and_the_end_to_end_ratio(small_dataset) -> None:
    result = cai_hpc(
        "bench", "kernel", "--batch-sizes", "4,8", "--threads", "1", "--seconds", "0.05", "--data", str(small_dataset)
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["threads", "batch", "GEMM", "GFLOP/s", "samples/s", "efficiency", "eager/s"]
    rows = [line.split() for line in lines[1:3]]
    assert [r[:2] for r in rows] == [["1", "4"], ["1", "8"]]
    assert all(0 < float(r[4]) < 2 for r in rows)
    best = max(rows, key=lambda r: float(r[3]))[1]
    assert lines[3] == f"where the model's time goes (1 thread(s), batch {best}):"
    stages = {" ".join(line.split()[:-2]): line.split()[-1] for line in lines[5:9]}
    assert list(stages) == ["ViT encoder", "Inception CNN", "magnitude MLP", "fusion head"]
    assert abs(sum(float(share.rstrip("%")) for share in stages.values()) - 100) < 0.5
    assert lines[10].startswith(f"end to end: infer on {small_dataset} (300 samples)")
    ratio = int(lines[11].split(" = ")[1].split("%")[0])
    assert 0 < ratio < 200  # at 0.05 s per measurement the kernel rate is rough
    assert "data read (waited for)" in lines[12] and "write" in lines[12]


def test_bench_kernel_compile_prints_one_row_per_compiled_model_and_no_stage_profile(monkeypatch, capsys) -> None:
    """The table's shape only: compiling takes minutes on a small machine, and what a compiled
    model computes is tested on its own, so here the model stands in for its compiled form."""
    import torch

    from cai_hpc import bench

    compiled_for = []

    def uncompiled(model, batch):
        compiled_for.append((torch.get_num_threads(), batch))
        return model

    monkeypatch.setattr(bench, "_compiled", uncompiled)
    before = torch.get_num_threads()
    try:
        code = main(["bench", "kernel", "--compile", "--batch-sizes", "8", "--threads", "1", "--seconds", "0.05"])
    finally:
        torch.set_num_threads(before)  # the command sets this process's threads
    assert code == 0
    assert compiled_for == [(1, 8)]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2  # the header and one row: a compiled model is one graph, not stages
    threads, batch, _, samples_per_s, efficiency, _ = lines[1].split()
    assert (threads, batch) == ("1", "8") and float(samples_per_s) > 0 and 0 < float(efficiency) < 2


def test_compile_without_a_compiler_stops_in_one_line_before_any_output(small_dataset, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CXX"} | {"PATH": str(Path(sys.executable).parent)}
    result = cai_hpc("infer", "--data", str(small_dataset), "--out", str(tmp_path / "out"), "--compile", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cai-hpc: error: --compile needs a C++ compiler (g++, or CXX naming one), which this machine lacks; "
        "install it or drop --compile"
    ]
    assert not (tmp_path / "out").exists()


def test_a_failing_compile_is_one_line_naming_the_compiler(small_dataset, tmp_path) -> None:
    env = os.environ | {"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    result = cai_hpc("infer", "--data", str(small_dataset), "--out", str(tmp_path / "out"), "--compile", "-q", env=env)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("cai-hpc: error: ") and "No working C++ compiler" in line and "/bin/false" in line
    assert not list((tmp_path / "out" / "predictions").iterdir())


def test_an_unexpected_failure_is_one_line_too(tmp_path, golden_model, capsys) -> None:
    import torch

    torch.save(golden_model.state_dict(), tmp_path / "sd.pt")
    assert main(["convert-checkpoint", str(tmp_path / "sd.pt"), str(tmp_path / "no" / "such" / "w.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cai-hpc: error: ")


def test_bad_flags_are_one_line_errors(tmp_path, capsys) -> None:
    assert main(["infer", "--data", str(tmp_path), "--threads", "0", "-q"]) == 2
    assert capsys.readouterr().err.strip() == "cai-hpc: error: --threads must be at least 1, got 0"
    assert main(["synth", "--out", str(tmp_path / "s"), "--samples", "0"]) == 2
    assert "--samples must be at least 1" in capsys.readouterr().err
