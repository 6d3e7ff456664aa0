"""Reading streams: peak memory of ``infer`` does not grow with the dataset size."""

from __future__ import annotations

import json

import pytest

from cai_hpc.shards import SAMPLE_BYTES
from cai_hpc.synth import synthesize
from tests.conftest import cai_hpc


def peak_rss_mb(data, out) -> float:
    result = cai_hpc("infer", "--data", str(data), "--out", str(out), "-q", timeout=1200)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "summary.json").read_text())["ranks"][0]["peak_rss_mb"]


@pytest.mark.slow
def test_peak_rss_over_1_gb_is_within_300_mb_of_that_over_50_mb(tmp_path) -> None:
    synthesize(tmp_path / "small", int(50e6 // SAMPLE_BYTES), 25.0, seed=1)
    synthesize(tmp_path / "large", int(1e9 // SAMPLE_BYTES), 25.0, seed=2)
    small = peak_rss_mb(tmp_path / "small", tmp_path / "out-small")
    large = peak_rss_mb(tmp_path / "large", tmp_path / "out-large")
    print(f"peak RSS: 50 MB of shards {small:.0f} MB, 1 GB of shards {large:.0f} MB")
    assert large - small <= 300
