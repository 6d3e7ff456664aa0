"""Shared fixtures: reference facts, golden weights and small datasets made by our generators."""

from __future__ import annotations

import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cai_hpc.model import AstroMAE
from cai_hpc.synth import synthesize

# Conformance facts about the published model (copied from the project's shared reference):
# kept in the repository so that a clone with nothing beside it passes its tests.
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"


def reference_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weight rule of tests/data/reference/README.md, one seeded generator per key."""
    state = {}
    for key, value in model.state_dict().items():
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        shape = value.shape
        if key.endswith("num_batches_tracked"):
            t = torch.zeros(shape, dtype=torch.int64)
        elif key.endswith("running_var"):
            t = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            t = torch.randn(shape, generator=g) * 0.1
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(".weight"):
            t = 1.0 + 0.05 * torch.randn(shape, generator=g)
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        state[key] = t
    return state


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    path = REFERENCE / "astromae-golden.npz"
    if not path.is_file():
        pytest.fail(f"reference file missing: {path}")
    return dict(np.load(path))


@pytest.fixture(scope="session")
def golden_model() -> AstroMAE:
    model = AstroMAE()
    model.load_state_dict(reference_weights(model), strict=True)
    return model.eval()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 labelled galaxies in 1 MB shards (48 rows each, the last one short)."""
    out = tmp_path_factory.mktemp("small") / "data"
    synthesize(out, 300, 1.0, seed=7)
    return out


def cai_hpc(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "cai_hpc", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
