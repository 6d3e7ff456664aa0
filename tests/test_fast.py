"""The fused inference model computes what the plain reference model computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cai_hpc.fast import fuse
from cai_hpc.model import AstroMAE


def run(model, images, mags) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.as_tensor(images), torch.as_tensor(mags)).numpy()


def test_fused_model_reproduces_the_golden_outputs(golden, golden_model) -> None:
    fused = fuse(golden_model)
    np.testing.assert_allclose(
        run(fused, golden["images"], golden["magnitudes"]), golden["redshift"], atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(
        run(fused, golden["images"], golden["magnitudes"]),
        run(golden_model, golden["images"], golden["magnitudes"]),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_fused_equals_eager_on_random_weights_and_any_batch(batch) -> None:
    torch.manual_seed(batch)
    model = AstroMAE().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(batch)
    images = rng.normal(size=(batch, 5, 32, 32)).astype(np.float32)
    mags = rng.uniform(14, 20, (batch, 5)).astype(np.float32)
    np.testing.assert_allclose(run(fuse(model), images, mags), run(model, images, mags), atol=1e-5, rtol=1e-5)


def test_fuse_refuses_a_model_in_training_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fuse(AstroMAE().train())


def test_bf16_stays_within_5e_3_of_float32_on_the_golden_inputs(golden, golden_model) -> None:
    fp32 = run(fuse(golden_model), golden["images"], golden["magnitudes"])
    bf16 = run(fuse(golden_model, "bf16"), golden["images"], golden["magnitudes"])
    error = np.abs(bf16 - fp32)
    assert 0 < error.max() <= 5e-3  # not zero: bfloat16 really ran
    assert bf16.dtype == np.float32


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        fuse(AstroMAE().eval(), "fp8")
