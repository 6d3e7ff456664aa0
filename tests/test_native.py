"""The native kernels compute what the fused model's torch code computes, refuse tensors they
were not written for, and are built once per machine and cache, or not at all (then the model
runs on torch's kernels, with the same outputs)."""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cai_hpc import native
from cai_hpc.fast import FusedAstroMAE, fuse, max_pool_3x3
from cai_hpc.model import AstroMAE

# On a machine with a C++ compiler the kernels must build: a failed build is a defect there.
HAS_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is not None
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler: the native kernels cannot be built")


@pytest.fixture(scope="module")
def kernels() -> native.Kernels:
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler: the native kernels cannot be built")
    built = native.kernels()
    assert built is not None, "a C++ compiler is here, but the native kernels did not build (see the log)"
    return built


@pytest.fixture(scope="module")
def reference() -> AstroMAE:
    torch.manual_seed(7)
    model = AstroMAE().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the folded PCM weights are not plain
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def model(reference) -> FusedAstroMAE:
    return fuse(reference)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 3, 33])
def test_native_and_torch_kernels_give_the_same_redshifts(kernels, reference, model, batch, threads) -> None:
    rng = np.random.default_rng(batch)
    images = torch.as_tensor(rng.normal(size=(batch, 5, 32, 32)).astype(np.float32))
    mags = torch.as_tensor(rng.uniform(14, 20, (batch, 5)).astype(np.float32))
    torch_only = fuse(reference, use_native=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            with_native, with_torch = model(images, mags), torch_only(images, mags)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(with_native, with_torch, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_a_native_block_is_the_torch_block(kernels, model, scale) -> None:
    # scale 30: SiLU and softmax inputs far out in their tails (the kernels' exp clamps).
    torch.manual_seed(1)
    block, following = model.blocks[4], model.blocks[5]
    x = torch.randn(5, 17, 192) * scale
    with torch.inference_mode():
        expected = block(x)
        out, normed = block.forward_native(x, block.norm1(x), kernels, following.norm1)
        last, none = block.forward_native(x, block.norm1(x), kernels, None)
    tolerance = {"atol": 2e-5 * scale, "rtol": 1e-5}
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(last, expected, **tolerance)
    torch.testing.assert_close(normed, following.norm1(expected), atol=1e-4, rtol=1e-4)
    assert none is None


def test_attention_is_softmax_of_q_k_times_v(kernels) -> None:
    torch.manual_seed(2)
    qkv = torch.randn(4, 17, 576) * 3  # scores up to ~±100: the row maximum must be taken out

    def attention(qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.reshape(4, 17, 3, 3, 64).permute(2, 0, 3, 1, 4)
        return ((q @ k.transpose(-2, -1)).softmax(dim=-1) @ v).transpose(1, 2).reshape(4, 17, 192)

    exact = attention(qkv.double())
    torch_error = (attention(qkv) - exact).abs().max().item()
    native_error = (kernels.attention(qkv) - exact).abs().max().item()
    assert native_error <= 2 * torch_error + 1e-6, (native_error, torch_error)
    moderate = qkv / 3  # scores of a few units, as in the model
    torch.testing.assert_close(kernels.attention(moderate), attention(moderate), atol=1e-5, rtol=1e-5)


def test_the_pcm_does_not_touch_the_class_token_and_add_norm_adds(kernels, model) -> None:
    torch.manual_seed(3)
    block = model.blocks[0]
    pcm = (block.pcm_w1, block.pcm_b1, block.pcm_w2, block.pcm_b2)
    x, attended = torch.randn(2, 17, 192), torch.randn(2, 17, 192)
    expected_cls = x[:, 0] + attended[:, 0]
    normed = kernels.pcm_residual_norm(x, attended, pcm, block.norm2)
    torch.testing.assert_close(attended[:, 0], expected_cls)
    torch.testing.assert_close(normed, block.norm2(attended), atol=1e-5, rtol=1e-5)
    m, y = torch.randn(3, 17, 192), torch.randn(3, 17, 192)
    total = m + y
    torch.testing.assert_close(kernels.add_norm(m, y, block.norm1), block.norm1(total), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, total)


@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 4, 5, 7), (2, 2, 1, 3), (3, 64, 8, 8)])
def test_native_max_pool_is_aten_max_pool_exactly(kernels, shape) -> None:
    torch.manual_seed(0)
    x = torch.randint(-3, 4, shape).float().contiguous(memory_format=torch.channels_last)
    pooled = kernels.max_pool_3x3(x)
    assert torch.equal(pooled, torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1))
    assert pooled.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool_3x3(x), pooled)
    x[torch.rand(shape) < 0.1] = float("nan")  # NaNs come out of every window they are in
    expected = torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1)
    torch.testing.assert_close(kernels.max_pool_3x3(x), expected, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize(
    "call",
    [
        lambda k: k.attention(torch.zeros(2, 17, 575)),
        lambda k: k.attention(torch.zeros(2, 17, 576, dtype=torch.float64)),
        lambda k: k.attention(torch.zeros(2, 576, 17).transpose(1, 2)),
        lambda k: k.add_norm(torch.zeros(2, 17, 192), torch.zeros(2, 16, 192), torch.nn.LayerNorm(192)),
        lambda k: k.max_pool_3x3(torch.zeros(2, 3, 4, 4)),  # not channels-last
    ],
    ids=["shape", "dtype", "strides", "mismatch", "layout"],
)
def test_tensors_the_kernels_were_not_written_for_are_refused(kernels, call) -> None:
    with pytest.raises(ValueError, match=r"native kernels|channels-last"):
        call(kernels)


def test_the_portable_build_without_avx512_gives_the_same_block(kernels, model, tmp_path) -> None:
    # The AVX-512 code is what runs here; the loops every other CPU runs must agree with it.
    command = native._command(shlex.split(os.environ.get("CXX", "g++")))
    library = tmp_path / "portable.so"
    subprocess.run([*command, "-mno-avx512f", "-o", str(library)], check=True, timeout=300)
    portable = native.Kernels(ctypes.CDLL(str(library)))
    torch.manual_seed(4)
    block = model.blocks[2]
    x = torch.randn(3, 17, 192)
    with torch.inference_mode():
        ours, _ = block.forward_native(x, block.norm1(x), portable, None)
        theirs, _ = block.forward_native(x, block.norm1(x), kernels, None)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


_LOAD = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    from cai_hpc import native
    print("kernels:", native.kernels() is not None)
    """
)


def _load_in_a_process(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _LOAD], env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)


@needs_compiler
def test_one_process_builds_and_the_others_load_its_build(tmp_path) -> None:
    # Three processes start on an empty cache at once, like the ranks of one node.
    procs = [_load_in_a_process({"CAI_HPC_CACHE": str(tmp_path)}) for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and all("kernels: True" in out for out in outputs), outputs
    assert sum("built for this CPU" in out for out in outputs) == 1, outputs
    assert len(list(tmp_path.glob("*.so"))) == 1 and not list(tmp_path.glob("*.tmp"))
    again = _load_in_a_process({"CAI_HPC_CACHE": str(tmp_path)}).communicate(timeout=300)[0]
    assert "kernels: True" in again and "built" not in again


@needs_compiler
def test_a_failed_build_is_not_repeated_and_a_damaged_one_is_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAI_HPC_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(native.UnavailableError, match="build failed"):
        native._load()
    with pytest.raises(native.UnavailableError, match="in an earlier run"):  # not built again
        native._load()
    monkeypatch.delenv("CXX")
    library = tmp_path / f"cai-hpc-native-{native._key(native._command(['g++']))}.so"
    library.write_bytes(b"not a shared library")  # say, a disk filled up mid-write
    loaded = native._load()
    torch.testing.assert_close(loaded.attention(torch.zeros(1, 17, 576)), torch.zeros(1, 17, 192))
    assert library.read_bytes()[:4] == b"\x7fELF"


def test_a_library_on_another_openmp_runtime_is_refused(tmp_path) -> None:
    # Stand-ins for the entry points, with a thread count that ignores torch's setting, as a
    # build linked to another OpenMP runtime would report.
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    names = ["cai_attention", "cai_pcm_residual_norm", "cai_add_norm", "cai_max_pool_3x3"]
    source = tmp_path / "other.c"
    source.write_text("".join(f"void {n}(void) {{}}\n" for n in names) + "long cai_threads(void) { return 99; }\n")
    library = tmp_path / "other.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True, timeout=60)
    with pytest.raises(native.UnavailableError, match="OpenMP runtime is not torch's"):
        native._open(library)


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"CAI_HPC_NATIVE": "0"}, "turned off by CAI_HPC_NATIVE=0"),
        ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
        ({"CXX": "false"}, "build failed"),  # a compiler that fails
    ],
)
def test_without_kernels_the_reason_is_logged_once(env, reason, tmp_path) -> None:
    out = _load_in_a_process({"CAI_HPC_CACHE": str(tmp_path), **env}).communicate(timeout=300)[0]
    assert "kernels: False" in out and out.count(reason) == 1 and "torch's kernels" in out, out
    assert not list(tmp_path.glob("*.so"))


def test_a_cache_directory_others_can_write_is_passed_over(tmp_path, monkeypatch) -> None:
    # The process loads code from the cache: one that someone else could have written to is not used.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("CAI_HPC_CACHE", str(shared))
    chosen = native._cache_dir()
    assert chosen != shared
    assert chosen.stat().st_uid == os.getuid() and not chosen.stat().st_mode & 0o022
    mine = tmp_path / "mine"
    monkeypatch.setenv("CAI_HPC_CACHE", str(mine))
    assert native._cache_dir() == mine and mine.stat().st_mode & 0o777 == 0o700


@needs_compiler
def test_infer_with_and_without_native_kernels_predicts_the_same(small_dataset, tmp_path) -> None:
    # Two real runs of the command line, the second with the kernels turned off.
    from tests.conftest import cai_hpc
    from tests.test_engine import read_predictions

    preds, kernels = [], []
    for name, env in (("native", {}), ("torch", {"CAI_HPC_NATIVE": "0"})):
        out = tmp_path / name
        done = cai_hpc("infer", "-q", "--data", str(small_dataset), "--out", str(out), env={**os.environ, **env})
        assert done.returncode == 0, done.stderr
        summary = json.loads((out / "summary.json").read_text())
        kernels.append({rank["kernels"] for rank in summary["ranks"]})
        preds.append(np.concatenate([f["redshift_pred"] for f in read_predictions(out).values()]))
    assert kernels == [{"native"}, {"torch"}]
    np.testing.assert_allclose(preds[0], preds[1], atol=1e-5, rtol=0)
