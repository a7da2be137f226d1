"""Triggers: numerics, the PNG reader, parse_trigger syntax and errors, poisoned-set builders."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from fastpurify.data import default_data_dir
from fastpurify.triggers import (
    AddTrigger,
    BlendTrigger,
    MaskedTrigger,
    PatchTrigger,
    load_image,
    load_mask,
    parse_trigger,
    poison_all_to_all,
    poison_all_to_one,
    triggered_test_set,
)

TROJAN_PNG = default_data_dir() / "ibau" / "trojan_wm.png"


# ------------------------------------------------------------------------------------- a reference PNG writer


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _filter_row(ftype: int, row: np.ndarray, prev: np.ndarray, bpp: int) -> bytes:
    r, p = row.astype(np.int64), prev.astype(np.int64)
    left = np.concatenate([np.zeros(bpp, np.int64), r[:-bpp]])
    upleft = np.concatenate([np.zeros(bpp, np.int64), p[:-bpp]])
    if ftype == 0:
        pred = np.zeros_like(r)
    elif ftype == 1:
        pred = left
    elif ftype == 2:
        pred = p
    elif ftype == 3:
        pred = (left + p) // 2
    else:
        est = left + p - upleft
        pa, pb, pc = abs(est - left), abs(est - p), abs(est - upleft)
        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, p, upleft))
    return bytes([ftype]) + ((r - pred) % 256).astype(np.uint8).tobytes()


def write_png(path, img: np.ndarray, color_type: int, palette: np.ndarray | None = None, filters=(0, 1, 2, 3, 4)):
    """img: H×W×C uint8 (C = 1, 3, 2, 4 or palette indices H×W×1); rows cycle through `filters`."""
    h, w, c = img.shape
    flat = img.reshape(h, w * c)
    raw, prev = b"", np.zeros(w * c, np.uint8)
    for i in range(h):
        raw += _filter_row(filters[i % len(filters)], flat[i], prev, c)
        prev = flat[i]
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))
    if palette is not None:
        out += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    # split the data over two IDAT chunks, as encoders may do
    z = zlib.compress(raw)
    out += _chunk(b"IDAT", z[:10]) + _chunk(b"IDAT", z[10:]) + _chunk(b"IEND", b"")
    path.write_bytes(out)
    return path


@pytest.fixture()
def rgb():
    return np.random.default_rng(0).integers(0, 256, size=(9, 7, 3), dtype=np.uint8)


def _as_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255


# ------------------------------------------------------------------------------------------------- PNG reader


@pytest.mark.parametrize("ftype", [0, 1, 2, 3, 4])
def test_png_each_filter(tmp_path, rgb, ftype):
    t = load_image(write_png(tmp_path / "a.png", rgb, 2, filters=(ftype,)))
    assert t.shape == (3, 9, 7) and t.dtype == torch.float32
    torch.testing.assert_close(t, _as_tensor(rgb), rtol=0, atol=0)


def test_png_rgba_grey_palette(tmp_path, rgb):
    alpha = np.full((9, 7, 1), 17, np.uint8)
    t = load_image(write_png(tmp_path / "rgba.png", np.concatenate([rgb, alpha], 2), 6))
    torch.testing.assert_close(t, _as_tensor(rgb), rtol=0, atol=0)  # alpha dropped
    grey = rgb[..., :1]
    t = load_image(write_png(tmp_path / "g.png", grey, 0))
    torch.testing.assert_close(t, _as_tensor(np.repeat(grey, 3, 2)), rtol=0, atol=0)
    t = load_image(write_png(tmp_path / "ga.png", np.concatenate([grey, alpha], 2), 4))
    torch.testing.assert_close(t, _as_tensor(np.repeat(grey, 3, 2)), rtol=0, atol=0)
    palette = np.random.default_rng(1).integers(0, 256, size=(16, 3), dtype=np.uint8)
    idx = (rgb[..., :1] % 16).astype(np.uint8)
    t = load_image(write_png(tmp_path / "p.png", idx, 3, palette=palette))
    torch.testing.assert_close(t, _as_tensor(palette[idx[..., 0]]), rtol=0, atol=0)


def test_png_errors(tmp_path, rgb):
    (tmp_path / "x.png").write_bytes(b"GIF89a....")
    with pytest.raises(ValueError, match="not a PNG"):
        load_image(tmp_path / "x.png")
    data = bytearray(write_png(tmp_path / "i.png", rgb, 2).read_bytes())
    data[8 + 8 + 12] = 1  # IHDR interlace byte -> Adam7
    (tmp_path / "i.png").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="interlace 1"):
        load_image(tmp_path / "i.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_npy_image_and_mask(tmp_path, rgb):
    np.save(tmp_path / "img.npy", rgb)  # H×W×C uint8
    torch.testing.assert_close(load_image(tmp_path / "img.npy"), _as_tensor(rgb), rtol=0, atol=0)
    m = np.zeros((9, 7), np.float32)
    m[2:4, 3:5] = 1
    np.save(tmp_path / "m.npy", m)
    assert torch.equal(load_mask(tmp_path / "m.npy"), torch.from_numpy(m))
    np.save(tmp_path / "bad.npy", m * 3)
    with pytest.raises(ValueError, match="must lie in"):
        load_mask(tmp_path / "bad.npy")


@pytest.mark.skipif(not TROJAN_PNG.is_file(), reason=f"real trigger image not found at {TROJAN_PNG}")
def test_real_trojan_png():
    t = load_image(TROJAN_PNG)
    assert t.shape == (3, 32, 32)
    k = t * 255
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-4)  # exactly uint8 / 255
    assert float(t.max()) > 0.1 and float(t.min()) == 0.0


# ------------------------------------------------------------------------------------------------- triggers


def test_patch_numerics_and_no_mutation():
    x = torch.rand(5, 3, 32, 32)
    x0 = x.clone()
    out = PatchTrigger(4, 27, 27, 1.0)(x)
    assert torch.equal(x, x0)
    expected = x.clone()
    expected[:, :, 27:31, 27:31] = 1.0
    assert torch.equal(out, expected)
    assert torch.equal(PatchTrigger(3, 0, 5, 0.25)(x)[:, :, 0:3, 5:8], torch.full((5, 3, 3, 3), 0.25))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_triggers_keep_dtype(dtype):
    x = torch.rand(2, 3, 32, 32).to(dtype)
    img = torch.rand(3, 32, 32)
    for trig in (PatchTrigger(), BlendTrigger(img, 0.3), AddTrigger(img), MaskedTrigger(img, torch.ones(32, 32))):
        out = trig(x)
        assert out.dtype == dtype and out.device == x.device and out.shape == x.shape


def test_patch_outside_image():
    with pytest.raises(ValueError, match="rows 27..30.*outside the 28×28 image"):
        PatchTrigger(4, 27, 27)(torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match="size"):
        PatchTrigger(size=0)
    with pytest.raises(ValueError, match="value"):
        PatchTrigger(value=2.0)


def test_blend_add_masked_numerics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    img = torch.rand(3, 8, 8, generator=g)
    torch.testing.assert_close(BlendTrigger(img, 0.2)(x), 0.8 * x + 0.2 * img)
    add = AddTrigger(img)(x)
    torch.testing.assert_close(add, (x + img).clamp(0, 1))
    assert float(add.max()) == 1.0  # the clip is active on this data
    mask = (torch.rand(8, 8, generator=g) > 0.5).float()
    torch.testing.assert_close(MaskedTrigger(img, mask)(x), x * (1 - mask) + img * mask)
    mask3 = torch.rand(3, 8, 8, generator=g)
    torch.testing.assert_close(MaskedTrigger(img, mask3)(x), x * (1 - mask3) + img * mask3)


def test_image_size_mismatch():
    with pytest.raises(ValueError, match=r"\(3, 8, 8\) does not fit images of shape \(3, 32, 32\)"):
        AddTrigger(torch.rand(3, 8, 8))(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="float batch"):
        PatchTrigger()(torch.zeros(3, 32, 32))


@pytest.mark.skipif(not TROJAN_PNG.is_file(), reason=f"real trigger image not found at {TROJAN_PNG}")
def test_trojan_add_matches_definition():
    x = torch.rand(3, 3, 32, 32)
    t = parse_trigger(f"add:{TROJAN_PNG}")
    assert isinstance(t, AddTrigger)
    torch.testing.assert_close(t(x), (x + load_image(TROJAN_PNG)).clamp(0, 1), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- parse_trigger


@pytest.fixture()
def files(tmp_path):
    img = np.random.default_rng(2).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    png = write_png(tmp_path / "t.png", img, 2)
    mask = np.zeros((32, 32), np.float32)
    mask[:4, :4] = 1
    np.save(tmp_path / "m.npy", mask)
    return png, tmp_path / "m.npy", _as_tensor(img), torch.from_numpy(mask)


def test_parse_patch():
    t = parse_trigger("patch")
    assert (t.size, t.row, t.col, t.value) == (4, 27, 27, 1.0)
    t = parse_trigger("patch:size=3,row=29, col=28,value=0.5")
    assert (t.size, t.row, t.col, t.value) == (3, 29, 28, 0.5)
    assert repr(t) == "PatchTrigger('patch:size=3,row=29,col=28,value=0.5')"
    assert parse_trigger(t.spec).spec == t.spec  # the spec round-trips


def test_parse_file_triggers(files):
    png, npy, img, mask = files
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(parse_trigger(f"add:{png}")(x), (x + img).clamp(0, 1))
    torch.testing.assert_close(parse_trigger(f"add:image={png}")(x), (x + img).clamp(0, 1))
    b = parse_trigger(f"blend:{png},alpha=0.1")
    torch.testing.assert_close(b(x), 0.9 * x + 0.1 * img)
    assert parse_trigger(f"blend:{png}").alpha == 0.2
    assert parse_trigger(b.spec).spec == b.spec
    m = parse_trigger(f"masked:pattern={png},mask={npy}")
    torch.testing.assert_close(m(x), x * (1 - mask) + img * mask)
    assert str(png) in repr(m) and str(npy) in repr(m)


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("", ["empty"]),
        ("sticker:size=3", ["'sticker:size=3'", "unknown trigger kind 'sticker'", "patch", "masked"]),
        ("patch:size=3,colour=2", ["colour", "valid keys: size, row, col, value"]),
        ("patch:size=big", ["size='big' is not an integer"]),
        ("patch:size=2.5", ["is not an integer"]),
        ("patch:value=white", ["value='white' is not a number"]),
        ("patch:size=3,,row=1", ["empty item"]),
        ("patch:size=3,size=4", ["given twice"]),
        ("patch:4", ["key=value"]),
        ("patch:size=0", ["size must be an integer >= 1"]),
        ("add:", ["exactly one image"]),
        ("blend:a.png,b.png", ["exactly one image"]),
        ("masked:pattern=a.png", ["missing mask"]),
    ],
)
def test_parse_bad_specs(spec, fragments):
    with pytest.raises(ValueError) as e:
        parse_trigger(spec)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, (f, msg)
    assert "valid syntax: patch[:size=4,row=27,col=27,value=1]" in msg


def test_parse_bad_alpha_and_missing_files(files, tmp_path):
    png, npy, _, _ = files
    with pytest.raises(ValueError, match="alpha=1.5 is outside"):
        parse_trigger(f"blend:{png},alpha=1.5")
    with pytest.raises(ValueError, match="alpha='x' is not a number"):
        parse_trigger(f"blend:{png},alpha=x")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        parse_trigger(f"add:{tmp_path / 'nope.png'}")
    with pytest.raises(FileNotFoundError, match="nomask.npy"):
        parse_trigger(f"masked:pattern={png},mask={tmp_path / 'nomask.npy'}")


# ------------------------------------------------------------------------------------------------- builders


def _labels(n=100, classes=10):
    return torch.arange(n) % classes


def test_poison_all_to_one():
    x, y = torch.rand(100, 3, 32, 32), _labels()
    x0, y0 = x.clone(), y.clone()
    xp, yp, idx = poison_all_to_one(x, y, PatchTrigger(), target=3, rate=0.2, seed=1)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert idx.numel() == 20 and idx.dtype == torch.int64 and torch.equal(idx, idx.sort().values)
    assert (y[idx] != 3).all() and (yp[idx] == 3).all()
    assert (xp[idx][:, :, 27:31, 27:31] == 1).all()
    rest = torch.ones(100, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(xp[rest], x[rest]) and torch.equal(yp[rest], y[rest])
    _, _, idx2 = poison_all_to_one(x, y, PatchTrigger(), target=3, rate=0.2, seed=1)
    _, _, idx3 = poison_all_to_one(x, y, PatchTrigger(), target=3, rate=0.2, seed=2)
    assert torch.equal(idx, idx2) and not torch.equal(idx, idx3)


def test_poison_all_to_one_validation():
    x, y = torch.rand(100, 3, 32, 32), _labels()
    with pytest.raises(ValueError, match="target 10 is outside"):
        poison_all_to_one(x, y, PatchTrigger(), target=10, rate=0.1)
    with pytest.raises(ValueError, match="target -1"):
        poison_all_to_one(x, y, PatchTrigger(), target=-1, rate=0.1)
    with pytest.raises(ValueError, match="rate 1.5"):
        poison_all_to_one(x, y, PatchTrigger(), target=0, rate=1.5)
    with pytest.raises(ValueError, match="only 90 have a label != target 0"):
        poison_all_to_one(x, y, PatchTrigger(), target=0, rate=0.95)
    with pytest.raises(ValueError, match="label 12 in y is outside"):
        poison_all_to_one(x, y + 3, PatchTrigger(), target=0, rate=0.1, num_classes=10)
    with pytest.raises(ValueError, match="x holds 100 images but y holds 99"):
        poison_all_to_one(x, y[:99], PatchTrigger(), target=0, rate=0.1)


def test_poison_all_to_all():
    x, y = torch.rand(50, 3, 32, 32), _labels(50)
    xp, yp, idx = poison_all_to_all(x, y, PatchTrigger(), rate=0.5, num_classes=10)
    assert idx.numel() == 25
    assert torch.equal(yp[idx], (y[idx] + 1) % 10)
    assert (xp[idx][:, :, 27:31, 27:31] == 1).all()
    with pytest.raises(ValueError, match="label 10"):
        poison_all_to_all(x, y + 1, PatchTrigger(), rate=0.5, num_classes=10)


def test_triggered_test_set():
    x, y = torch.rand(30, 3, 32, 32), _labels(30)
    xt, yt = triggered_test_set(x, y, PatchTrigger(), target=2)
    assert xt.shape[0] == 27 and (yt != 2).all()
    torch.testing.assert_close(xt, PatchTrigger()(x[y != 2]))
    with pytest.raises(ValueError, match="target 10"):
        triggered_test_set(x, y, PatchTrigger(), target=10)


def test_random_patch_trigger_moves_per_image_and_repeats_per_call():
    from fastpurify.triggers import RandomPatchTrigger

    t = parse_trigger("randpatch:size=3,value=1,seed=4")
    assert isinstance(t, RandomPatchTrigger) and t.spec == "randpatch:size=3,value=1,seed=4"
    x = torch.zeros(64, 3, 32, 32)
    out = t(x)
    assert torch.equal(out, t(x)) and x.abs().sum() == 0  # same positions each call; x not mutated
    where = (out[:, 0] == 1).nonzero()
    assert all(int((out[i, 0] == 1).sum()) == 9 for i in range(64))  # one whole 3×3 patch per image
    corners = {(int(where[where[:, 0] == i][:, 1].min()), int(where[where[:, 0] == i][:, 2].min())) for i in range(64)}
    assert len(corners) > 32  # positions differ between images
    assert not torch.equal(out, parse_trigger("randpatch:size=3,seed=5")(x))


@pytest.mark.parametrize("spec,msg", [("randpatch:size=0", "size must be an integer >= 1"),
                                      ("randpatch:value=1.5", r"value must lie in \[0, 1\]"),
                                      ("randpatch:3", "only key=value"), ("randpatch:row=2", "unknown key")])
def test_random_patch_trigger_bad_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_trigger(spec)
