"""The model matches the reference: keys, shapes, parameter count and golden outputs."""

from __future__ import annotations

import numpy as np
import torch

from cai_hpc import layout
from cai_hpc.flops import ASTROMAE_GFLOP_PER_SAMPLE, gflop_per_sample
from cai_hpc.model import AstroMAE, parameter_count
from tests.conftest import REFERENCE


def reference_shapes() -> dict[str, tuple[int, ...]]:
    expected = {}
    for line in (REFERENCE / "astromae-state-dict.txt").read_text().splitlines():
        key, shape = line.split(" ", 1)
        expected[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return expected


def test_parameter_count_is_the_published_one() -> None:
    assert parameter_count(AstroMAE()) == 15_902_889
    assert layout.parameter_count(layout.state_dict_shapes()) == 15_902_889


def test_state_dict_keys_and_shapes_match_the_reference() -> None:
    mine = {k: tuple(v.shape) for k, v in AstroMAE().state_dict().items()}
    assert mine == reference_shapes()


def test_the_layout_the_fused_model_is_checked_against_is_the_reference_one() -> None:
    assert layout.state_dict_shapes() == reference_shapes()


def test_the_reported_work_per_sample_is_what_the_flop_counter_counts_on_the_reference_model() -> None:
    assert gflop_per_sample(AstroMAE().eval()) == ASTROMAE_GFLOP_PER_SAMPLE
    assert round(ASTROMAE_GFLOP_PER_SAMPLE, 4) == 0.2215


def test_golden_outputs_reproduced(golden, golden_model) -> None:
    with torch.inference_mode():
        z = golden_model(torch.from_numpy(golden["images"]), torch.from_numpy(golden["magnitudes"]))
    assert z.shape == (32,)
    np.testing.assert_allclose(z.numpy(), golden["redshift"], atol=1e-4, rtol=0)


def test_the_unused_5x5_branch_of_the_last_block_does_not_change_the_output(golden, golden_model) -> None:
    images = torch.from_numpy(golden["images"][:4])
    mags = torch.from_numpy(golden["magnitudes"][:4])
    with torch.inference_mode():
        before = golden_model(images, mags)
        branch = golden_model.inception_model.vis_inception[8].branch3
        saved = [p.clone() for p in branch.parameters()]
        for p in branch.parameters():
            p.add_(1.0)
        after = golden_model(images, mags)
        for p, s in zip(branch.parameters(), saved, strict=True):
            p.copy_(s)
    assert torch.equal(before, after)


def test_batch_composition_does_not_change_a_sample(golden, golden_model) -> None:
    images = torch.from_numpy(golden["images"])
    mags = torch.from_numpy(golden["magnitudes"])
    with torch.inference_mode():
        whole = golden_model(images, mags)
        one_by_one = torch.cat([golden_model(images[i : i + 1], mags[i : i + 1]) for i in range(8)])
    np.testing.assert_allclose(one_by_one.numpy(), whole[:8].numpy(), atol=1e-5, rtol=0)
