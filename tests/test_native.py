"""The native kernels compute what the fused model's torch code computes, refuse tensors they
were not written for, and are built once per machine and cache, or not at all (then the model
runs on torch's kernels, with the same outputs)."""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cai_hpc import native
from cai_hpc.fast import FusedAstroMAE, fuse, max_pool_3x3
from cai_hpc.model import AstroMAE
from tests.conftest import requires_infra, skip_or_fail

# On a machine with a C++ compiler the kernels must build: a failed build is a defect there.
# Without one these tests skip, or fail under $CAI_HPC_REQUIRE_INFRA (CI installs g++).
HAS_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is not None
NO_COMPILER = "no C++ compiler: the native kernels cannot be built (apt-get install g++)"
needs_compiler = requires_infra(None if HAS_COMPILER else NO_COMPILER)


@pytest.fixture(scope="module")
def kernels() -> native.Kernels:
    if not HAS_COMPILER:
        skip_or_fail(NO_COMPILER)
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
def test_native_and_torch_kernels_give_the_same_redshifts(
    kernels, reference, model, batch, threads, monkeypatch
) -> None:
    monkeypatch.setenv("CAI_HPC_NATIVE", "1")  # the kernels, however fast they measured here
    assert model.kernels_used()[0] == f"native-{kernels.isa}"
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
        gelu_after, _ = block.forward_native(x, block.norm1(x), kernels, following.norm1, gelu_after_gemm=True)
    tolerance = {"atol": 2e-5 * scale, "rtol": 1e-5}
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(last, expected, **tolerance)
    torch.testing.assert_close(gelu_after, expected, **tolerance)
    torch.testing.assert_close(normed, following.norm1(expected), atol=1e-4, rtol=1e-4)
    assert none is None


def test_the_model_runs_fc1s_gelu_where_the_kernel_choice_puts_it(kernels, reference, model, monkeypatch) -> None:
    from cai_hpc import fast

    measured = fast._native_speedup(kernels)  # what decide() records: the speed and the GELU's place
    assert measured.speedup > 0 and isinstance(measured.gelu_after_gemm, bool)
    places = []
    hidden = fast.FusedBlock.hidden
    monkeypatch.setattr(fast.FusedBlock, "hidden", lambda block, *args: places.append(args[1:]) or hidden(block, *args))
    choice = native.Choice(kernels, f"native-{kernels.isa}", "test", gelu_after_gemm=True)
    monkeypatch.setattr(fast, "kernel_choice", lambda: choice)
    torch.manual_seed(6)
    images, mags = torch.randn(3, 5, 32, 32), torch.rand(3, 5) * 6 + 14
    with torch.inference_mode():
        out, expected = model(images, mags), fuse(reference, use_native=False)(images, mags)
    assert places == [(True,)] * len(model.blocks)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


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


# The forms of the kernels this CPU can run, each from a build of its own level.
FORMS = {"x86-64-v4": "avx512", "x86-64-v3": "avx2", "portable": "portable"}


@pytest.fixture(scope="module")
def forms(kernels, tmp_path_factory) -> dict[str, native.Kernels]:
    # The form already loaded (the session's kernels) is not built again.
    levels = [level for level in native.cpu_levels() if level in FORMS and FORMS[level] != kernels.isa]
    built = native.build_ahead(tmp_path_factory.mktemp("forms"), levels)
    loaded = {
        level: native.Kernels(ctypes.CDLL(str(path)), path, level) for level, path in zip(levels, built, strict=True)
    }
    return {next(level for level, isa in FORMS.items() if isa == kernels.isa): kernels, **loaded}


def test_every_form_this_cpu_runs_gives_the_same_outputs(forms, model) -> None:
    # On an AVX-512 CPU: the AVX-512, AVX2 and portable forms; on an AVX2 CPU: the last two.
    assert {level: k.isa for level, k in forms.items()} == {level: FORMS[level] for level in forms}
    assert "portable" in forms
    torch.manual_seed(4)
    block, following = model.blocks[2], model.blocks[3]
    x = torch.randn(3, 17, 192) * 4  # SiLU and softmax inputs out in their tails too
    qkv = torch.randn(2, 17, 576)
    pooled = torch.randint(-3, 4, (2, 19, 6, 5)).float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = block(x)
        for level, kernels in forms.items():
            out, normed = block.forward_native(x, block.norm1(x), kernels, following.norm1)
            torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5, msg=level)
            torch.testing.assert_close(normed, following.norm1(expected), atol=1e-4, rtol=1e-4, msg=level)
            reference = forms["portable"].attention(qkv)
            torch.testing.assert_close(kernels.attention(qkv), reference, atol=1e-5, rtol=1e-5, msg=level)
            assert torch.equal(kernels.max_pool_3x3(pooled), F.max_pool2d(pooled, 3, stride=1, padding=1)), level


def test_the_portable_form_compiles_for_aarch64(tmp_path) -> None:
    # Compile only: the portable loops, and nothing x86 in the code every other CPU gets.
    cross = shutil.which("aarch64-linux-gnu-g++")
    if cross is None:
        skip_or_fail("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    include = Path(torch.__file__).parent / "include"
    flags = [f for f in native._FLAGS if f not in ("-shared",)] + native._torch_flags()
    obj = tmp_path / "native.o"
    subprocess.run([cross, *flags, f"-I{include}", "-c", str(native.SOURCE), "-o", str(obj)], check=True, timeout=300)
    assert obj.read_bytes()[18] == 183  # e_machine: EM_AARCH64


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
    assert sum("native kernels: built" in out for out in outputs) == 1, outputs
    assert len(list(tmp_path.glob("*.so"))) == 1 and not list(tmp_path.glob("*.tmp"))
    again = _load_in_a_process({"CAI_HPC_CACHE": str(tmp_path)}).communicate(timeout=300)[0]
    assert "kernels: True" in again and "built" not in again


@needs_compiler
def test_a_failed_build_is_not_repeated_and_a_damaged_one_is_rebuilt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAI_HPC_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(native.UnavailableError, match="build failed"):
        native._load()
    with pytest.raises(native.UnavailableError, match=r"delete .* to try again"):  # not built again
        native._load()
    monkeypatch.delenv("CXX")
    library = tmp_path / native.library_name(native._wanted_levels()[0], native._compiler_id(("g++",)))
    library.write_bytes(b"not a shared library")  # say, a disk filled up mid-write
    loaded = native._load()
    torch.testing.assert_close(loaded.attention(torch.zeros(1, 17, 576)), torch.zeros(1, 17, 192))
    assert library.read_bytes()[:4] == b"\x7fELF"


def test_a_library_on_another_openmp_runtime_is_refused(tmp_path) -> None:
    # Stand-ins for the entry points, with a thread count that ignores torch's setting, as a
    # build linked to another OpenMP runtime would report.
    if shutil.which("cc") is None:
        skip_or_fail("no C compiler (apt-get install gcc)")
    names = ["cai_attention", "cai_pcm_residual_norm", "cai_add_norm", "cai_max_pool_3x3"]
    source = tmp_path / "other.c"
    source.write_text(
        "".join(f"void {n}(void) {{}}\n" for n in names)
        + 'const char* cai_isa(void) { return "portable"; }\nlong cai_threads(void) { return 99; }\n'
    )
    library = tmp_path / "other.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True, timeout=60)
    with pytest.raises(native.UnavailableError, match="OpenMP runtime is not torch's"):
        native._open(library, "portable")


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
    writable = tmp_path / "group-writable"
    writable.mkdir()
    writable.chmod(0o777)
    monkeypatch.setenv("CAI_HPC_CACHE", str(writable))
    chosen = native._cache_dir()
    assert chosen != writable
    assert chosen.stat().st_uid == os.getuid() and not chosen.stat().st_mode & 0o022
    mine = tmp_path / "mine"
    monkeypatch.setenv("CAI_HPC_CACHE", str(mine))
    assert native._cache_dir() == mine and mine.stat().st_mode & 0o777 == 0o700


def test_infer_with_and_without_native_kernels_predicts_the_same(kernels, small_dataset, tmp_path) -> None:
    # Two real runs of the command line, the second with the kernels turned off.
    from tests.conftest import cai_hpc
    from tests.test_engine import read_predictions

    preds, kernels = [], []
    for name, env in (("native", {"CAI_HPC_NATIVE": "1"}), ("torch", {"CAI_HPC_NATIVE": "0"})):
        out = tmp_path / name
        done = cai_hpc("infer", "-q", "--data", str(small_dataset), "--out", str(out), env={**os.environ, **env})
        assert done.returncode == 0, done.stderr
        summary = json.loads((out / "summary.json").read_text())
        kernels.append({rank["kernels"] for rank in summary["ranks"]})
        preds.append(np.concatenate([f["redshift_pred"] for f in read_predictions(out).values()]))
    assert kernels == [{f"native-{native.kernels().isa}"}, {"torch"}]
    np.testing.assert_allclose(preds[0], preds[1], atol=1e-5, rtol=0)


AVX2_ONLY = "flags : fpu sse2 avx avx2 bmi1 bmi2 f16c fma abm movbe"  # a Zen 3, say
AVX512 = AVX2_ONLY + " avx512f avx512bw avx512cd avx512dq avx512vl"


@pytest.mark.parametrize(
    ("machine", "flags", "levels"),
    [
        ("x86_64", AVX512, ["native", "x86-64-v4", "x86-64-v3", "portable"]),
        ("x86_64", AVX2_ONLY, ["native", "x86-64-v3", "portable"]),
        ("x86_64", AVX2_ONLY.replace(" fma", ""), ["native", "portable"]),  # AVX2 without FMA: not v3
        ("aarch64", "Features : fp asimd", ["native", "portable"]),
    ],
)
def test_the_levels_a_cpu_can_run(monkeypatch, machine, flags, levels) -> None:
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(native, "_cpu_features", lambda: flags)
    assert native.cpu_levels() == levels
    monkeypatch.setenv("CAI_HPC_KERNEL_LEVEL", "x86-64-v3")
    if "x86-64-v3" in levels:
        assert native._wanted_levels() == ["x86-64-v3"]
    else:
        with pytest.raises(native.UnavailableError, match="cannot run"):
            native._wanted_levels()


def test_with_no_compiler_infer_runs_the_kernels_built_ahead_of_time(
    kernels, small_dataset, tmp_path, monkeypatch, caplog
) -> None:
    # build-kernels, as the Lambda image's builder stage runs it; then a machine with no
    # compiler on PATH and an empty cache.
    from tests.conftest import cai_hpc

    level = "x86-64-v3" if "x86-64-v3" in native.cpu_levels() else "portable"
    prebuilt = tmp_path / "kernels"
    done = cai_hpc("build-kernels", "--out", str(prebuilt), "--levels", level)
    assert done.returncode == 0, done.stderr
    assert len(list(prebuilt.glob("*.so"))) == 1
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", "CAI_HPC_KERNEL_LEVEL")}
    env |= {"PATH": os.path.dirname(sys.executable), "CAI_HPC_CACHE": str(tmp_path / "cache")}
    env |= {"CAI_HPC_KERNELS_DIR": str(prebuilt), "CAI_HPC_NATIVE": "1"}
    out = tmp_path / "out"
    done = cai_hpc("infer", "-q", "--data", str(small_dataset), "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    ranks = json.loads((out / "summary.json").read_text())["ranks"]
    assert {rank["kernels"] for rank in ranks} == {f"native-{FORMS[level]}"}, ranks
    monkeypatch.setenv("CAI_HPC_KERNELS_DIR", str(prebuilt))
    assert native._prebuilt_dir() == prebuilt
    prebuilt.chmod(0o777)  # a directory others can write to is not loaded from
    assert native._prebuilt_dir() is None and "others can write to it" in caplog.text


def _failing_flock(code: int):
    def flock(fd, operation):
        raise OSError(code, os.strerror(code))

    return flock


@needs_compiler
def test_where_flock_fails_the_kernels_are_built_without_the_lock(tmp_path, monkeypatch) -> None:
    # Lustre without -o flock: ENOSYS; NFS without a lock daemon: ENOLCK.
    import fcntl

    monkeypatch.setenv("CAI_HPC_CACHE", str(tmp_path))
    monkeypatch.setattr(fcntl, "flock", _failing_flock(errno.ENOSYS))
    loaded = native._load()
    torch.testing.assert_close(loaded.attention(torch.zeros(1, 17, 576)), torch.zeros(1, 17, 192))
    for code in (errno.ENOLCK, errno.EOPNOTSUPP):
        monkeypatch.setattr(fcntl, "flock", _failing_flock(code))
        with native._locked(tmp_path / "x.lock"):
            pass
    monkeypatch.setattr(fcntl, "flock", _failing_flock(errno.EIO))  # a real error stays one
    with pytest.raises(OSError), native._locked(tmp_path / "x.lock"):
        pass


def test_waiting_for_the_lock_backs_off(tmp_path, monkeypatch) -> None:
    import fcntl

    tries = iter(range(12))

    def busy(fd, operation):
        if next(tries) < 11:
            raise BlockingIOError(errno.EWOULDBLOCK, "held")

    waits: list[float] = []
    monkeypatch.setattr(fcntl, "flock", busy)
    monkeypatch.setattr(native.time, "sleep", waits.append)
    with native._locked(tmp_path / "x.lock"):
        pass
    assert len(waits) == 11 and waits[0] < 0.1 and max(waits) <= 2.5, waits
    assert all(later > 1.15 * earlier for earlier, later in itertools.pairwise(waits[:6])), waits  # doubling


def test_a_failed_build_is_retried_later_or_on_another_host(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAI_HPC_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails, at once
    with pytest.raises(native.UnavailableError, match="build failed"):
        native._load()
    (marker,) = tmp_path.glob("*.failed")
    record = json.loads(marker.read_text())
    assert record["host"] == socket.gethostname() and abs(record["time"] - time.time()) < 60
    with pytest.raises(native.UnavailableError, match=rf"on {socket.gethostname()} at .*delete .* to try again"):
        native._load()
    for stale in ({**record, "host": "another-node"}, {**record, "time": time.time() - 2 * native.FAILED_TTL_S}):
        marker.write_text(json.dumps(stale))
        with pytest.raises(native.UnavailableError, match="build failed"):  # tried again
            native._load()


def test_the_kernels_run_only_where_they_measured_at_least_as_fast(kernels, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAI_HPC_CACHE", str(tmp_path))
    monkeypatch.delenv("CAI_HPC_NATIVE", raising=False)
    slower = native.decide(lambda k: native.Measured(0.8, gelu_after_gemm=True))
    assert slower.kernels is None and slower.label == "torch" and "0.80x" in slower.reason

    def never(k):
        raise AssertionError("measured again")

    assert native.decide(never).label == "torch"  # measured once, kept beside the builds
    monkeypatch.setenv("CAI_HPC_NATIVE", "1")
    unmeasured = native.decide(never)
    assert unmeasured.kernels is kernels and not unmeasured.gelu_after_gemm  # GELU inside the GEMM, as before
    monkeypatch.setenv("CAI_HPC_NATIVE", "auto")
    for record in tmp_path.glob("*.choice.json"):
        record.unlink()
    faster = native.decide(lambda k: native.Measured(1.3, gelu_after_gemm=True))
    assert faster.kernels is kernels and faster.label == f"native-{kernels.isa}" and "1.30x" in faster.reason
    assert faster.gelu_after_gemm and "GELU after its GEMM" in faster.reason
    assert native.decide(never).gelu_after_gemm  # the GELU's place is kept with the measurement
    for record in tmp_path.glob("*.choice.json"):
        record.unlink()
    inside = native.decide(lambda k: native.Measured(1.1))
    assert inside.kernels is kernels and not inside.gelu_after_gemm and "GELU inside its GEMM" in inside.reason
    (record,) = tmp_path.glob("*.choice.json")
    record.write_text(json.dumps({"speedup": 1.2, "host": socket.gethostname(), "time": time.time()}))
    again = native.decide(lambda k: native.Measured(1.4, gelu_after_gemm=True))  # a record that never placed it
    assert again.gelu_after_gemm and "1.40x" in again.reason
