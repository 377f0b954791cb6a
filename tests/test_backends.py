"""Network backends: `export --format onnx|openvino` and `predict --backend onnxruntime|openvino`.

A tiny U-Net trained for a few iterations on the shipped hippocampus_mini (fold 0), predicted on the
4 shipped held-out cases (`imagesTs`): the exported network must give torch's labels and its
probabilities to 1e-3 through the same sliding window, TTA and export.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg3d.cli import main
from medseg3d.errors import BackendError, InputError
from medseg3d.inference.backends import OnnxRuntimeNetwork, resolve_backend
from medseg3d.package import MANIFEST
from tests._synth import SHIPPED, run_cli, train_shipped

ort = pytest.importorskip("onnxruntime")
torch.set_num_threads(1)
CASES = sorted(p.name[: -len(".nii.gz")] for p in (SHIPPED / "imagesTs").glob("*.nii.gz"))


cli = run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """WORK_DIR with fold 0 trained (three iterations)."""
    return train_shipped(tmp_path_factory, iterations=3)


@pytest.fixture(scope="module")
def onnx_package(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "model.zip"
    with pytest.raises(SystemExit) as ex:
        main(["export", str(trained), "-o", str(out), "--format", "onnx"])
    assert ex.value.code in (0, None)
    return out


def _predict(model: Path, out: Path, backend: str, capsys, *extra: str) -> Path:
    code, text = cli(["predict", "-m", str(model), "-i", str(SHIPPED / "imagesTs"), "-o", str(out), "--device", "cpu",
                      "--precision", "fp32", "--backend", backend, "--save-probabilities", *extra], capsys)
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def torch_out(onnx_package, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred_torch")
    with pytest.raises(SystemExit) as ex:
        main(["predict", "-m", str(onnx_package), "-i", str(SHIPPED / "imagesTs"), "-o", str(out), "--device", "cpu",
              "--precision", "fp32", "--backend", "torch", "--save-probabilities"])
    assert ex.value.code in (0, None)
    return out


#: Two fp32 implementations of one network round differently (here up to ~1e-5 in probability); a voxel
#: whose two best classes are closer than this in torch's probabilities is a numerical tie either may win.
TIE = 1e-4


def _same_as_torch(out: Path, torch_out: Path) -> float:
    """Asserts the labels of every shipped case equal torch's (except at numerical ties, `TIE`, of which
    there may be a handful in this barely trained network: none allowed elsewhere); returns the largest
    probability difference."""
    import nibabel as nib

    worst = 0.0
    for case in CASES:
        a = np.asarray(nib.load(out / f"{case}.nii.gz").dataobj)
        b = np.asarray(nib.load(torch_out / f"{case}.nii.gz").dataobj)
        pa = np.load(out / f"{case}.npz")["probabilities"]
        pb = np.load(torch_out / f"{case}.npz")["probabilities"]
        top2 = np.sort(pb, axis=0)[-2:]
        differ = a != b
        assert not np.any(differ & (top2[1] - top2[0] > TIE)), f"{case}: labels differ away from a tie"
        assert int(differ.sum()) <= 3, f"{case}: {int(differ.sum())} tie voxels differ"
        worst = max(worst, float(np.abs(pa - pb).max()))
    return worst


def test_export_format_onnx_adds_a_hashed_network_with_dynamic_batch_and_the_plans_patch(onnx_package, trained):
    import hashlib

    import onnx

    with zipfile.ZipFile(onnx_package) as zf:
        manifest = json.loads(zf.read(MANIFEST))
        data = zf.read("fold_0/network.onnx")
    assert manifest["network_formats"] == ["onnx"]
    assert manifest["members"]["fold_0/network.onnx"]["sha256"] == hashlib.sha256(data).hexdigest()
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model)
    dims = [d for d in model.graph.input[0].type.tensor_type.shape.dim]
    patch = json.loads((trained / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"]
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, *patch]
    assert len(model.graph.output) == 1  # no deep-supervision outputs
    assert not any(n.op_type == "GroupNormalization" for n in model.graph.node)  # the plain instance-norm path


def test_onnxruntime_network_takes_any_batch_and_matches_torch(trained):
    from medseg3d.inference.checkpoint import build_model_from_checkpoint, load_checkpoint
    from medseg3d.inference.onnx_export import export_onnx

    net = build_model_from_checkpoint(load_checkpoint(trained / "results/3d_fullres/unet/fold_0/checkpoint_final.pt"))
    patch = (16, 24, 16)  # trained with --patch-size; the network is fully convolutional
    run = OnnxRuntimeNetwork(export_onnx(net, 1, patch), threads=1)
    for batch in (1, 3, 8):
        x = torch.randn(batch, 1, *patch)
        with torch.no_grad():
            ref = net(x)
        got = run(x)
        assert got.shape == ref.shape == (batch, 3, *patch) and got.dtype == torch.float32
        assert float((got - ref).abs().max()) < 1e-4


def test_onnxruntime_labels_equal_torch_on_the_shipped_cases(onnx_package, torch_out, tmp_path, capsys):
    out = _predict(onnx_package, tmp_path / "ort", "onnxruntime", capsys)
    assert _same_as_torch(out, torch_out) < 1e-3


def test_a_work_dir_is_exported_on_the_fly_into_the_cache(trained, torch_out, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = _predict(trained, tmp_path / "wd_ort", "onnxruntime", capsys)
    assert _same_as_torch(out, torch_out) < 1e-3
    cached = list((tmp_path / "cache" / "medseg3d" / "onnx").glob("*.onnx"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    out = _predict(trained, tmp_path / "wd_ort2", "onnxruntime", capsys)  # from the cache, same labels
    assert _same_as_torch(out, torch_out) < 1e-3 and cached[0].stat().st_mtime_ns == stamp


def test_openvino_labels_equal_torch_from_ir_and_from_onnx(trained, onnx_package, torch_out, tmp_path, capsys):
    pytest.importorskip("openvino")
    ir = tmp_path / "ir.zip"
    code, text = cli(["export", str(trained), "-o", str(ir), "--format", "openvino"], capsys)
    assert code == 0 and "networks as openvino" in text, text
    with zipfile.ZipFile(ir) as zf:
        assert {"fold_0/network.xml", "fold_0/network.bin"} <= set(zf.namelist())
        assert "fold_0/network.onnx" not in zf.namelist()
    assert _same_as_torch(_predict(ir, tmp_path / "ov_ir", "openvino", capsys), torch_out) < 1e-3
    assert _same_as_torch(_predict(onnx_package, tmp_path / "ov_onnx", "openvino", capsys), torch_out) < 1e-3


def test_a_package_without_the_network_is_refused_with_the_export_command(trained, tmp_path, capsys):
    plain = tmp_path / "plain.zip"
    code, text = cli(["export", str(trained), "-o", str(plain)], capsys)
    assert code == 0, text
    code, text = cli(["predict", "-m", str(plain), "-i", str(SHIPPED / "imagesTs"), "-o", str(tmp_path / "o"),
                      "--device", "cpu", "--backend", "onnxruntime"], capsys)
    assert code == 2 and "Traceback" not in text, text
    assert "holds no exported network for fold 0" in text and "--format onnx" in text
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    # auto runs on the same package: its default backend exports the network on the fly, as for a WORK_DIR
    code, text = cli(["predict", "-m", str(plain), "-i", str(SHIPPED / "imagesTs"), "-o", str(tmp_path / "a"),
                      "--device", "cpu", "--backend", "auto", "--no-tta"], capsys)
    assert code == 0 and len(list((tmp_path / "a").glob("*.nii.gz"))) == len(CASES), text


def test_backend_choices_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    with pytest.raises(InputError, match="unknown --backend 'onnx'; use one of auto, torch, onnxruntime, openvino"):
        resolve_backend("onnx", torch.device("cpu"), None)
    with pytest.raises(InputError, match="runs on the CPU; pass --device cpu"):
        resolve_backend("onnxruntime", torch.device("cuda"), None)
    assert resolve_backend("auto", torch.device("cuda"), torch.float16) == "torch"
    # bf16 asked for by name: only torch runs it
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, "bf16") == "torch"
    from importlib.util import find_spec

    from medseg3d.inference import backends

    assert backends.CPU_AUTO_ORDER == ()  # OpenVINO measured fastest but held back (a segfault once, see it)
    assert resolve_backend("auto", torch.device("cpu"), None) == "torch"
    assert find_spec("torch") is not None
    monkeypatch.setattr(backends, "CPU_AUTO_ORDER", ("not_installed", "onnxruntime"))
    assert resolve_backend("auto", torch.device("cpu"), None) == "onnxruntime"  # the first installed one
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, "auto") == "onnxruntime"  # fp32 there
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, "bf16") == "torch"
    monkeypatch.setattr(backends, "import_onnxruntime", lambda: (_ for _ in ()).throw(OSError("broken install")))
    assert resolve_backend("auto", torch.device("cpu"), None) == "torch"  # a broken install falls back
    code, text = cli(["export", str(tmp_path), "-o", str(tmp_path / "m.zip"), "--format", "tflite"], capsys)
    assert code == 2 and "--format tflite is not one of onnx, openvino" in text


def test_an_architecture_that_does_not_export_says_so(tmp_path):
    from medseg3d.inference.onnx_export import export_onnx
    from medseg3d.networks import build_network

    kw = {"dims": 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 4,
          "features": [4, 8, 16, 16], "patch_size": [16, 24, 16]}
    net = build_network("segnet", in_channels=1, num_classes=3, **kw)
    with pytest.raises(BackendError, match="cannot be exported to ONNX .*--backend torch"):
        export_onnx(net, 1, kw["patch_size"], name="segnet")


def test_segmenter_runs_the_backend_it_is_given(onnx_package, torch_out):
    """`Segmenter(backend=...)` runs the package's ONNX network as `predict --backend` does: same labels."""
    import nibabel as nib

    from medseg3d import Segmenter

    seg = Segmenter(onnx_package, device="cpu", precision="fp32", backend="onnxruntime")
    assert seg.backend == "onnxruntime" and seg.precision == "fp32"
    case = CASES[0]
    got = np.asarray(seg(SHIPPED / "imagesTs" / f"{case}.nii.gz").dataobj)
    expected = np.asarray(nib.load(torch_out / f"{case}.nii.gz").dataobj)
    assert got.shape == expected.shape and (got != expected).mean() < 1e-3  # ties of a barely trained network
    assert Segmenter(onnx_package, device="cpu").backend == "torch"  # auto: torch (CPU_AUTO_ORDER is empty)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_forked_child_never_destroys_the_parents_sessions(backend):
    """A forked worker (DataLoader, process pool) that garbage-collects a copy of the parent's session
    must not wait for executor threads the fork did not copy: OpenVINO's destructor hung there forever
    (`CPUStreamsExecutor::~CPUStreamsExecutor`), which hung or crashed the test suite."""
    import gc
    import os
    import signal
    import time

    pytest.importorskip(backend)
    from medseg3d.inference.backends import OpenVinoNetwork
    from medseg3d.inference.onnx_export import export_onnx

    small = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.LeakyReLU(),
                                torch.nn.Conv3d(4, 3, 1)).eval()
    onnx = export_onnx(small, 1, (16, 16, 16))
    cls = OnnxRuntimeNetwork if backend == "onnxruntime" else OpenVinoNetwork
    held = [cls(onnx, threads=2)]  # a list: the child drops the only reference, as a collected frame would
    x = torch.randn(2, 1, 16, 16, 16)
    expected = held[0](x)
    pid = os.fork()
    if pid == 0:  # the child: drop its copy and collect, then leave without Python's teardown
        code = 1
        try:
            held.clear()
            gc.collect()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"the forked child hung destroying its copy of the {backend} session")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert torch.equal(held[0](x), expected)  # the parent's session still runs
