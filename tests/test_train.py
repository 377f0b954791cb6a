"""Training on the shipped hippocampus_mini with a tiny network and patch (CPU, fp32 for speed)."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medseg3d.cli import main
from medseg3d.errors import ConfigError
from medseg3d.training.config import TrainConfig, check_patch_size
from medseg3d.training.trainer import poly_lr, train_fold

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[1] / "medseg3d" / "resources" / "hippocampus_mini"
TINY = ["--patch-size", "16,24,16", "--features", "4,8,16,16", "--batch-size", "2", "--no-amp", "--val-iterations",
        "2", "--no-val-tta"]


def cli(argv: list[str]) -> int:
    """Exit code of `medseg3d ARGV` run in-process."""
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("work")
    assert cli(["plan", str(DATA), "-o", str(wd)]) == 0
    return wd


def _copy(planned: Path, tmp_path: Path) -> Path:
    wd = tmp_path / "work"
    shutil.copytree(planned, wd)
    return wd


def _rows(fold_dir: Path) -> list[dict]:
    with open(fold_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def test_two_epochs_write_every_artefact(planned, tmp_path):
    wd = _copy(planned, tmp_path)
    rc = cli(["train", str(wd), "--fold", "0", "--epochs", "2", "--iterations-per-epoch", "3", "--num-workers", "1",
               *TINY])
    assert rc == 0
    fd = wd / "results" / "3d_fullres" / "unet" / "fold_0"
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "training_log.txt",
                 "metrics.csv", "progress.png"):
        assert (fd / name).stat().st_size > 0, name
    assert (fd / "progress.png").read_bytes()[:4] == b"\x89PNG"
    rows = _rows(fd)
    assert [r["epoch"] for r in rows] == ["0", "1"]
    for col in ("train_loss", "val_loss", "lr", "epoch_time_s", "data_wait_fraction", "pseudo_dice_Anterior",
                "pseudo_dice_Posterior"):
        assert rows[0][col] != "", col
    assert 0 <= float(rows[1]["data_wait_fraction"]) <= 1
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]) == pytest.approx(0.01)
    splits = json.loads((wd / "splits.json").read_text())
    summary = json.loads((fd / "validation" / "summary.json").read_text())
    assert sorted(c["case"] for c in summary["cases"]) == sorted(splits[0]["val"])
    assert set(summary["mean_dice"]) == {"1", "2"}
    assert len(list((fd / "validation").glob("*.nii.gz"))) == len(splits[0]["val"])
    ckpt = torch.load(fd / "checkpoint_final.pt", weights_only=False)
    plan_hash = __import__("medseg3d.plans", fromlist=["Plans"]).Plans.load(wd / "plans.json").network_hash("3d_fullres")
    assert ckpt["plan_hash"] == plan_hash and ckpt["epoch"] == 2 and ckpt["network_kwargs"]["features"] == [4, 8, 16, 16]
    assert "epoch 2/2" in (fd / "training_log.txt").read_text()
    # a second run without --resume refuses to overwrite the fold
    assert cli(["train", str(wd), "--fold", "0", "--epochs", "2", "--iterations-per-epoch", "1", *TINY]) == 2


def test_2d_configuration_trains_on_slices(planned, tmp_path):
    wd = _copy(planned, tmp_path)
    tc = TrainConfig(epochs=1, iterations_per_epoch=2, val_iterations=1, patch_size=(16, 24), batch_size=4,
                     features=[4, 8, 16, 16], amp=False, num_workers=0, final_validation=False)
    fd = train_fold(wd, "2d", "all", tc)
    assert fd.name == "fold_all"
    ckpt = torch.load(fd / "checkpoint_final.pt", weights_only=False)
    assert ckpt["network_kwargs"]["dims"] == 2
    assert len(_rows(fd)) == 1


def test_early_stopping_follows_the_measured_validation_pseudo_dice(planned, tmp_path):
    """Stopping is decided by the EMA of the pseudo-Dice measured on validation patches, as metrics.csv shows."""
    wd = _copy(planned, tmp_path)
    tc = TrainConfig(epochs=10, iterations_per_epoch=1, val_iterations=2, patch_size=(16, 24, 16), batch_size=2,
                     features=[4, 8, 16, 16], amp=False, num_workers=0, early_stopping=2, final_validation=False,
                     lr=1e-6)
    fd = train_fold(wd, "3d_fullres", 1, tc)
    rows = _rows(fd)
    ema = [float(r["ema_pseudo_dice"]) for r in rows]  # every epoch measured a pseudo-Dice (never empty)
    assert all(r["mean_pseudo_dice"] != "" for r in rows)
    # replay the rule on the recorded signal: stop once 2 epochs in a row bring no new best EMA
    best, since, stop_after = -1.0, 0, None
    for i, e in enumerate(ema):
        best, since = (e, 0) if e > best else (best, since + 1)
        if since >= 2:
            stop_after = i + 1
            break
    assert stop_after is not None and len(rows) == stop_after < 10
    final = torch.load(fd / "checkpoint_final.pt", weights_only=True)
    assert final["run_state"]["stopped_early"] and final["run_state"]["best_ema"] == pytest.approx(max(ema))
    best_ckpt = torch.load(fd / "checkpoint_best.pt", weights_only=True)
    assert best_ckpt["epoch"] == ema.index(max(ema)) + 1


def test_early_stopping_without_a_validation_signal_is_refused(planned, tmp_path, capsys):
    with pytest.raises(ConfigError, match="needs a validation signal"):
        TrainConfig(val_iterations=0, early_stopping=3)
    wd = _copy(planned, tmp_path)
    assert cli(["train", str(wd), "--fold", "0", "--epochs", "2", "--iterations-per-epoch", "1", *TINY,
                "--val-iterations", "0", "--early-stopping", "2"]) == 2
    err = capsys.readouterr().err
    assert "--val-iterations 0 measures no pseudo-Dice" in err and "Traceback" not in err
    assert not (wd / "results").exists()


def test_without_validation_the_best_checkpoint_is_the_final_one(planned, tmp_path):
    wd = _copy(planned, tmp_path)
    tc = TrainConfig(epochs=2, iterations_per_epoch=1, val_iterations=0, patch_size=(16, 24, 16), batch_size=2,
                     features=[4, 8, 16, 16], amp=False, num_workers=0, final_validation=False)
    fd = train_fold(wd, "3d_fullres", 1, tc)
    best = torch.load(fd / "checkpoint_best.pt", weights_only=True)
    final = torch.load(fd / "checkpoint_final.pt", weights_only=True)
    assert best["epoch"] == final["epoch"] == 2
    assert all(torch.equal(best["model"][k], v) for k, v in final["model"].items())
    assert "checkpoint_best.pt holds the final weights" in (fd / "training_log.txt").read_text()


def test_time_budget_sizes_the_run(planned, tmp_path):
    wd = _copy(planned, tmp_path)
    tc = TrainConfig(epochs=50, iterations_per_epoch=1, val_iterations=1, patch_size=(16, 24, 16), batch_size=2,
                     features=[4, 8, 16, 16], amp=False, num_workers=0, time_budget_s=0.01, final_validation=False)
    fd = train_fold(wd, "3d_fullres", 2, tc)
    assert len(_rows(fd)) == 1 and tc.epochs == 50
    assert torch.load(fd / "checkpoint_final.pt", weights_only=False)["epoch"] == 1


def test_poly_schedule():
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)


def test_sigkill_mid_epoch_then_resume_finishes(planned, tmp_path):
    wd = _copy(planned, tmp_path)
    fd = wd / "results" / "3d_fullres" / "unet" / "fold_0"
    args = [sys.executable, "-m", "medseg3d", "train", str(wd), "--fold", "0", "--epochs", "4",
            "--iterations-per-epoch", "6", "--num-workers", "1", "--no-final-validation", *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (fd / "metrics.csv").exists() and len(_rows(fd)) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.3)  # into the next epoch
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the killed trainer's own data worker
        except ProcessLookupError:
            pass
    done = torch.load(fd / "checkpoint_latest.pt", weights_only=False)["epoch"]
    assert 1 <= done < 4
    assert not (fd / "checkpoint_final.pt").exists()
    rc = cli(["train", str(wd), "--fold", "0", "--epochs", "4", "--iterations-per-epoch", "6", "--num-workers", "0",
               "--no-final-validation", "--resume", *TINY])
    assert rc == 0
    assert [r["epoch"] for r in _rows(fd)] == ["0", "1", "2", "3"]
    assert torch.load(fd / "checkpoint_final.pt", weights_only=False)["epoch"] == 4


def test_corrupt_checkpoint_and_other_plan_are_refused(planned, tmp_path, capsys):
    wd = _copy(planned, tmp_path)
    base = ["train", str(wd), "--fold", "0", "--epochs", "2", "--iterations-per-epoch", "1", "--num-workers", "0",
            "--no-final-validation", *TINY]
    assert cli([*base[:5], "1", *base[6:]]) == 0  # one epoch
    latest = wd / "results" / "3d_fullres" / "unet" / "fold_0" / "checkpoint_latest.pt"
    good = latest.read_bytes()
    latest.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    assert cli([*base, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and "checkpoint_latest.pt" in err
    latest.write_bytes(good)
    plans = json.loads((wd / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["normalization"][0]["scheme"] = "none"
    (wd / "plans.json").write_text(json.dumps(plans))
    assert cli([*base, "--resume"]) == 2
    assert "another plan" in capsys.readouterr().err


def test_adamw_trains_resumes_and_refuses_the_other_optimizer(planned, tmp_path, capsys):
    wd = _copy(planned, tmp_path)
    base = ["train", str(wd), "--fold", "0", "--iterations-per-epoch", "2", "--num-workers", "0",
            "--no-final-validation", "--lr", "0.001", *TINY]
    assert cli([*base, "--epochs", "1", "--optimizer", "adamw"]) == 0
    fd = wd / "results" / "3d_fullres" / "unet" / "fold_0"
    ckpt = torch.load(fd / "checkpoint_latest.pt", weights_only=False)
    assert "exp_avg" in next(iter(ckpt["optimizer"]["state"].values()))  # AdamW's moments were saved
    capsys.readouterr()
    assert cli([*base, "--epochs", "2", "--resume"]) == 2  # default sgd against an adamw checkpoint
    assert "--optimizer adamw" in capsys.readouterr().err
    assert cli([*base, "--epochs", "2", "--resume", "--optimizer", "adamw"]) == 0
    assert torch.load(fd / "checkpoint_final.pt", weights_only=False)["epoch"] == 2
    assert cli([*base, "--epochs", "1", "--optimizer", "adam"]) == 2
    assert "--optimizer must be one of sgd, adamw" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(planned, tmp_path):
    wd = _copy(planned, tmp_path)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
            "-m", "medseg3d", "train", str(wd), "--fold", "0", "--epochs", "1", "--iterations-per-epoch", "2",
            "--num-workers", "0", "--device", "cpu", "--no-final-validation", *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    fd = wd / "results" / "3d_fullres" / "unet" / "fold_0"
    assert len(_rows(fd)) == 1
    ckpt = torch.load(fd / "checkpoint_final.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and not any(k.startswith("module.") for k in ckpt["model"])


def test_cpu_fp32_defaults_channels_last_and_compile_only_for_long_3d_runs():
    from medseg3d.training.runtime import COMPILE_MIN_ITERATIONS, use_channels_last, use_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    short = TrainConfig(epochs=2, iterations_per_epoch=3)
    long = TrainConfig(epochs=1000, iterations_per_epoch=250)
    assert use_channels_last(short, cpu, 3, None) and not use_channels_last(short, cpu, 3, torch.bfloat16)
    assert not use_channels_last(short, cpu, 2, None) and not use_channels_last(short, cuda, 3, None)
    assert short.epochs * short.iterations_per_epoch < COMPILE_MIN_ITERATIONS
    assert not use_compile(short, cpu, 3, None)
    has_cxx = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    assert use_compile(long, cpu, 3, None) == has_cxx
    assert not use_compile(long, cpu, 3, torch.bfloat16) and not use_compile(long, cpu, 2, None)
    assert not use_compile(long, cuda, 3, torch.bfloat16)
    forced = TrainConfig(epochs=1, iterations_per_epoch=1, compile=True, channels_last=False)
    assert use_compile(forced, cpu, 2, None) and not use_channels_last(forced, cpu, 3, None)


def test_a_failing_torch_compile_falls_back_to_eager(planned, tmp_path, monkeypatch):
    """A compiler that fails on the first step (no C++ toolchain, an inductor bug) costs a warning, not the run."""

    class Broken(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            raise RuntimeError("InductorError: C++ compile error (simulated)")

    monkeypatch.setattr(torch, "compile", lambda net, **kw: Broken(net))
    wd = _copy(planned, tmp_path)
    tc = TrainConfig(epochs=1, iterations_per_epoch=2, val_iterations=1, patch_size=(16, 24, 16), batch_size=2,
                     features=[4, 8, 16, 16], amp=False, num_workers=0, final_validation=False, compile=True)
    fd = train_fold(wd, "3d_fullres", 3, tc)
    log = (fd / "training_log.txt").read_text()
    assert "torch.compile failed (RuntimeError: InductorError" in log and "channels-last on, torch.compile on" in log
    assert len(_rows(fd)) == 1 and float(_rows(fd)[0]["train_loss"]) > 0
    # the checkpoints record what really ran: eager after the fallback
    assert torch.load(fd / "checkpoint_final.pt", weights_only=True)["runtime"]["compile"] is False


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="no C++ compiler for inductor")
def test_compiled_channels_last_training_runs_and_resumes(planned, tmp_path):
    """The real torch.compile (inductor, CPU) on a tiny network: trains, checkpoints, resumes, predicts."""
    wd = _copy(planned, tmp_path)
    common = ["train", str(wd), "--fold", "0", "--iterations-per-epoch", "2", "--num-workers", "0", "--compile",
              "--no-final-validation", *TINY]
    assert cli([*common, "--epochs", "1"]) == 0
    fd = wd / "results" / "3d_fullres" / "unet" / "fold_0"
    assert cli([*common, "--epochs", "2", "--resume"]) == 0
    log = (fd / "training_log.txt").read_text()
    assert "channels-last on, torch.compile on" in log and "torch.compile failed" not in log
    assert [r["epoch"] for r in _rows(fd)] == ["0", "1"]
    sd = torch.load(fd / "checkpoint_final.pt", weights_only=False)["model"]
    assert not any(k.startswith("_orig_mod") for k in sd)


def test_default_workers_one_on_cpu_nnunet_12_per_gpu_within_the_cores():
    from medseg3d.training.runtime import default_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_workers(cpu, cpus=64) == 1
    assert default_workers(cuda, cpus=64, gpus_here=1) == 12
    assert default_workers(cuda, cpus=16, gpus_here=1) == 12
    assert default_workers(cuda, cpus=32, gpus_here=4) == 7
    assert default_workers(cuda, cpus=2, gpus_here=1) == 1


def test_a_failure_after_the_first_compiled_step_is_not_hidden(planned, tmp_path, monkeypatch):
    """Only the compiled model's first step may fall back to eager; a later error stops the run."""

    class FailsLater(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.calls = net, 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("a real error on step 2")
            return self.net(x)

    monkeypatch.setattr(torch, "compile", lambda net, **kw: FailsLater(net))
    wd = _copy(planned, tmp_path)
    tc = TrainConfig(epochs=1, iterations_per_epoch=3, val_iterations=1, patch_size=(16, 24, 16), batch_size=2,
                     features=[4, 8, 16, 16], amp=False, num_workers=0, final_validation=False, compile=True)
    with pytest.raises(RuntimeError, match="a real error on step 2"):
        train_fold(wd, "3d_fullres", 4, tc)


def test_fold_all_trains_with_fewer_cases_than_folds(planned, tmp_path, capsys):
    """3 labelled cases cannot make 5 folds, and the message recommends --fold all: which must then work."""
    wd = _copy(planned, tmp_path)
    for d in (wd / "preprocessed").iterdir():
        for p in sorted(d.glob("hippocampus_*.json"))[3:]:
            p.unlink()  # the case is no longer in the cache
    assert len(list((wd / "preprocessed" / "3d_fullres").glob("hippocampus_*.json"))) == 3
    base = ["train", str(wd), "--epochs", "1", "--iterations-per-epoch", "1", "--num-workers", "0",
            "--no-final-validation", *TINY]
    capsys.readouterr()
    assert cli([*base, "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert "3 cases cannot be split into 5 folds" in err and "--fold all" in err
    assert cli([*base, "--fold", "all"]) == 0, capsys.readouterr().err
    fd = wd / "results" / "3d_fullres" / "unet" / "fold_all"
    assert len(_rows(fd)) == 1 and (fd / "checkpoint_final.pt").is_file()
    assert not (wd / "splits.json").exists()


def test_checkpoint_records_and_log_prints_the_resolved_runtime(planned, tmp_path):
    wd = _copy(planned, tmp_path)
    tc = TrainConfig(epochs=1, iterations_per_epoch=1, val_iterations=1, patch_size=(16, 24, 16), batch_size=2,
                     features=[4, 8, 16, 16], amp=False, num_workers=0, final_validation=False, device="cpu")
    fd = train_fold(wd, "3d_fullres", 2, tc)
    want = {"device": "cpu", "precision": "fp32", "channels_last": True, "compile": False, "workers": 0,
            "world_size": 1}
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt"):
        assert torch.load(fd / name, weights_only=True)["runtime"] == want, name
    assert "runtime: device cpu, fp32, channels-last on, torch.compile off, 0 data workers" in \
        (fd / "training_log.txt").read_text()


def test_resume_with_other_features_says_what_differs(planned, tmp_path, capsys):
    wd = _copy(planned, tmp_path)
    base = ["train", str(wd), "--fold", "0", "--iterations-per-epoch", "1", "--num-workers", "0",
            "--no-final-validation", *TINY]
    assert cli([*base, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert cli([*base, "--epochs", "2", "--resume", "--features", "8,8,16,16"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "features: checkpoint [4, 8, 16, 16], this run [8, 8, 16, 16]" in err
    assert "resume with --features 4,8,16,16" in err and "Traceback" not in err
    fd = wd / "results" / "3d_fullres" / "unet" / "fold_0"
    assert torch.load(fd / "checkpoint_latest.pt", weights_only=True)["epoch"] == 1  # untouched


def test_a_patch_the_strides_do_not_divide_is_refused_before_anything_runs(planned, tmp_path, capsys):
    wd = _copy(planned, tmp_path)
    capsys.readouterr()
    rc = cli(["train", str(wd), "--fold", "0", "--epochs", "1", "--iterations-per-epoch", "1", "--num-workers", "0",
              *TINY, "--patch-size", "16,20,17", "--compile"])
    assert rc == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "axis 1 is 20, not a multiple of 8 (use 16 or 24)" in err
    assert "axis 2 is 17, not a multiple of 8 (use 16 or 24)" in err and "Try --patch-size 16,24,16" in err
    assert "torch.compile" not in err and "Traceback" not in err
    assert not (wd / "results").exists() and not (wd / "splits.json").exists()
    check_patch_size((16, 24, 16), [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], "3d_fullres")  # fits: no error
    with pytest.raises(ConfigError, match="axis 0 is 4, not a multiple of 8 \\(use 8\\)"):
        check_patch_size((4, 8), [[1, 1], [2, 2], [2, 2], [2, 2]], "2d")
