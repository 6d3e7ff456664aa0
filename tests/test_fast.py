"""The fused inference model computes what the plain reference model computes, and is
built from a state dict checked as strictly as ``load_state_dict(strict=True)`` checks it."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from cai_hpc.compiled import CompiledModel
from cai_hpc.errors import InputError
from cai_hpc.fast import _ONEDNN, _PACKS, ACTIVATIONS, FusedAstroMAE, Linear, fuse, linear, max_pool_3x3
from cai_hpc.layout import DEPTH, MAG_LAYERS
from cai_hpc.model import AstroMAE
from tests.conftest import reference_weights


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


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_linear_is_f_linear_then_its_activation_in_float32_and_under_autocast(activation) -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 17, 192), torch.randn(576, 192) / 14, torch.randn(576)
    expected = ACTIVATIONS[activation](torch.nn.functional.linear(x, w, b))
    torch.testing.assert_close(linear(x, w, b, activation), expected, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear(x, w, b, activation)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, atol=0.1, rtol=0.02)


@pytest.mark.skipif(not _PACKS, reason="torch built without oneDNN's weight packing")
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_a_linear_packs_its_weight_on_its_first_float32_call_and_computes_the_same(activation) -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 17, 192), torch.randn(576, 192) / 14, torch.randn(576)
    layer = Linear(w, b, activation)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert layer.packed is None  # autocast's bfloat16 calls leave the weight as it is
    with torch.inference_mode():
        first, second = layer(x), layer(x)
    assert layer.packed is not None
    assert torch.equal(first, second)
    torch.testing.assert_close(first, linear(x, w, b, activation), atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not _PACKS, reason="torch built without oneDNN's weight packing")
def test_a_packed_linear_follows_its_weight_and_copies_without_its_packing() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 192)
    layer = Linear(torch.randn(576, 192) / 14, torch.randn(576))
    with torch.inference_mode():
        first = layer(x)
        copied = copy.deepcopy(layer)  # an opaque oneDNN tensor alone could not be copied
        pickled = pickle.loads(pickle.dumps(layer))
        layer.weight.mul_(2)  # in place: the packed weight must not go stale
        doubled = layer(x)
    assert torch.equal(copied(x), first) and torch.equal(pickled(x), first)
    torch.testing.assert_close(doubled, torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.skipif(not _ONEDNN, reason="torch built without oneDNN's linear ops")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_float32_linear_maps_run_through_onednn_not_the_default_blas(precision) -> None:
    # On AMD CPUs the default (MKL) float32 GEMM runs at half oneDNN's rate (README). In bf16
    # only the float32 heads (magnitude MLP, fusion) are float32 linear maps.
    fused = fuse(AstroMAE().eval(), precision)
    images, mags = torch.zeros(2, 5, 32, 32), torch.full((2, 5), 18.0)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        fused(images, mags)
    ops = {event.key: event.count for event in prof.key_averages()}
    heads = MAG_LAYERS + 2
    image_branches = DEPTH * 4 + 2 + 2  # per block qkv, proj, fc1, fc2; the ViT and Inception heads
    assert ops.get("mkldnn::_linear_pointwise") == heads + (image_branches if precision == "fp32" else 0)
    if precision == "fp32":
        assert not {"aten::addmm", "aten::mm", "aten::linear"} & set(ops)


def test_a_block_leaves_its_input_alone() -> None:
    # The block adds the PCM's output in place: into its own tensor, never the caller's.
    block = fuse(AstroMAE().eval()).blocks[0]
    x = torch.randn(2, 17, 192)
    before = x.clone()
    with torch.inference_mode():
        out = block(x)
    assert torch.equal(x, before) and not torch.equal(out, x)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 4, 5, 7), (2, 2, 1, 3), (2, 2, 3, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_3x3_is_aten_max_pool_exactly(shape, channels_last) -> None:
    torch.manual_seed(0)
    x = torch.randint(-3, 4, shape).float()  # few values: ties everywhere, and all-negative windows
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pooled = max_pool_3x3(x)
    assert torch.equal(pooled, torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1))
    assert pooled.stride() == x.stride()  # the input's memory format


def test_fuse_refuses_a_model_in_training_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fuse(AstroMAE().train())


def test_bf16_stays_within_5e_3_of_float32_on_the_golden_inputs(golden, golden_model) -> None:
    fp32 = run(fuse(golden_model), golden["images"], golden["magnitudes"])
    bf16 = run(fuse(golden_model, "bf16"), golden["images"], golden["magnitudes"])
    error = np.abs(bf16 - fp32)
    assert 0 < error.max() <= 5e-3  # not zero: bfloat16 really ran
    assert bf16.dtype == np.float32


def test_compiled_bf16_stays_within_5e_3_of_float32_on_the_golden_inputs(golden, golden_model) -> None:
    torch._dynamo.reset()
    fp32 = run(fuse(golden_model), golden["images"], golden["magnitudes"])
    compiled = CompiledModel(fuse(golden_model, "bf16"), batch_size=len(fp32))
    error = np.abs(run(compiled, golden["images"], golden["magnitudes"]) - fp32)
    assert 0 < error.max() <= 5e-3


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        fuse(AstroMAE().eval(), "fp8")


def test_built_from_the_reference_weights_it_reproduces_the_golden_outputs(golden, golden_model) -> None:
    # The weight rule's own tensors, as the reference loaded them: its two names of the stem
    # convolution hold different tensors there, and the one loaded last counts.
    state = reference_weights(golden_model)
    assert not torch.equal(state["inception_model.conv2d_init.weight"], state["inception_model.vis_inception.0.weight"])
    fused = FusedAstroMAE.from_state_dict(state)
    assert not fused.training
    z = run(fused, golden["images"], golden["magnitudes"])
    np.testing.assert_allclose(z, golden["redshift"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(z, run(fuse(golden_model), golden["images"], golden["magnitudes"]))
    assert fused.reference_parameters == 15_902_889


@pytest.mark.parametrize("kept", ["inception_model.conv2d_init", "inception_model.vis_inception.0"])
def test_either_name_of_the_aliased_convolution_is_enough(golden, golden_model, kept) -> None:
    state = golden_model.state_dict()
    for name in ("inception_model.conv2d_init", "inception_model.vis_inception.0"):
        if name != kept:
            del state[f"{name}.weight"], state[f"{name}.bias"]
    z = run(FusedAstroMAE.from_state_dict(state), golden["images"], golden["magnitudes"])
    np.testing.assert_allclose(z, golden["redshift"], atol=1e-4, rtol=0)


def _without(*keys: str):
    def spoil(state: dict) -> None:
        for key in keys:
            del state[key]

    return spoil


def _set(key: str, value: torch.Tensor):
    def spoil(state: dict) -> None:
        state[key] = value

    return spoil


def _prefixed(state: dict) -> None:
    for key in list(state):
        state[f"module.{key}"] = state.pop(key)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_without("blocks.3.mlp.fc1.weight"), r"missing blocks\.3\.mlp\.fc1\.weight$"),
        (_without("blocks.0.PCM.1.num_batches_tracked"), r"missing blocks\.0\.PCM\.1\.num_batches_tracked$"),
        (
            _without(
                *(f"inception_model.{m}.{p}" for m in ("conv2d_init", "vis_inception.0") for p in ("weight", "bias"))
            ),
            r"missing inception_model\.conv2d_init\.bias, inception_model\.conv2d_init\.weight, ",
        ),
        (_set("head.extra", torch.zeros(3)), r"unexpected head\.extra$"),
        (_prefixed, r"missing \S+, \S+, \S+, \S+ and 504 more; unexpected module\.\S+, .* and 504 more$"),
        (_set("head.weight", torch.zeros(10, 10)), r"wrong shape head\.weight \(10, 10\) \(needs \(192, 192\)\)$"),
        (_set("pos_embed", torch.zeros(1, 65, 192)), r"wrong shape pos_embed \(1, 65, 192\) \(needs \(1, 17, 192\)\)"),
        (_set("fc_norm.weight", torch.ones(192, dtype=torch.int64)), r"not floating point fc_norm\.weight$"),
    ],
)
def test_from_state_dict_refuses_weights_that_do_not_fit(golden_model, spoil, message) -> None:
    state = golden_model.state_dict()
    spoil(state)
    with pytest.raises(InputError, match=r"^weights do not fit AstroMAE: " + message):
        FusedAstroMAE.from_state_dict(state)


def test_half_precision_weights_are_used_as_float32(golden, golden_model) -> None:
    state = {k: v.half() if v.is_floating_point() else v for k, v in golden_model.state_dict().items()}
    fused = FusedAstroMAE.from_state_dict(state)
    assert {p.dtype for p in fused.parameters()} | {b.dtype for b in fused.buffers()} == {torch.float32}
    z = run(fused, golden["images"], golden["magnitudes"])
    np.testing.assert_allclose(z, golden["redshift"], atol=5e-2, rtol=0)  # float16 weights: close, not equal


@pytest.mark.parametrize("setting", ["1", "0"])
def test_the_block_profile_times_every_step_of_the_kernels_in_use(setting, monkeypatch) -> None:
    from cai_hpc.bench import block_step_profile, shape_gemm_gflops
    from cai_hpc.fast import kernel_choice

    monkeypatch.setenv("CAI_HPC_NATIVE", setting)  # native kernels (where built), then torch's
    torch.manual_seed(0)
    profile = block_step_profile(fuse(AstroMAE().eval()), batch=2, seconds=0.02)
    linear_maps = ["qkv linear", "proj linear", "fc1 linear+GELU", "fc2 linear"]
    if kernel_choice().kernels is not None:
        others = ["attention", "PCM+residual+norm2", "residual+norm1"]
    else:
        others = ["attention", "PCM, norms, residuals"]
    assert sorted(name for name, _, _ in profile) == sorted(linear_maps + others)
    assert all(ms > 0 for name, ms, _ in profile if name != "PCM, norms, residuals")
    assert all((rate is not None and rate > 0) == (name in linear_maps) for name, _, rate in profile)
    rates = shape_gemm_gflops(rows=34, seconds=0.02)
    assert list(rates) == ["K=192 N=768", "K=768 N=192"]
    assert all(list(paths) == ["oneDNN", "F.linear"] and min(paths.values()) > 0 for paths in rates.values())
