"""Every user error is one clear message and exit 2, never a traceback: negative worker counts, CUDA
out of memory (saying what to lower), no permission and a full disk (naming the path, nothing
half-written). Tests run as root, where chmod stops nothing, so the failing calls are monkeypatched."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg3d.cli import main
from medseg3d.errors import InputError, OutputError
from medseg3d.fingerprint import parallel_map
from medseg3d.inference import save_checkpoint
from medseg3d.io import atomic
from medseg3d.io.atomic import atomic_path, write_json_atomic
from tests._synth import SHIPPED, plan_shipped, pointwise_model

torch.set_num_threads(1)
IMAGES = SHIPPED / "imagesTs"
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"


def _run(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as ex:
        main(args)
    return ex.value.code, capsys.readouterr().err




@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return plan_shipped(tmp_path_factory)


@pytest.mark.parametrize("command", ["verify", "plan"])
def test_a_negative_worker_count_is_one_message(command, tmp_path, capsys):
    args = [command, str(SHIPPED), "-j", "-1"] + (["-o", str(tmp_path / "wd")] if command == "plan" else [])
    code, err = _run(args, capsys)
    assert code == 2 and "Traceback" not in err
    assert "--workers/-j -1" in err and "0 (automatic)" in err
    assert not (tmp_path / "wd").exists() or not any((tmp_path / "wd").rglob("*"))


def test_parallel_map_is_the_one_check_of_the_worker_count():
    assert parallel_map(abs, [-1, -2], 0, "x") == [1, 2]
    with pytest.raises(InputError, match="-3"):
        parallel_map(abs, [-1, -2], -3, "x")


@pytest.mark.parametrize(("command", "target", "advice"), [
    ("train", "medseg3d.training.train_fold", ("--batch-size", "--patch-size", "--gpu-memory")),
    ("plan", "medseg3d.preprocess.run.plan_and_preprocess", ("--gpu-memory",)),
    ("predict", "medseg3d.inference.folder.predict_folder", ("--batch-size", "--device cpu")),
])
def test_cuda_out_of_memory_says_what_to_lower(command, target, advice, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setattr(target, oom)
    args = {"train": ["train", str(tmp_path)], "plan": ["plan", str(SHIPPED), "-o", str(tmp_path / "wd")],
            "predict": ["predict", "-m", str(tmp_path), "-i", str(IMAGES), "-o", str(tmp_path / "o")]}[command]
    code, err = _run(args, capsys)
    assert code == 2 and "Traceback" not in err
    assert "ran out of memory" in err and all(a in err for a in advice), err
    with pytest.raises(torch.OutOfMemoryError):  # --debug still shows the real error
        main([*args, "--debug"])


def test_the_error_handler_does_not_import_torch():
    code = ("import sys; import medseg3d.cli; from medseg3d.errors import user_error; "
            "assert user_error(ValueError('x'), 'train') is None; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_out_of_memory_in_one_predicted_case_fails_that_case_only(work_dir, tmp_path, capsys, monkeypatch):
    from medseg3d.inference import folder

    real, calls = folder.predict_case, []

    def first_case_runs_out(*args, **kwargs):
        calls.append(kwargs["case"])
        if len(calls) == 1:
            raise torch.OutOfMemoryError(OOM)
        return real(*args, **kwargs)

    monkeypatch.setattr(folder, "predict_case", first_case_runs_out)
    monkeypatch.setattr(folder, "load_fold_models", lambda *a, **k: [pointwise_model()])
    code, err = _run(["predict", "-m", str(work_dir), "-i", str(IMAGES), "-o", str(tmp_path / "o"), "--no-tta"], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"case {calls[0]}" in err and "ran out of memory" in err and "--batch-size" in err and "1 of 4" in err
    assert len(list((tmp_path / "o").iterdir())) == 3


def test_a_full_disk_in_an_atomic_write_names_the_path_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "plans.json"
    target.write_text("old")
    with pytest.raises(OutputError, match="no space left") as err, atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(target) in str(err.value) and "nothing half-written" in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["plans.json"] and target.read_text() == "old"


def test_no_permission_on_the_output_folder_names_the_target(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".plans.abc.json"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="permission denied") as err:
        write_json_atomic(tmp_path / "plans.json", {"a": 1})
    assert f"cannot write {tmp_path / 'plans.json'}" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_on_a_full_disk_is_one_message(tmp_path, monkeypatch):
    """torch.save's zip writer reports a full disk as RuntimeError: recognised by the free space left."""
    path = tmp_path / "fold_0" / "checkpoint_latest.pt"
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 4096)
    real_save = torch.save

    def save_until_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(OutputError, match="no space left") as err:
        save_checkpoint(path, {"model": {}})
    assert str(path) in str(err.value) and not any(path.parent.iterdir())
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 1 << 40)  # room left: the error is not the disk's
    with pytest.raises(RuntimeError, match="enforce fail"):
        save_checkpoint(path, {"model": {}})


def test_a_full_disk_reported_without_errno_is_recognised(tmp_path, monkeypatch):
    """numpy's tofile on a full disk: `OSError: 71208 requested and 8128 written`, errno None (seen on a
    256 kB tmpfs); with the disk full it is the full-disk message, with room left the error itself."""
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 0)
    with pytest.raises(OutputError, match="no space left"), atomic_path(tmp_path / "c.npy") as tmp:
        tmp.write_bytes(b"12")
        raise OSError("71208 requested and 8128 written")
    assert not any(tmp_path.iterdir())
    monkeypatch.setattr(atomic, "_free_bytes", lambda folder: 1 << 40)
    with pytest.raises(OSError, match="requested"), atomic_path(tmp_path / "c.npy"):
        raise OSError("71208 requested and 8128 written")


def test_predict_on_a_full_disk_stops_with_one_message_and_no_partial_file(work_dir, tmp_path, capsys, monkeypatch):
    from medseg3d.inference import folder

    monkeypatch.setattr(folder, "load_fold_models", lambda *a, **k: [pointwise_model()])
    tried = []

    def full(fd):
        tried.append(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "o"
    code, err = _run(["predict", "-m", str(work_dir), "-i", str(IMAGES), "-o", str(out), "--no-tta"], capsys)
    assert code == 2 and "Traceback" not in err
    first = min(IMAGES.glob("*.nii.gz")).name
    assert f"cannot write {out / first}: no space left" in err
    assert len(tried) == 1 and not any(out.iterdir())  # stopped at the first write; no temporary file left


def test_plan_on_a_full_disk_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    real_replace, written = os.replace, []

    def replace_until_full(src, dst):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_until_full)
    code, err = _run(["plan", str(SHIPPED), "-o", str(tmp_path / "wd"), "-j", "1"], capsys)
    assert code == 2 and "Traceback" not in err and "no space left" in err
    leftovers = [p for p in (tmp_path / "wd").rglob(".*") if p.is_file() and p.name != ".cache_key.json"]
    assert len(written) == 2 and not leftovers


def test_an_os_error_outside_atomic_writes_is_one_message(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/case_001.nii.gz")

    monkeypatch.setattr("medseg3d.inference.folder.predict_folder", refuse)
    code, err = _run(["predict", "-m", str(tmp_path), "-i", str(IMAGES), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "Traceback" not in err
    assert "cannot access /data/case_001.nii.gz: permission denied" in err


def test_a_real_bug_still_shows_its_traceback(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr("medseg3d.inference.folder.predict_folder", bug)
    with pytest.raises(ZeroDivisionError):
        main(["predict", "-m", str(tmp_path), "-i", str(IMAGES), "-o", str(tmp_path / "o")])


def test_probabilities_on_a_full_disk_leave_no_partial_npz(tmp_path, monkeypatch):
    from medseg3d.inference.writer import write_probabilities

    real = np.savez

    def savez_then_full(fh, **arrays):
        real(fh, **arrays)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", savez_then_full)
    with pytest.raises(OutputError, match="case_1.npz"):
        write_probabilities(np.zeros((2, 3, 3, 3), np.float32), tmp_path / "case_1.npz", overwrite=True)
    assert not any(tmp_path.iterdir())
