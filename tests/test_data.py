"""Datasets, partitions, augmentation and client loaders (fsl_fast.data)."""
import io
import math
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from fsl_fast import data as D
from fsl_fast.data import DataError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(scope="module")
def mnist():
    return D.load_dataset("mnist5k", seed=0)


# ---------------------------------------------------------------------------------------------
# mnist5k


def test_mnist5k_split_sizes_and_stratification(mnist):
    assert mnist.x_train.shape == (4000, 1, 28, 28) and mnist.x_test.shape == (1000, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.in_shape == (1, 28, 28) and mnist.num_classes == 10 and not mnist.augment
    assert torch.bincount(mnist.y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(mnist.y_test, minlength=10).tolist() == [100] * 10
    # the stored order must not be sorted by class (the raw file is)
    assert (mnist.y_train[:400] == mnist.y_train[0]).float().mean() < 0.5


def test_mnist5k_pixel_range_and_normalization(mnist):
    # pixels are (p / 255 - 0.1307) / 0.3081 with p in 0..255
    lo, hi = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
    for x in (mnist.x_train, mnist.x_test):
        assert x.min().item() == pytest.approx(lo, abs=1e-5)
        assert x.max().item() == pytest.approx(hi, abs=1e-5)
        raw = (x * 0.3081 + 0.1307) * 255
        assert torch.allclose(raw, raw.round(), atol=1e-3)
    assert mnist.pad_value.tolist() == pytest.approx([lo])
    # mean of MNIST digits in [0, 1] is about 0.13: normalized mean near 0
    assert abs(mnist.x_train.mean().item()) < 0.1


def test_mnist5k_train_test_disjoint_and_seeded(mnist):
    def keys(x):
        return {hash(r.numpy().tobytes()) for r in x.flatten(1)}

    assert not (keys(mnist.x_train) & keys(mnist.x_test))
    again = D.load_dataset("mnist5k", seed=0)
    assert torch.equal(again.x_train, mnist.x_train) and torch.equal(again.y_test, mnist.y_test)
    other = D.load_dataset("mnist5k", seed=1)
    assert not torch.equal(other.y_train, mnist.y_train)
    assert keys(other.x_test) != keys(mnist.x_test)


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        D.load_dataset("mnist")
    with pytest.raises(DataError, match="synthetic"):
        D.load_dataset("synthetic:3x32")


def test_synthetic_shapes():
    ds = D.load_dataset("synthetic")
    assert ds.x_train.shape == (640, 3, 32, 32) and ds.augment and ds.pad_value.shape == (3,)
    ds = D.load_dataset("synthetic:1x28x28", seed=3)
    assert ds.x_test.shape == (160, 1, 28, 28) and not ds.augment
    assert torch.bincount(ds.y_train).tolist() == [64] * 10
    moved = ds.to("cpu")
    assert torch.equal(moved.x_train, ds.x_train) and moved.in_shape == ds.in_shape


def test_synthetic_size():
    ds = D.load_dataset("synthetic:3x16x16:5000", seed=1)
    assert ds.x_train.shape == (5000, 3, 16, 16) and ds.x_test.shape == (1250, 3, 16, 16)
    assert torch.bincount(ds.y_train).tolist() == [500] * 10
    # the default size is 640 and names without a size keep their exact data
    a, b = D.load_dataset("synthetic:1x8x8", seed=2), D.load_dataset("synthetic:1x8x8:640", seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    for bad, msg in (("synthetic:3x8x8:5", "synthetic training size 5 must be 10..1000000"),
                     ("synthetic:3x8x8:", "bad synthetic dataset name")):
        with pytest.raises(D.DataError, match=msg):
            D.load_dataset(bad)


# ---------------------------------------------------------------------------------------------
# CIFAR from fake files


def _cifar_blob(n, num_classes=10, label_key=b"labels", seed=0, protocol=2, shape=None, nlabels=None):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=shape or (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=nlabels if nlabels is not None else n).tolist()
    return data, labels, pickle.dumps({b"data": data, label_key: labels, b"batch_label": b"x"},
                                      protocol=protocol)


def _write_cifar10(folder, sizes=(6, 5, 4, 3, 2), n_test=7):
    folder.mkdir(parents=True, exist_ok=True)
    expect = {"train": [], "test": []}
    for i, n in enumerate(sizes, 1):
        d, lab, blob = _cifar_blob(n, seed=i, protocol=[2, 4, 5][i % 3])
        (folder / f"data_batch_{i}").write_bytes(blob)
        expect["train"].append((d, lab))
    d, lab, blob = _cifar_blob(n_test, seed=99)
    (folder / "test_batch").write_bytes(blob)
    expect["test"].append((d, lab))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=2))
    return expect


def _check_against(ds, expect):
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        data = np.concatenate([d for d, _ in expect[split]])
        labels = sum((lab for _, lab in expect[split]), [])
        want = (torch.from_numpy(data).float().view(-1, 3, 32, 32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        assert x.shape == want.shape and torch.allclose(x, want, atol=1e-6)
        assert y.tolist() == labels


def test_cifar10_from_folder_parent_and_archive(tmp_path):
    expect = _write_cifar10(tmp_path / "cifar-10-batches-py")
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):
        ds = D.load_dataset("cifar10", where)
        _check_against(ds, expect)
        assert ds.augment and ds.num_classes == 10 and ds.in_shape == (3, 32, 32)
        assert torch.allclose(ds.pad_value, -IMAGENET_MEAN.flatten() / IMAGENET_STD.flatten())
    arch_dir = tmp_path / "arch"
    arch_dir.mkdir()
    with tarfile.open(arch_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for where in (arch_dir, arch_dir / "cifar-10-python.tar.gz"):
        _check_against(D.load_dataset("cifar10", where), expect)
    assert sorted(os.listdir(arch_dir)) == ["cifar-10-python.tar.gz"]  # nothing extracted


def test_cifar10_legacy_numpy_module_name(tmp_path):
    # Pickles written by numpy 1.x (as the official files are) name numpy.core.multiarray.
    expect = _write_cifar10(tmp_path / "cifar-10-batches-py")
    d, lab, blob = _cifar_blob(4, seed=7, protocol=2)
    assert b"numpy._core.multiarray" in blob
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    expect["test"] = [(d, lab)]
    _check_against(D.load_dataset("cifar10", tmp_path), expect)


def _py2_pickle(data, labels):
    """The byte layout of the official CIFAR files: a Python 2 protocol-2 pickle of a dict whose
    keys and array bytes are py2 str (SHORT_BINSTRING / BINSTRING) and whose array is rebuilt by
    numpy.core.multiarray._reconstruct. Written opcode by opcode since Python 3 cannot emit it."""
    n, raw = data.shape[0], data.tobytes()
    arr = (b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85U\x01b\x87Rq\x03("
           b"K\x01J" + struct.pack("<i", n) + b"J" + struct.pack("<i", 3072) + b"\x86"
           b"cnumpy\ndtype\nq\x04U\x02u1K\x00K\x01\x87Rq\x05(K\x03U\x01|NNNJ\xff\xff\xff\xff"
           b"J\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<i", len(raw)) + raw + b"tb")
    lab = b"]q\x06(" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}q\x00(U\x04data" + arr + b"U\x06labels" + lab + b"u."


def test_cifar10_python2_pickles(tmp_path):
    expect = _write_cifar10(tmp_path / "cifar-10-batches-py")
    d = np.random.default_rng(3).integers(0, 256, size=(5, 3072), dtype=np.uint8)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(_py2_pickle(d, [9, 0, 3, 3, 1]))
    expect["test"] = [(d, [9, 0, 3, 3, 1])]
    _check_against(D.load_dataset("cifar10", tmp_path), expect)


def test_cifar100_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    d_tr, l_tr, blob = _cifar_blob(9, 100, b"fine_labels", seed=1)
    (folder / "train").write_bytes(blob)
    d_te, l_te, blob = _cifar_blob(4, 100, b"fine_labels", seed=2)
    (folder / "test").write_bytes(blob)
    ds = D.load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100
    _check_against(ds, {"train": [(d_tr, l_tr)], "test": [(d_te, l_te)]})


def test_cifar_missing_dir_and_files(tmp_path):
    with pytest.raises(DataError, match="needs data_dir"):
        D.load_dataset("cifar10")
    with pytest.raises(DataError, match="does not exist"):
        D.load_dataset("cifar10", tmp_path / "nope")
    with pytest.raises(DataError, match="found neither cifar-10-batches-py/ nor cifar-10-python.tar.gz"):
        D.load_dataset("cifar10", tmp_path)
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DataError, match="missing file .*data_batch_3"):
        D.load_dataset("cifar10", tmp_path)


def test_cifar_truncated_and_incomplete_archive(tmp_path):
    _write_cifar10(tmp_path / "src" / "cifar-10-batches-py", sizes=(200, 200, 200, 200, 200))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    whole = buf.getvalue()
    bad = tmp_path / "cut" / "cifar-10-python.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cannot read archive .*cifar-10-python\.tar\.gz"):
        D.load_dataset("cifar10", bad.parent)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="cannot read archive"):
        D.load_dataset("cifar10", junk)
    partial = tmp_path / "partial.tar.gz"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py" / "data_batch_1",
                arcname="cifar-10-batches-py/data_batch_1")
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/data_batch_2"):
        D.load_dataset("cifar10", partial)


def test_cifar_malformed_and_truncated_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    good = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"data_batch_2: malformed or truncated pickle"):
        D.load_dataset("cifar10", tmp_path)
    (folder / "data_batch_2").write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match="data_batch_2"):
        D.load_dataset("cifar10", tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="data_batch_2: expected a pickled dict, got list"):
        D.load_dataset("cifar10", tmp_path)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    marker = tmp_path / "pwned"
    payload = {b"data": _Evil(marker), b"labels": [0]}
    for protocol in (2, 4):
        (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=protocol))
        with pytest.raises(DataError, match=r"data_batch_1: .*refusing to load global"):
            D.load_dataset("cifar10", tmp_path)
    # Also a global that numpy-looking code could abuse, and builtins.eval.
    (folder / "data_batch_1").write_bytes(b"cbuiltins\neval\n(V1+1\ntR.")
    with pytest.raises(DataError, match="refusing to load global builtins.eval"):
        D.load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_wrong_shape_labels_mismatch_and_range(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    cases = [
        (dict(n=4, shape=(4, 100)), r"data_batch_4: 'data' must be a uint8 array of shape \[n, 3072\], "
                                    r"got uint8 array of shape \(4, 100\)"),
        (dict(n=4, nlabels=3), r"data_batch_4: 4 images but 3 labels in 'labels'"),
        (dict(n=4, num_classes=11, seed=5), r"data_batch_4: labels must lie in \[0, 10\)"),
    ]
    for kw, msg in cases:
        if kw.get("num_classes") == 11:
            d = np.zeros((4, 3072), np.uint8)
            blob = pickle.dumps({b"data": d, b"labels": [0, 10, 1, 2]})
        else:
            _, _, blob = _cifar_blob(**kw)
        (folder / "data_batch_4").write_bytes(blob)
        with pytest.raises(DataError, match=msg):
            D.load_dataset("cifar10", tmp_path)
    (folder / "data_batch_4").write_bytes(pickle.dumps({b"labels": [0]}))
    with pytest.raises(DataError, match="data_batch_4: missing key 'data'"):
        D.load_dataset("cifar10", tmp_path)
    (folder / "data_batch_4").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}))
    with pytest.raises(DataError, match="got float32 array"):
        D.load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------------------------------------
# partitions


def _labels(n=2000, c=10, seed=0):
    return np.random.default_rng(seed).integers(0, c, size=n)


@pytest.mark.parametrize("scheme,alpha", [("iid", None), ("dirichlet", 0.1), ("dirichlet", 1.0),
                                          ("dirichlet", 1000.0)])
@pytest.mark.parametrize("m", [1, 7, 10])
def test_partition_sizes_disjoint_deterministic(scheme, alpha, m):
    y = _labels()
    parts = D.partition(y, m, scheme, alpha=alpha, seed=5)
    assert len(parts) == m
    assert all(p.dtype == np.int64 and len(p) == len(y) // m for p in parts)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)  # every sample used at most once
    assert flat.min() >= 0 and flat.max() < len(y)
    again = D.partition(y, m, scheme, alpha=alpha, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = D.partition(y, m, scheme, alpha=alpha, seed=6)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_partition_accepts_tensor_labels():
    y = _labels(100)
    a = D.partition(torch.from_numpy(y), 4, seed=1)
    b = D.partition(y, 4, seed=1)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))


def test_iid_partition_is_near_uniform_and_drops_remainder():
    y = _labels(10_003)
    parts = D.partition(y, 10, "iid", seed=0)
    assert sum(len(p) for p in parts) == 10_000
    hist = np.array(D.class_counts(y, parts, 10))
    assert hist.shape == (10, 10) and hist.sum() == 10_000
    assert np.all(np.abs(hist - 100) < 45)  # binomial(1000, 0.1): sd 9.5


def _mean_max_share(y, alpha, m=10, seed=0):
    hist = np.array(D.class_counts(y, D.partition(y, m, "dirichlet", alpha=alpha, seed=seed), 10))
    return (hist.max(axis=1) / hist.sum(axis=1)).mean(), hist


def test_dirichlet_skew_depends_on_alpha():
    y = np.repeat(np.arange(10), 500)  # balanced, 5,000 samples
    conc, hist_small = _mean_max_share(y, 0.05)
    mid, _ = _mean_max_share(y, 1.0)
    flat, hist_large = _mean_max_share(y, 1000.0)
    # alpha=0.05: clients are nearly single-class (one class holds most of each shard)
    assert conc > 0.6, hist_small
    assert (hist_small > 0).sum(axis=1).mean() < 5
    # alpha=1000: within sampling noise of uniform (each class ~50 of 500 samples)
    assert flat < 0.16, hist_large
    assert np.all(np.abs(hist_large[:-1] - 50) < 30)
    assert conc > mid > flat


def test_dirichlet_exhausted_class_is_renormalized():
    # 2 classes, 90/10: with a near one-hot p some client must take the other class once
    # its favourite is used up, and every client still gets exactly N/m samples.
    y = np.array([0] * 90 + [1] * 10)
    for seed in range(5):
        parts = D.partition(y, 4, "dirichlet", alpha=0.01, seed=seed)
        assert [len(p) for p in parts] == [25] * 4
        assert sum(np.array(D.class_counts(y, parts, 2))[:, 1]) == 10


def test_partition_errors():
    y = _labels(50)
    with pytest.raises(DataError, match="num_clients must be an integer >= 1"):
        D.partition(y, 0)
    with pytest.raises(DataError, match="num_clients=51 exceeds the number of training samples"):
        D.partition(y, 51)
    for alpha in (None, 0, -1.0, float("nan")):
        with pytest.raises(DataError, match="dirichlet partition needs a finite alpha > 0"):
            D.partition(y, 5, "dirichlet", alpha=alpha)
    with pytest.raises(DataError, match="unknown partition scheme 'pathological'"):
        D.partition(y, 5, "pathological")
    with pytest.raises(DataError, match="labels must be a 1-D integer array"):
        D.partition(np.zeros((5, 2), np.int64), 2)


# ---------------------------------------------------------------------------------------------
# augmentation and loaders


def _ramp(b=6, c=3, h=32, w=32):
    # pixel value encodes its own (row, column): 1000 + 100 * row + col, per channel offset
    r = torch.arange(h).view(h, 1) * 100.0
    q = torch.arange(w).view(1, w).float()
    img = 1000 + r + q + torch.arange(c).view(c, 1, 1) * 100_000.0
    return img.expand(b, c, h, w).clone()


def test_augment_crop_and_flip_really_happen(seed):
    b, c, h, w = 64, 3, 32, 32
    x = _ramp(b, c, h, w)
    pad = torch.tensor([-1.0, -2.0, -3.0])
    out = D.augment_batch(x, torch.Generator().manual_seed(seed), pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    flips, shifts = 0, set()
    for i in range(b):
        img = out[i]
        inside = img[0] >= 0  # padded pixels hold the (negative) pad value
        rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
        # pad pixels carry the pad value of their channel
        for ch in range(c):
            assert torch.all(img[ch][~inside] == pad[ch])
        # the valid window is a contiguous block; recover source row/col of its top-left pixel
        v = img[0, rows[0], cols]
        src_row = int((v[0] - 1000) // 100)
        src_cols = (v - 1000 - 100 * src_row).long()
        step = src_cols[1] - src_cols[0] if len(src_cols) > 1 else torch.tensor(1)
        flipped = bool(step == -1)
        flips += flipped
        assert torch.equal(src_cols, src_cols[0] + step * torch.arange(len(src_cols)))
        # crop offset: output row r shows source row r + oy - 4; same for columns
        oy = src_row - int(rows[0]) + 4
        left_src = int(src_cols.min())
        ox = (left_src - int(cols[0]) + 4) if not flipped else (left_src - (w - 1 - int(cols[-1])) + 4)
        assert 0 <= oy <= 8 and 0 <= ox <= 8
        shifts.add((oy, ox))
        # rows are never flipped, and channels stay aligned
        assert torch.equal(img[1][inside], img[0][inside] + 100_000)
    assert 15 < flips < 49  # binomial(64, 0.5)
    assert len(shifts) > 20  # 81 possible offsets


def test_augment_is_deterministic_given_generator(seed):
    x = torch.randn(10, 3, 32, 32)
    pad = torch.zeros(3)
    a = D.augment_batch(x, torch.Generator().manual_seed(7), pad)
    b = D.augment_batch(x, torch.Generator().manual_seed(7), pad)
    c = D.augment_batch(x, torch.Generator().manual_seed(8), pad)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(DataError, match="pad_value must have 3 values"):
        D.augment_batch(x, torch.Generator(), torch.zeros(1))


def test_augment_matches_per_sample_crop_and_flip(seed):
    # Reference: pad, slice each sample's window, flip — with the offsets the documented draw
    # order gives (row offsets, column offsets, flips).
    x = torch.randn(9, 2, 8, 12)
    pad = torch.tensor([0.5, -0.5])
    out = D.augment_batch(x, torch.Generator().manual_seed(3), pad)
    g = torch.Generator().manual_seed(3)
    oy = torch.randint(0, 9, (9,), generator=g)
    ox = torch.randint(0, 9, (9,), generator=g)
    fl = torch.rand(9, generator=g) < 0.5
    padded = pad.view(1, 2, 1, 1).expand(9, 2, 16, 20).clone()
    padded[:, :, 4:12, 4:16] = x
    for i in range(9):
        win = padded[i, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 12]
        assert torch.equal(out[i], win.flip(-1) if fl[i] else win)


def test_loader_batches_and_last_batch():
    ds = D.load_dataset("synthetic:1x28x28")
    idx = np.arange(0, 250, 2)  # 125 samples
    loader = D.ClientLoader(ds, idx, 32, torch.Generator().manual_seed(0))
    assert len(loader) == 4 and loader.num_samples == 125
    batches = list(loader)
    assert [len(y) for _, y in batches] == [32, 32, 32, 29]
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert xs.dtype == torch.float32 and ys.dtype == torch.int64
    # a permutation of exactly this client's samples (no augmentation for 1x28x28)
    order = torch.tensor([int(torch.nonzero((ds.x_train[idx] == r).flatten(1).all(1))[0])
                          for r in xs])
    assert sorted(order.tolist()) == list(range(125))
    assert torch.equal(ys, ds.y_train[idx][order])
    assert order.tolist() != list(range(125))
    assert len(D.ClientLoader(ds, idx, 125, torch.Generator())) == 1
    assert len(D.ClientLoader(ds, idx, 1000, torch.Generator())) == 1


def test_loader_reproducible_from_generator_state():
    ds = D.load_dataset("synthetic")  # 3x32x32: augmented
    g = torch.Generator().manual_seed(11)
    loader = D.ClientLoader(ds, np.arange(100), 16, g)
    first = list(loader)
    state = g.get_state()
    second = list(loader)
    assert not torch.equal(first[0][0], second[0][0])  # a fresh permutation per pass
    g.set_state(state)
    replay = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(second, replay))


def test_loader_augments_only_when_training():
    ds = D.load_dataset("synthetic")
    idx = np.arange(10, 50)
    g = torch.Generator().manual_seed(0)
    plain = list(D.ClientLoader(ds, idx, 40, g, train=False))
    assert torch.equal(plain[0][0], ds.x_train[10:50]) and torch.equal(plain[0][1], ds.y_train[10:50])
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # unused
    (x, y), = list(D.ClientLoader(ds, idx, 40, g))
    # documented draw order: the permutation, then the batch's augmentation
    ref = torch.Generator().manual_seed(0)
    perm = torch.from_numpy(idx)[torch.randperm(40, generator=ref)]
    assert torch.equal(y, ds.y_train[perm])
    assert torch.equal(x, D.augment_batch(ds.x_train[perm], ref, ds.pad_value))
    assert not torch.equal(x, ds.x_train[perm])


def test_loader_errors():
    ds = D.load_dataset("synthetic:1x8x8")
    g = torch.Generator()
    with pytest.raises(DataError, match="batch_size must be an integer >= 1"):
        D.ClientLoader(ds, [0, 1], 0, g)
    with pytest.raises(DataError, match=r"indices must lie in \[0, 640\)"):
        D.ClientLoader(ds, [0, 640], 4, g)
    with pytest.raises(DataError, match="indices must be a 1-D integer array"):
        D.ClientLoader(ds, np.zeros((2, 2), np.int64), 4, g)
    with pytest.raises(DataError, match="generator must be a torch.Generator"):
        D.ClientLoader(ds, [0], 4, 0)


def test_test_batches_cover_test_set_in_order():
    ds = D.load_dataset("synthetic:1x8x8")
    batches = list(D.test_batches(ds, 64))
    assert [len(y) for _, y in batches] == [64, 64, 32]
    assert torch.equal(torch.cat([x for x, _ in batches]), ds.x_test)
    assert math.isclose(sum(len(y) for _, y in batches), ds.num_test)


def test_shards_partition_by_hand():
    """20 samples, labels 0..3 five each, 2 clients x 2 shards of 5: each shard is one class,
    so each client holds exactly two whole classes; the deal is seeded."""
    y = np.repeat(np.arange(4), 5)
    parts = D.partition(y, 2, "shards", seed=3, shards_per_client=2)
    assert [len(p) for p in parts] == [10, 10]
    assert len(np.unique(np.concatenate(parts))) == 20
    for p in parts:
        labels, counts = np.unique(y[p], return_counts=True)
        assert len(labels) == 2 and list(counts) == [5, 5]
        assert np.all(np.diff(p) > 0)  # ascending indices
    again = D.partition(y, 2, "shards", seed=3, shards_per_client=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    deals = {tuple(tuple(sorted(set(y[p]))) for p in D.partition(y, 2, "shards", seed=s)) for s in range(12)}
    assert len(deals) > 1  # the seed decides which classes go together


def test_shards_partition_sizes_and_label_skew():
    y = _labels(10_007)
    parts = D.partition(y, 10, "shards", seed=0, shards_per_client=3)
    size = 10_007 // 30
    assert all(len(p) == 3 * size for p in parts)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat)
    # a shard spans at most two classes (label runs are ~1000 long, shards ~333), so a client
    # sees at most 6 classes and most of its mass in at most 3
    for p in parts:
        counts = np.sort(np.bincount(y[p], minlength=10))[::-1]
        assert (counts > 0).sum() <= 6 and counts[:3].sum() >= 0.6 * len(p)
    with pytest.raises(D.DataError, match="shards per client"):
        D.partition(y, 10, "shards", shards_per_client=0)
    with pytest.raises(D.DataError, match="exceed"):
        D.partition(y[:20], 10, "shards", shards_per_client=3)
    with pytest.raises(D.DataError, match="alpha is only used"):
        D.partition(y, 10, "shards", alpha=0.5)
