"""CIFAR-10 loader (real files when present, fake python batches otherwise) and the synthetic dataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from fastpurify.data import cifar10_classes, default_data_dir, find_cifar10, load_cifar10, synthetic_dataset

DATA = default_data_dir()
REAL = DATA / "cifar10" / "cifar-10-batches-py"
needs_real = pytest.mark.skipif(
    not (REAL / "test_batch").is_file(),
    reason=f"real CIFAR-10 batches not found at {REAL} (set FASTPURIFY_DATA to the data folder)",
)


def _write_batch(path, data: np.ndarray, labels: list[int]) -> None:
    with open(path, "wb") as f:
        pickle.dump({"data": data, "labels": labels, "batch_label": path.name, "filenames": []}, f, protocol=2)


@pytest.fixture()
def fake_cifar(tmp_path):
    """data_batch_1, 2, 4 (no 3, 5) of 6 images each, pixel value = 10 * batch + image index, plus test/meta."""
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in (1, 2, 4):
        data = np.repeat(np.arange(6, dtype=np.uint8)[:, None] + 10 * b, 3072, axis=1)
        _write_batch(folder / f"data_batch_{b}", data, [b] * 6)
    _write_batch(folder / "test_batch", np.full((4, 3072), 255, np.uint8), [0, 1, 2, 3])
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return tmp_path


# ------------------------------------------------------------------------------------------------- locating


def test_find_cifar10_accepts_folder_parent_grandparent(fake_cifar):
    folder = fake_cifar / "cifar10" / "cifar-10-batches-py"
    assert find_cifar10(folder) == folder
    assert find_cifar10(folder.parent) == folder
    assert find_cifar10(fake_cifar) == folder
    assert find_cifar10(str(fake_cifar)) == folder


def test_find_cifar10_env(fake_cifar, monkeypatch):
    monkeypatch.setenv("FASTPURIFY_DATA", str(fake_cifar))
    assert default_data_dir() == fake_cifar
    assert find_cifar10() == fake_cifar / "cifar10" / "cifar-10-batches-py"


def test_find_cifar10_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        find_cifar10(tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar10" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "test_batch" in msg


def test_default_data_dir_is_beside_the_repo(monkeypatch):
    import fastpurify

    monkeypatch.delenv("FASTPURIFY_DATA", raising=False)
    from pathlib import Path

    assert default_data_dir() == Path(fastpurify.__file__).resolve().parents[2] / "shared" / "data"


# ------------------------------------------------------------------------------------------------- fake files


def test_fake_train_default_is_all_present_in_order(fake_cifar):
    x, y = load_cifar10(fake_cifar)
    assert x.shape == (18, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [1] * 6 + [2] * 6 + [4] * 6
    assert (x[:, 0, 0, 0] * 255).round().tolist() == [10 * b + i for b in (1, 2, 4) for i in range(6)]


def test_fake_batch_subset_and_count(fake_cifar):
    x, y = load_cifar10(fake_cifar, batches=[4, 1], count=8)
    assert y.tolist() == [4] * 6 + [1] * 2  # requested order, first `count`
    assert x.shape[0] == 8
    x0, _ = load_cifar10(fake_cifar, count=0)
    assert x0.shape == (0, 3, 32, 32)


def test_fake_missing_batch(fake_cifar):
    with pytest.raises(FileNotFoundError) as e:
        load_cifar10(fake_cifar, batches=[1, 3])
    msg = str(e.value)
    assert "[3]" in msg and "[1, 2, 4]" in msg


@pytest.mark.parametrize("bad", [[0], [6], [], ["1"], [True]])
def test_fake_bad_batches(fake_cifar, bad):
    with pytest.raises(ValueError, match="subset of 1..5"):
        load_cifar10(fake_cifar, batches=bad)


def test_fake_count_too_large(fake_cifar):
    with pytest.raises(ValueError) as e:
        load_cifar10(fake_cifar, batches=[1], count=7)
    assert "count=7" in str(e.value) and "only 6" in str(e.value)


def test_fake_test_split_and_classes(fake_cifar):
    x, y = load_cifar10(fake_cifar, split="test")
    assert y.tolist() == [0, 1, 2, 3] and float(x.min()) == 1.0
    assert cifar10_classes(fake_cifar)[3] == "c3"


def test_unknown_split(fake_cifar):
    with pytest.raises(ValueError) as e:
        load_cifar10(fake_cifar, split="val")
    assert "'val'" in str(e.value) and "'train'" in str(e.value) and "'test'" in str(e.value)


def test_corrupt_batch(fake_cifar):
    (fake_cifar / "cifar10" / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_2 is not a CIFAR-10 python batch"):
        load_cifar10(fake_cifar)


# ------------------------------------------------------------------------------------------------- real files


@needs_real
def test_real_test_batch_exact_values():
    x, y = load_cifar10(split="test")
    assert x.shape == (10000, 3, 32, 32) and y.shape == (10000,)
    assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the well-known first test labels
    assert torch.bincount(y).tolist() == [1000] * 10
    with open(REAL / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="latin1")["data"]
    expected = torch.from_numpy(raw[:100].reshape(100, 3, 32, 32).astype(np.float32) / np.float32(255))
    torch.testing.assert_close(x[:100], expected, rtol=0, atol=0)
    # channel order: row = 1024 R then G then B values
    assert x[7, 1, 0, 0] == raw[7, 1024] / np.float32(255)


@needs_real
def test_real_train_subset():
    x, y = load_cifar10(split="train", batches=[1], count=2500)
    assert x.shape == (2500, 3, 32, 32)
    assert y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # data_batch_1 starts frog, truck, truck, ...
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


@needs_real
def test_real_classes():
    assert cifar10_classes() == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]


# ------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_range_balance():
    x, y = synthetic_dataset(n=1000)
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0.02 - 1e-6 and float(x.max()) <= 0.9 + 1e-6
    assert torch.bincount(y).tolist() == [100] * 10
    # no clean image has the BadNets trigger (a white bottom-right patch) or any white pixel at all
    assert float(x[:, :, 27:31, 27:31].max()) < 0.95


def test_synthetic_deterministic_and_disjoint():
    a, ya = synthetic_dataset(n=200, seed=3)
    b, yb = synthetic_dataset(n=200, seed=3)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    t, _ = synthetic_dataset(n=200, seed=3, split="test")
    c, _ = synthetic_dataset(n=200, seed=4)
    # different splits / seeds: no image of one appears in the other
    assert torch.cdist(a.flatten(1), t.flatten(1)).min() > 1.0
    assert torch.cdist(a.flatten(1), c.flatten(1)).min() > 1.0


def test_synthetic_classes_are_not_linear_in_pixels():
    # Class means are nearly flat (random phase): nearest-class-mean on pixels must be close to chance.
    x, y = synthetic_dataset(n=2000)
    xt, yt = synthetic_dataset(n=1000, split="test")
    means = torch.stack([x[y == c].flatten(1).mean(0) for c in range(10)])
    acc = (torch.cdist(xt.flatten(1), means).argmin(1) == yt).float().mean().item()
    assert acc < 0.3


def test_synthetic_diagonal_classes_hold_both_mirror_orientations():
    # Flip augmentation maps an orientation θ to -θ; a class must hold both so labels stay valid. The
    # normalised gradient correlation E[gx*gy] is ±(something) for ±θ: per class its mean must be near 0
    # while its magnitude is not (central differences, so gx and gy share no pixel noise).
    x, y = synthetic_dataset(n=2000)
    g = x.mean(1)
    gx = g[:, 1:-1, 2:] - g[:, 1:-1, :-2]
    gy = g[:, 2:, 1:-1] - g[:, :-2, 1:-1]
    corr = (gx * gy).mean((1, 2)) / (gx.pow(2) + gy.pow(2)).mean((1, 2))
    for c in (1, 2, 5, 6, 9):  # the ±30° and ±60° classes
        assert corr[y == c].abs().mean() > 0.1
        assert corr[y == c].mean().abs() < 0.25 * corr[y == c].abs().mean()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "val"}, "'val'"),
        ({"n": 0}, "n must"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 17}, "num_classes"),
    ],
)
def test_synthetic_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_dataset(**{"n": 10, **kwargs})
