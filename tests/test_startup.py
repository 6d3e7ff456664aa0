"""Cold start: inference from a checkpoint builds the fused model from the file's tensors and
never imports timm, nor what timm drags in (torchvision), nor the plotting stack."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cai_hpc.checkpoint import save_weights

REPO = Path(__file__).resolve().parents[1]
NOT_FOR_INFERENCE = ("timm", "torchvision", "matplotlib")

# Runs the real command line in a fresh interpreter, then reports which of the modules were
# imported; importing the reference model afterwards shows the check does see timm when it is there.
SCRIPT = f"""
import json, sys
from cai_hpc.cli import main
code = main(sys.argv[1:])
seen = [m for m in {NOT_FOR_INFERENCE!r} if m in sys.modules]
import cai_hpc.model
print(json.dumps({{"code": code, "seen": seen, "control": "timm" in sys.modules}}))
"""


def test_inference_with_a_checkpoint_imports_no_timm_torchvision_or_matplotlib(
    small_dataset, tmp_path, golden_model
) -> None:
    save_weights(golden_model, tmp_path / "w.safetensors")
    out = tmp_path / "out"
    args = ["infer", "--data", str(small_dataset), "--out", str(out), "--checkpoint", str(tmp_path / "w.safetensors")]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args, "--limit", "96", "-q"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"code": 0, "seen": [], "control": True}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 96 and summary["model"]["checkpoint"] == "w.safetensors"
    assert summary["model"]["parameters"] == 15_902_889
    assert round(summary["model"]["gflop_per_sample"], 4) == 0.2215


def test_the_process_age_is_not_longer_than_the_process_has_lived() -> None:
    # The parent's clock brackets the child's life: its age when it reads it is at most the time
    # since the parent started it (plus a 10 ms tick of rounding).
    script = "import time; from cai_hpc.records import seconds_since_process_start as age; print(age(), time.time())"
    t0 = time.time()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    age, at = (float(v) for v in result.stdout.split())
    assert age <= at - t0 + 0.011
