"""FEMNIST from LEAF's JSON layout (users bring the files; these tests write a tiny sample)."""
import json

import numpy as np
import pytest
import torch

from fsl_fast import data as D
from fsl_fast.config import Config, ConfigError
from fsl_fast.train import main


def _write_leaf(root, files, seed=0):
    """files: {"train"|"test": [[(user, n), ...] per file]}; pixels uniform in [0, 1), labels < 62."""
    rng = np.random.default_rng(seed)
    want = {}
    for split, per_file in files.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for i, users in enumerate(per_file):
            ud = {}
            for u, n in users:
                x = rng.random((n, 784)).round(3)
                y = rng.integers(0, 62, n)
                ud[u] = {"x": x.tolist(), "y": y.tolist()}
                want[split, u] = (x, y)
            doc = {"users": [u for u, _ in users], "num_samples": [n for _, n in users], "user_data": ud}
            (root / split / f"part_{i}.json").write_text(json.dumps(doc))
    return want


LAYOUT = {"train": [[("w3", 9), ("w1", 5)], [("w0", 7), ("w2", 0), ("w4", 6)]],
          "test": [[("w0", 2), ("w4", 3)], [("w1", 1), ("w3", 4), ("w9", 5)]]}


def test_first_writers_in_file_order(tmp_path):
    want = _write_leaf(tmp_path, LAYOUT)
    ds = D.load_dataset("femnist", tmp_path, clients=3)
    # part_0: w3, w1; part_1: w0 (w2 has no samples and is skipped)
    order = ["w3", "w1", "w0"]
    assert [len(o) for o in ds.owners] == [9, 5, 7]
    assert ds.in_shape == (1, 28, 28) and ds.num_classes == 62 and not ds.augment
    for o, u in zip(ds.owners, order):
        x, y = want["train", u]
        assert torch.equal(ds.y_train[o], torch.from_numpy(y))
        torch.testing.assert_close(ds.x_train[o].view(-1, 784), torch.from_numpy((x.astype(np.float32) - 0.5) / 0.5))
    # the test set: the chosen writers' test samples, in the writers' order (w3, w1, w0)
    ty = np.concatenate([want["test", u][1] for u in order])
    assert torch.equal(ds.y_test, torch.from_numpy(ty))
    assert len(D.load_dataset("femnist", tmp_path).owners) == 4  # all writers with samples


@pytest.mark.parametrize("fused", [False, True])
def test_train_one_client_per_writer(tmp_path, fused):
    _write_leaf(tmp_path / "leaf", LAYOUT)
    out = tmp_path / "run"
    assert main(["--dataset", "femnist", "--data-dir", str(tmp_path / "leaf"), "--clients", "3", "--rounds", "2",
                 "--batch-size", "4", "--align-epochs", "2", "--align-interval", "1", "--no-progress", "--out", str(out)]
                + (["--fused"] if fused else [])) == 0
    part = json.loads((out / "partition.json").read_text())
    assert part["scheme"] == "writers" and [c["samples"] for c in part["clients"]] == [9, 5, 7]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["test_accuracy"] <= 1 for r in rows)


@pytest.mark.parametrize("mutate,needle", [
    (lambda r: (r / "train" / "part_0.json").write_text("{not json"), "femnist: cannot read"),
    (lambda r: (r / "train" / "part_0.json").write_text(json.dumps({"users": ["a"]})), "is not a LEAF file"),
    (lambda r: (r / "train" / "part_0.json").write_text(json.dumps(
        {"users": ["a"], "user_data": {"a": {"x": [[0.1] * 10], "y": [1]}}})), "expected x [n, 784]"),
    (lambda r: (r / "train" / "part_0.json").write_text(json.dumps(
        {"users": ["a"], "user_data": {"a": {"x": [[0.1] * 784], "y": [62]}}})), "labels outside 0..61"),
])
def test_bad_files_are_one_line(tmp_path, capsys, mutate, needle):
    _write_leaf(tmp_path / "leaf", LAYOUT)
    mutate(tmp_path / "leaf")
    out = tmp_path / "run"
    rc = main(["--dataset", "femnist", "--data-dir", str(tmp_path / "leaf"), "--clients", "2", "--rounds", "1",
               "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_option_errors(tmp_path):
    _write_leaf(tmp_path, LAYOUT)
    with pytest.raises(D.DataError, match="has 4 writers with samples; use --clients <= 4"):
        D.load_dataset("femnist", tmp_path, clients=5)
    with pytest.raises(ConfigError, match="femnist is split by writer"):
        Config(dataset="femnist", data_dir=str(tmp_path), partition="dirichlet", alpha=0.5).resolved()
    with pytest.raises(ConfigError, match="needs --data-dir"):
        Config(dataset="femnist").resolved()
    with pytest.raises(D.DataError, match="no LEAF JSON files"):
        D.load_dataset("femnist", tmp_path / "nothing", clients=1)
