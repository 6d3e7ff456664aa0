"""Reading streams: the peak memory of reading a dataset does not grow with its size.

The reader is measured without the model: at 1 GB of shards, inference took most of this
test's time (48,750 samples) and added nothing to what it checks, the reader's memory.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from cai_hpc.shards import SAMPLE_BYTES
from cai_hpc.synth import synthesize

# What ``infer`` does with the data, minus the model: validate every shard, plan one rank,
# stream its batches through the read-ahead thread. Run in a fresh process, so its peak RSS
# is that of the reading alone: VmHWM, since ru_maxrss keeps the parent's peak across exec.
READ_ALL = """
import re, sys
from pathlib import Path
from cai_hpc.batches import Prefetcher, iter_batches
from cai_hpc.plan import plan_pieces
from cai_hpc.shards import scan_dataset

shards = scan_dataset(sys.argv[1])
[pieces] = plan_pieces([s.rows for s in shards], 1)
rows = sum(len(batch) for batch in Prefetcher(iter_batches(shards, pieces, 128)))
print(rows, int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text())[1]) / 1024)
"""


def read_all(data) -> tuple[int, float]:
    result = subprocess.run([sys.executable, "-c", READ_ALL, str(data)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows, peak_mb = result.stdout.split()
    return int(rows), float(peak_mb)


@pytest.mark.slow
def test_peak_rss_reading_1_gb_is_within_300_mb_of_that_reading_50_mb(tmp_path) -> None:
    small_rows, large_rows = int(50e6 // SAMPLE_BYTES), int(1e9 // SAMPLE_BYTES)
    synthesize(tmp_path / "small", small_rows, 25.0, seed=1)
    synthesize(tmp_path / "large", large_rows, 25.0, seed=2)
    (read_small, small), (read_large, large) = read_all(tmp_path / "small"), read_all(tmp_path / "large")
    print(f"peak RSS reading 50 MB of shards {small:.0f} MB, 1 GB of shards {large:.0f} MB")
    assert (read_small, read_large) == (small_rows, large_rows)
    assert large - small <= 300
