"""Checkpoints: atomic round trip, and every way a load can fail names the file and the fix."""

from __future__ import annotations

import pickle

import pytest
import torch

from medseg3d.errors import CheckpointError
from medseg3d.inference.checkpoint import (
    FORMAT_VERSION,
    build_model_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from medseg3d.networks import build_network

torch.set_num_threads(1)

KWARGS = {"dims": 3, "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "features": [4, 8]}


def payload(seed: int = 0, plan_hash: str = "a" * 64) -> dict:
    torch.manual_seed(seed)
    net = build_network("unet", in_channels=1, num_classes=3, deep_supervision=True, **KWARGS)
    return {"plan_hash": plan_hash, "configuration": "3d_fullres", "architecture": "unet", "network_kwargs": KWARGS,
            "in_channels": 1, "num_classes": 3, "model": net.state_dict(), "epoch": 7}


def test_round_trip_rebuilds_the_same_network(tmp_path):
    p = tmp_path / "fold_0" / "checkpoint_final.pt"
    save_checkpoint(p, payload(1))
    assert [f.name for f in p.parent.iterdir()] == ["checkpoint_final.pt"]  # no temp file left
    ckpt = load_checkpoint(p)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["epoch"] == 7
    model = build_model_from_checkpoint(ckpt)
    assert not model.training
    ref = build_network("unet", in_channels=1, num_classes=3, deep_supervision=False, **KWARGS)
    ref.load_state_dict(payload(1)["model"])
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("cut", [0.5, 0.95])
def test_truncated_file_is_named_and_a_fix_suggested(tmp_path, cut):
    p = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(p, payload())
    raw = p.read_bytes()
    p.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(p)
    msg = str(err.value)
    assert "truncated or corrupt" in msg and str(p) in msg and "--resume" in msg


def test_garbage_and_non_dict(tmp_path):
    p = tmp_path / "c.pt"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(p)
    torch.save([1, 2, 3], p)
    with pytest.raises(CheckpointError, match="does not hold"):
        load_checkpoint(p)


def test_unknown_format_version(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {**payload(), "format_version": 99})
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(p)


def test_missing_keys(tmp_path):
    p = tmp_path / "c.pt"
    bad = payload()
    del bad["model"]
    save_checkpoint(p, bad)
    with pytest.raises(CheckpointError, match="lacks model"):
        load_checkpoint(p)


def test_other_plan_is_refused(tmp_path):
    from medseg3d.plans.schema import identity_hash

    ident = {"labels": {"0": "bg", "1": "a"}, "channel_names": ["MRI"],
             "configuration": {"spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16]}}
    p = tmp_path / "c.pt"
    save_checkpoint(p, payload(plan_hash="b" * 64))
    with pytest.raises(CheckpointError, match="another plan") as err:
        load_checkpoint(p, expected_plan=ident)
    assert "bbbbbbbbbbbb" in str(err.value) and "retrain" in str(err.value)
    assert load_checkpoint(p)["plan_hash"] == "b" * 64  # no plan asked for: loads
    # a checkpoint that stores its plan identity is accepted by an equal plan and says what differs otherwise
    save_checkpoint(p, {**payload(plan_hash=identity_hash(ident)), "plan_identity": ident})
    assert load_checkpoint(p, expected_plan=ident)["epoch"] == 7
    other = {**ident, "configuration": {"spacing": [2.0, 1.0, 1.0], "patch_size": [16, 16, 16]}}
    with pytest.raises(CheckpointError, match=r"spacing: \[1.0, 1.0, 1.0\] -> \[2.0, 1.0, 1.0\]"):
        load_checkpoint(p, expected_plan=other)


def test_weights_that_do_not_fit(tmp_path):
    ckpt = payload()
    ckpt["network_kwargs"] = {**KWARGS, "features": [4, 16]}
    with pytest.raises(CheckpointError, match="do not fit"):
        build_model_from_checkpoint(ckpt)


def test_failed_save_leaves_the_old_checkpoint(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, payload(0))
    before = p.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(p, {**payload(1), "bad": lambda: None})  # a lambda cannot be pickled
    assert p.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c.pt"]


class _WritesAFile:
    """Unpickling this runs `exec`, which writes `target`: what a malicious checkpoint would do."""

    def __init__(self, target) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("how", ["zip", "legacy", "nested"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, how):
    target = tmp_path / "pwned.txt"
    p = tmp_path / "checkpoint_final.pt"
    evil = _WritesAFile(target)
    bad = {**payload(), "format_version": FORMAT_VERSION}
    if how == "nested":
        bad["train_config"] = {"extra": {"hook": [evil]}}
    else:
        bad["evil"] = evil
    torch.save(bad, p, _use_new_zipfile_serialization=how != "legacy")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(p)
    assert not target.exists()
    msg = str(err.value)
    assert str(p) in msg and "weights_only=True" in msg and "cannot run code" in msg
    assert "holds exec," in msg or "holds builtins.exec," in msg  # torch 2.4+ / 2.3 name it so


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_raw_pickle_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    p = tmp_path / "checkpoint_final.pt"
    p.write_bytes(pickle.dumps(_WritesAFile(target)))
    with pytest.raises(CheckpointError):
        load_checkpoint(p)
    assert not target.exists()


def test_a_checkpoint_with_a_legacy_numpy_rng_state_still_loads(tmp_path):
    """Checkpoints written before the numpy random state was stored as a list hold a uint32 ndarray."""
    import numpy as np

    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("torch < 2.5 has no safe_globals: such a checkpoint is refused there")
    p = tmp_path / "checkpoint_latest.pt"
    torch.save({**payload(), "format_version": FORMAT_VERSION, "rng": {"numpy": np.random.get_state()}}, p)
    state = load_checkpoint(p)["rng"]["numpy"]
    assert state[0] == "MT19937" and np.array_equal(state[1], np.random.get_state()[1])
    p2 = tmp_path / "objects.pt"
    torch.save({**payload(), "format_version": FORMAT_VERSION, "x": np.array([object()], dtype=object)}, p2)
    with pytest.raises(CheckpointError, match="holds numpy.dtypes.ObjectDType, which is neither a tensor"):
        load_checkpoint(p2)


def test_a_checkpoint_from_before_network_hashes_loads_while_its_plans_json_is_unchanged(tmp_path):
    """medseg3d 0.1 recorded the hash of the whole plans.json: still accepted for that same file."""
    ident = {"labels": {"0": "bg", "1": "a"}, "channel_names": ["MRI"], "configuration": {"spacing": [1.0, 1.0, 1.0]}}
    p = tmp_path / "old.pt"
    save_checkpoint(p, payload(plan_hash="d" * 64))  # no plan_identity: written before
    assert load_checkpoint(p, expected_plan=ident, legacy_hash="d" * 64)["epoch"] == 7
    with pytest.raises(CheckpointError, match="another plan"):
        load_checkpoint(p, expected_plan=ident, legacy_hash="e" * 64)  # plans.json changed since
