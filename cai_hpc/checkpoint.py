"""Model weights: the native safetensors format, and converters from the reference's files.

Inference reads a checkpoint's tensors by name (``read_weights``) and builds the fused model
from them, never the timm-based reference model; only the converters, ``build_model`` and
seeded random weights build ``AstroMAE`` (and so import timm, lazily).

Nothing here executes code from a file. safetensors holds raw tensors only; a plain
state_dict ``.pt`` goes through ``torch.load(weights_only=True)``; the published checkpoint,
a pickled whole ``DataParallel(ViT_Astro)``, goes through an unpickler that maps the
reference's classes onto inert stand-ins and refuses every other global.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
import types
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model

from cai_hpc.errors import InputError
from cai_hpc.fast import checked_weights

if TYPE_CHECKING:
    from cai_hpc.model import AstroMAE

# Module prefixes whose classes may appear in the published checkpoint's pickle: the
# reference's own modules, timm's and torch's layers. All of them become inert stand-ins.
_STAND_IN_MODULES = ("NormalCell", "blocks.", "timm.", "torch.nn.modules.", "torch.nn.parallel.")
# Plain globals torch's own serialisation needs to rebuild tensors and module state.
_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("torch", "Size"),
    ("torch", "device"),
}


def random_weights_label(seed: int) -> str:
    return f"none: seeded random weights (seed {seed}), predictions are not meaningful"


def weights_id(checkpoint: Path | None, seed: int = 0) -> str:
    """What the predictions were made with: a digest of the checkpoint file, or the seed of
    the random weights. A rerun only keeps earlier predictions made with the same weights."""
    if checkpoint is None:
        return f"random-seed-{seed}"
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: no such checkpoint file")
    digest = hashlib.sha256()
    try:
        with checkpoint.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise InputError(f"{checkpoint}: cannot read the checkpoint: {exc.strerror}") from None
    return f"sha256:{digest.hexdigest()}"


def build_model(
    checkpoint: Path | None, seed: int = 0, timings: dict[str, float] | None = None
) -> tuple[AstroMAE, str]:
    """The model in eval mode, and a label for the records: the checkpoint's name, or a
    statement that the weights are random. ``timings`` gets ``build_s`` and ``weights_s``."""
    from cai_hpc.model import AstroMAE

    t0 = time.perf_counter()
    if checkpoint is None:
        torch.manual_seed(seed)
    model = AstroMAE().eval()
    t1 = time.perf_counter()
    if checkpoint is not None:
        load_weights(model, checkpoint)
    if timings is not None:
        timings.update(build_s=t1 - t0, weights_s=time.perf_counter() - t1)
    return model, checkpoint.name if checkpoint is not None else random_weights_label(seed)


def inference_weights(checkpoint: Path | None, seed: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors inference builds its model from, checked strictly, and the label of
    ``build_model``: a checkpoint's tensors as stored, or those of the reference model
    initialised under ``seed`` (the same random weights, and predictions, as ``build_model``)."""
    if checkpoint is not None:
        return read_weights(checkpoint), checkpoint.name
    from cai_hpc.model import AstroMAE  # random weights need the reference model's initialisation

    torch.manual_seed(seed)
    return checked_weights(AstroMAE().eval().state_dict()), random_weights_label(seed)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors checkpoint's tensors, checked like a strict load into AstroMAE (keys and
    shapes), without building a model."""
    _check_checkpoint_path(path)
    try:
        # Copied out of the file's mapping: mapped tensors sit at the file's byte offsets, and
        # on unaligned memory the same matmul may round differently from a model loaded with
        # ``load_weights`` (the copy keeps the predictions bit for bit and costs ~20 ms).
        state = {name: tensor.clone() for name, tensor in load_file(path).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file: {exc}") from None
    try:
        return checked_weights(state)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _check_checkpoint_path(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    if path.suffix != ".safetensors":
        raise InputError(
            f"{path}: checkpoints are read as .safetensors; convert it first with "
            f"'cai-hpc convert-checkpoint {path} {path.with_suffix('.safetensors').name}'"
        )


def load_weights(model: AstroMAE, path: Path) -> None:
    """Load a safetensors checkpoint into the reference model with strict key and shape checking."""
    _check_checkpoint_path(path)
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file: {exc}") from None
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit AstroMAE: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise InputError(
            f"{path}: weights do not fit AstroMAE (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def save_weights(model: AstroMAE, path: Path) -> None:
    """Write safetensors atomically (the two names of the aliased conv are stored once)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_model(model, str(tmp), metadata={"format": "cai-hpc-astromae", "model": "AstroMAE"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert_checkpoint(src: Path, dst: Path) -> int:
    """Convert a reference ``.pt`` (plain state_dict or pickled model) to safetensors.

    Returns the number of tensors loaded; the weights are checked against AstroMAE with
    strict=True before anything is written.
    """
    from cai_hpc.model import AstroMAE

    state = read_reference_checkpoint(src)
    model = AstroMAE()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise InputError(f"{src}: weights do not fit AstroMAE: {' '.join(lines[:2])[:300]}") from None
    save_weights(model, dst)
    return len(state)


def read_reference_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a reference checkpoint, keyed as in ``AstroMAE.state_dict()``."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a torch checkpoint (torch.save zip archive)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = _load_with_stand_ins(path)
    except (RuntimeError, EOFError, OSError) as exc:
        raise InputError(f"{path}: cannot read checkpoint: {str(exc).splitlines()[0]}") from None
    state = _tensors_of(obj)
    if not state:
        raise InputError(f"{path}: no model weights found in this checkpoint")
    return {k.removeprefix("module."): v for k, v in state.items()}


class _StandIn:
    """An inert placeholder for a class from the file: keeps the pickled state, runs nothing.

    It takes any constructor arguments, since pickles rebuild enums and value objects by
    calling their class.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


def _stand_in_unpickler_module() -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose Unpickler only builds stand-ins and tensors."""
    stand_ins: dict[tuple[str, str], type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module = "builtins" if module == "__builtin__" else module  # torch pickles with protocol 2
            if (module, name) in _ALLOWED_GLOBALS:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if module.startswith(_STAND_IN_MODULES) or module in ("NormalCell", "__main__"):
                key = (module, name)
                if key not in stand_ins:
                    stand_ins[key] = type(name, (_StandIn,), {"__module__": "cai_hpc.stand_in"})
                return stand_ins[key]
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    mod = types.ModuleType("cai_hpc_restricted_pickle")
    mod.Unpickler = Unpickler
    mod.load = pickle.load
    mod.__name__ = "pickle"
    return mod


def _load_with_stand_ins(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_stand_in_unpickler_module())
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever an untrusted file makes the decoder raise
        raise InputError(f"{path}: cannot read checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def _tensors_of(obj: Any) -> dict[str, torch.Tensor]:
    """A state_dict found in ``obj``: a mapping of tensors, a {'model': ...} wrapper, or a
    pickled module tree (stand-ins), walked the way ``nn.Module.state_dict`` walks it."""
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj:
                return _tensors_of(obj[key])
        return {}
    if isinstance(obj, _StandIn):
        out: dict[str, torch.Tensor] = {}
        _walk_module(obj, "", out)
        return out
    return {}


def _walk_module(node: _StandIn, prefix: str, out: dict[str, torch.Tensor]) -> None:
    state = node.__dict__.get("_state")
    if not isinstance(state, dict):
        return
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, tensor in (state.get("_parameters") or {}).items():
        if tensor is not None:
            out[prefix + name] = tensor.detach()
    for name, tensor in (state.get("_buffers") or {}).items():
        if tensor is not None and name not in skip:
            out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, _StandIn):
            _walk_module(child, f"{prefix}{name}.", out)
