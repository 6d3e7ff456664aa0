"""Checkpoints: safetensors round trip and the converters, none of which runs code from a file."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import Mlp, PatchEmbed

from cai_hpc import model as m
from cai_hpc.checkpoint import (
    build_model,
    convert_checkpoint,
    inference_weights,
    load_weights,
    read_weights,
    save_weights,
)
from cai_hpc.errors import InputError
from cai_hpc.fast import FusedAstroMAE, fuse
from tests.conftest import cai_hpc

# Where the reference's classes live, as its pickle names them.
REFERENCE_CLASSES = {
    m.AstroMAE: ("blocks.model_vit_inception", "ViT_Astro"),
    m.PcmBlock: ("NormalCell", "NormalCell"),
    m.Attention: ("NormalCell", "Attention"),
    m.InceptionMagnitude: ("blocks.photoz", "Input_Mix_Model"),
    m.InceptionBlock: ("blocks.photoz", "InceptionBlock"),
    m.ConvBlock: ("blocks.photoz", "ConvBlock"),
    Mlp: ("timm.models.layers.mlp", "Mlp"),
    PatchEmbed: ("timm.models.layers.patch_embed", "PatchEmbed"),
}


def outputs(model: torch.nn.Module, golden: dict) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(golden["images"]), torch.from_numpy(golden["magnitudes"])).numpy()


def pickle_like_the_reference(golden_model: m.AstroMAE, path: Path) -> None:
    """torch.save a whole DataParallel model whose classes carry the reference's module names.

    The stand-in modules exist only while saving, so loading cannot import them.
    """
    modules: dict[str, types.ModuleType] = {"blocks": types.ModuleType("blocks")}
    renamed: dict[type, type] = {}
    for cls, (module_name, name) in REFERENCE_CLASSES.items():
        module = modules.setdefault(module_name, types.ModuleType(module_name))
        renamed[cls] = type(name, (cls,), {"__module__": module_name, "__qualname__": name})
        setattr(module, name, renamed[cls])
    clone = m.AstroMAE()
    clone.load_state_dict(golden_model.state_dict())
    for sub in clone.modules():
        if type(sub) in renamed:
            sub.__class__ = renamed[type(sub)]
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        torch.save(torch.nn.DataParallel(clone.eval()), path)
    finally:
        for k, old in saved.items():
            if old is None:
                sys.modules.pop(k)
            else:
                sys.modules[k] = old


def test_safetensors_round_trip_gives_the_same_outputs(tmp_path, golden, golden_model) -> None:
    save_weights(golden_model, tmp_path / "w.safetensors")
    model, label = build_model(tmp_path / "w.safetensors")
    assert label == "w.safetensors"
    np.testing.assert_array_equal(outputs(model, golden), outputs(golden_model, golden))


def test_plain_state_dict_converts(tmp_path, golden, golden_model) -> None:
    torch.save(golden_model.state_dict(), tmp_path / "sd.pt")
    assert (
        convert_checkpoint(tmp_path / "sd.pt", tmp_path / "w.safetensors") == 508
    )  # every key of the reference state_dict
    model, _ = build_model(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(outputs(model, golden), outputs(golden_model, golden))


def test_pickled_reference_model_converts_without_importing_its_classes(tmp_path, golden, golden_model) -> None:
    pickle_like_the_reference(golden_model, tmp_path / "published.pt")
    assert not {"blocks", "blocks.photoz", "NormalCell"} & set(sys.modules)
    # The plain loader refuses it: it is not a weights-only file.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "published.pt", weights_only=True)
    result = cai_hpc("convert-checkpoint", str(tmp_path / "published.pt"), str(tmp_path / "w.safetensors"))
    assert result.returncode == 0, result.stderr
    model, _ = build_model(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(outputs(model, golden), outputs(golden_model, golden))


class Exploit:
    """Unpickling this would create a file: the converter must refuse it instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model": Exploit(marker)}, tmp_path / "evil.pt")
    result = cai_hpc("convert-checkpoint", str(tmp_path / "evil.pt"), str(tmp_path / "w.safetensors"))
    assert result.returncode == 2
    assert "evil.pt: refusing to load global" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    assert not (tmp_path / "w.safetensors").exists()


def test_weights_of_the_wrong_model_are_refused_with_one_line(tmp_path, golden_model) -> None:
    state = golden_model.state_dict()
    state["head.weight"] = torch.zeros(10, 10)
    torch.save(state, tmp_path / "bad.pt")
    result = cai_hpc("convert-checkpoint", str(tmp_path / "bad.pt"), str(tmp_path / "w.safetensors"))
    assert result.returncode == 2
    assert "bad.pt: weights do not fit AstroMAE" in result.stderr
    assert "head.weight" in result.stderr
    assert not (tmp_path / "w.safetensors").exists()


def test_non_safetensors_checkpoint_for_inference_says_how_to_convert(tmp_path) -> None:
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="convert-checkpoint"):
        load_weights(m.AstroMAE(), tmp_path / "w.pt")


def test_truncated_safetensors_is_an_input_error(tmp_path, golden_model) -> None:
    save_weights(golden_model, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.safetensors"):
        load_weights(m.AstroMAE(), tmp_path / "cut.safetensors")


def test_no_checkpoint_means_seeded_random_weights_and_says_so(golden) -> None:
    a, label = build_model(None, seed=3)
    b, _ = build_model(None, seed=3)
    assert "random weights" in label
    np.testing.assert_array_equal(outputs(a, golden), outputs(b, golden))


def test_inference_reads_a_checkpoint_into_the_fused_model(tmp_path, golden, golden_model) -> None:
    save_weights(golden_model, tmp_path / "w.safetensors")
    state, label = inference_weights(tmp_path / "w.safetensors")
    assert label == "w.safetensors" and len(state) == 508  # the file stores the aliased conv once
    np.testing.assert_allclose(outputs(FusedAstroMAE.from_state_dict(state), golden), golden["redshift"], atol=1e-4)


def test_inference_with_random_weights_uses_the_reference_models_initialisation(golden) -> None:
    state, label = inference_weights(None, seed=3)
    model, same_label = build_model(None, seed=3)
    assert label == same_label
    np.testing.assert_array_equal(outputs(FusedAstroMAE.from_state_dict(state), golden), outputs(fuse(model), golden))


def test_a_checkpoint_of_other_weights_is_refused_naming_the_file_and_the_keys(tmp_path, golden_model) -> None:
    state = {k: v.contiguous() for k, v in golden_model.state_dict().items() if not k.startswith("vit_block.2.")}
    state["extra.weight"] = torch.zeros(2)
    save_file({k: v for k, v in state.items() if "conv2d_init" not in k}, tmp_path / "other.safetensors")
    with pytest.raises(InputError) as info:
        read_weights(tmp_path / "other.safetensors")
    assert str(info.value) == (
        f"{tmp_path / 'other.safetensors'}: weights do not fit AstroMAE: "
        "missing vit_block.2.bias, vit_block.2.weight; unexpected extra.weight"
    )


def test_a_truncated_checkpoint_is_refused_for_inference(tmp_path, golden_model) -> None:
    save_weights(golden_model, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.safetensors: not a readable safetensors file"):
        read_weights(tmp_path / "cut.safetensors")
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="convert-checkpoint"):
        read_weights(tmp_path / "w.pt")
