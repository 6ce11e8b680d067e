"""Tiny ImageNet's folder layout (users bring the files; these tests write a tiny sample)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fsl_fast import data as D
from fsl_fast.train import main

WNIDS = ["n02", "n01", "n03"]  # sorted: n01 -> 0, n02 -> 1, n03 -> 2


def _write(root, per_class=4, val=(("v0.JPEG", "n03"), ("v1.JPEG", "n01"), ("v2.JPEG", "n02")), gray=True):
    rng = np.random.default_rng(0)
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for w in WNIDS:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            im = Image.fromarray(a)
            if gray and w == "n02" and i == 0:
                im = im.convert("L")  # Tiny ImageNet has grayscale files
            im.save(d / f"{w}_{i}.JPEG", quality=95)
    lines = []
    for name, w in val:
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(base / "val" / "images" / name)
        lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def test_layout_labels_and_normalization(tmp_path):
    base = _write(tmp_path)
    ds = D.load_dataset("tinyimagenet", tmp_path)
    assert ds.in_shape == (3, 64, 64) and ds.num_classes == 3 and ds.augment
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ds.y_test.tolist() == [2, 0, 1]
    # the first training image of n01, decoded and normalized by hand
    a = np.asarray(Image.open(base / "train" / "n01" / "images" / "n01_0.JPEG").convert("RGB"), dtype=np.float32)
    want = (torch.from_numpy(a).permute(2, 0, 1) / 255 - torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(D.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(ds.x_train[0], want)
    g = ds.x_train[4] * torch.tensor(D.IMAGENET_STD).view(3, 1, 1) + torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(g[0], g[1])  # the grayscale file became three equal channels
    assert torch.equal(D.load_dataset("tinyimagenet", base).y_test, ds.y_test)  # the folder itself works too


def test_one_round_both_engines(tmp_path):
    _write(tmp_path / "data")
    for fused in (False, True):
        out = tmp_path / f"run{int(fused)}"
        assert main(["--dataset", "tinyimagenet", "--data-dir", str(tmp_path / "data"), "--clients", "2", "--rounds", "1",
                     "--batch-size", "3", "--align-epochs", "1", "--align-interval", "1", "--no-progress",
                     "--out", str(out)] + (["--fused"] if fused else [])) == 0
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model"] == "resnet18"


def test_bad_layouts_are_one_line(tmp_path, capsys):
    base = _write(tmp_path)
    (base / "val" / "val_annotations.txt").write_text("v0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(D.DataError, match="class 'n99' is not in wnids.txt"):
        D.load_dataset("tinyimagenet", tmp_path)
    (base / "val" / "val_annotations.txt").unlink()
    assert main(["--dataset", "tinyimagenet", "--data-dir", str(tmp_path), "--rounds", "1", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val_annotations.txt not found" in err[0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(base / "train" / "n01" / "images" / "n01_0.JPEG")
    (base / "val" / "val_annotations.txt").write_text("v0.JPEG\tn03\t0\t0\t1\t1\n")
    with pytest.raises(D.DataError, match="is 32x32, expected 64x64"):
        D.load_dataset("tinyimagenet", tmp_path)
