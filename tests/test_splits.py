import json

import pytest

from medseg3d.data.splits import fold_cases, load_or_create_splits, make_splits
from medseg3d.errors import ConfigError

CASES = [f"case_{i:03d}" for i in range(23)]


def test_five_folds_partition_every_case_once():
    splits = make_splits(CASES, 5, seed=1)
    assert len(splits) == 5
    vals = [c for f in splits for c in f["val"]]
    assert sorted(vals) == sorted(CASES)
    for f in splits:
        assert set(f["train"]).isdisjoint(f["val"])
        assert len(f["train"]) + len(f["val"]) == len(CASES)
        assert len(f["val"]) in (4, 5)


def test_split_is_deterministic_and_order_independent():
    assert make_splits(CASES, 5) == make_splits(list(reversed(CASES)), 5)
    assert make_splits(CASES, 5, seed=1) != make_splits(CASES, 5, seed=2)


def test_splits_file_written_then_user_file_honoured(tmp_path):
    s = load_or_create_splits(tmp_path, CASES)
    assert json.loads((tmp_path / "splits.json").read_text()) == s
    mine = [{"train": CASES[:3], "val": CASES[3:5]}]
    (tmp_path / "splits.json").write_text(json.dumps(mine))
    assert load_or_create_splits(tmp_path, CASES) == mine
    assert fold_cases(mine, 0, CASES) == (CASES[:3], CASES[3:5])
    with pytest.raises(ConfigError, match="fold 1 does not exist"):
        fold_cases(mine, 1, CASES)


def test_bad_user_splits_named(tmp_path):
    (tmp_path / "splits.json").write_text(json.dumps([{"train": ["nope"], "val": []}]))
    with pytest.raises(ConfigError, match="nope"):
        load_or_create_splits(tmp_path, CASES)
    (tmp_path / "splits.json").write_text("{")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_or_create_splits(tmp_path, CASES)


def test_fold_all_and_too_few_cases():
    train, val = fold_cases([], "all", CASES)
    assert train == sorted(CASES) and val == []
    with pytest.raises(ConfigError, match="3 cases"):
        make_splits(CASES[:3], 5)
