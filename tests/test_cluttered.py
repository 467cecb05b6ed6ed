"""CLUTTERED_DIGITS: determinism, the train/val separation, shapes and labels, the composition
against a slow re-rendering of its recorded layout, and what most tokens are."""
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets


@pytest.fixture(scope="module")
def split():
    return datasets.digits_split()


@pytest.fixture(scope="module")
def val():
    return datasets.build_cluttered_digits(False, 64)


def render_reference(pool, layout, side):
    """Slow re-rendering of one image from its layout, with torch's bilinear resize, noise-free."""
    def enlarge(img, h, w):
        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
        return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()

    canvas = np.zeros((side, side), dtype=np.float32)
    top, left, h, w = layout["box"]
    canvas[top:top + h, left:left + w] = enlarge(pool[layout["digit"]], h, w)
    for src, (r, c, ch, cw), (ft, fl, fh, fw) in layout["fragments"]:
        piece = enlarge(pool[src, r:r + ch, c:c + cw], fh, fw)
        for y in range(fh):
            for x in range(fw):
                canvas[ft + y, fl + x] = max(canvas[ft + y, fl + x], piece[y, x])
    return np.rint(np.clip(canvas, 0, 1) * 255).astype(np.int64)


def test_validation_set_size_shapes_labels_and_balance(val, split):
    _, _, x_va, y_va = split
    assert len(val) >= 5000 and len(val) == len(x_va) * datasets.CLUTTER_VAL_PER_DIGIT
    for i in (0, 1, 359, 360, len(val) - 1):
        img, label = val[i]
        assert img.shape == (3, 64, 64) and img.dtype == torch.float32
        assert isinstance(label, int) and label == int(y_va[i % len(x_va)])
        assert label == int(y_va[val.layout(i)["digit"]])
        expect = (torch.from_numpy(val.canvas_uint8(i)).float() / 255 - 0.5) / 0.5  # DIGITS_MEAN / STD
        torch.testing.assert_close(img[0], expect, rtol=0, atol=1e-6)
        assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    # every held-out digit appears equally often: the balance is the split's, times 15
    assert np.array_equal(np.bincount(val.targets, minlength=10),
                          np.bincount(y_va, minlength=10) * datasets.CLUTTER_VAL_PER_DIGIT)


def test_validation_draws_only_on_held_out_digits(val, split):
    x_tr, _, x_va, _ = split
    assert np.array_equal(val.pool, x_va)  # the val pool IS the held-out split...
    train = datasets.build_cluttered_digits(True, 64)
    assert np.array_equal(train.pool, x_tr)
    # ...and no held-out digit equals a training digit, pixel for pixel
    assert not {a.tobytes() for a in x_va} & {a.tobytes() for a in x_tr}
    # every layout names pool digits only, never the image's own digit as clutter
    for i in range(0, len(val), 97):
        lay = val.layout(i)
        assert lay["digit"] == i % len(x_va)
        assert all(0 <= f[0] < len(x_va) and f[0] != lay["digit"] for f in lay["fragments"])


def test_composition_equals_slow_rendering_of_its_layout(split):
    # with the noise off, every pixel is explained by the layout: nothing but pool ink gets in
    x_tr, y_tr, _, _ = split
    ds = datasets.ClutteredDigits(x_tr, y_tr, canvas=64, length=40, seed=3, fresh=True, noise=0.0)
    for epoch in (0, 5):
        for i in range(0, 40, 3):
            got, lay = ds.compose(i, epoch)
            ref = render_reference(x_tr, lay, 64)
            diff = np.abs(got.astype(np.int64) - ref)
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float rounding at .5 only
            assert 3 <= len(lay["fragments"]) <= 5
            top, left, h, w = lay["box"]
            assert 24 <= h == w <= 32 and 0 <= top <= 64 - h and 0 <= left <= 64 - w


def test_clutter_comes_from_other_digits(split):
    x_tr, y_tr, _, _ = split
    ds = datasets.ClutteredDigits(x_tr[:2], y_tr[:2], canvas=48, length=20, fresh=True)
    for i in range(20):
        lay = ds.layout(i)
        assert lay["digit"] == i % 2 and all(f[0] == 1 - i % 2 for f in lay["fragments"])


def test_a_blank_pool_composes_blank_images():
    blank = np.zeros((6, 8, 8), dtype=np.float32)
    ds = datasets.ClutteredDigits(blank, np.arange(6), canvas=40, length=12, noise=0.0)
    assert all(ds.canvas_uint8(i).max() == 0 for i in range(12))
    noisy = datasets.ClutteredDigits(blank, np.arange(6), canvas=40, length=12)
    assert 0 < noisy.canvas_uint8(0).max() < 64  # mild noise (sd 0.05) only


def test_deterministic_for_seed_and_epoch(val):
    a = datasets.build_cluttered_digits(True, 64, seed=1)
    b = datasets.build_cluttered_digits(True, 64, seed=1)
    c = datasets.build_cluttered_digits(True, 64, seed=2)
    idx = [0, 7, 1436, 1437, len(a) - 1]
    for ep in (0, 3):
        a.set_epoch(ep)
        b.set_epoch(ep)
        c.set_epoch(ep)
        for i in idx:
            assert torch.equal(a[i][0], b[i][0])
        assert not all(torch.equal(a[i][0], c[i][0]) for i in idx)
    # a new epoch gives new placements of the same digits
    a.set_epoch(0)
    first = [a[i] for i in idx]
    a.set_epoch(1)
    assert all(x[1] == y[1] for x, y in zip(first, (a[i] for i in idx)))
    assert not any(torch.equal(x[0], a[i][0]) for x, i in zip(first, idx))
    # the same digit composed twice in one epoch (train_repeats) is placed differently
    assert a.layout(5)["digit"] == a.layout(5 + 1437)["digit"]
    assert (a.layout(5)["box"] != a.layout(5 + 1437)["box"]
            or a.layout(5)["fragments"] != a.layout(5 + 1437)["fragments"])
    # fixed sets ignore set_epoch and the training seed
    plain = datasets.build_cluttered_digits(True, 64, seed=1, fresh=False)
    before = plain[11][0].clone()
    plain.set_epoch(4)
    assert torch.equal(plain[11][0], before)
    assert torch.equal(plain[11][0], datasets.build_cluttered_digits(True, 64, seed=9, fresh=False)[11][0])
    again = datasets.build_cluttered_digits(False, 64)
    assert np.array_equal(again._canvases, val._canvases)


def test_loader_workers_compose_the_same_images():
    # each worker holds its own copy of the data set: the image depends on (seed, epoch, index) only
    ds = datasets.build_cluttered_digits(True, 64, seed=4)
    ds.set_epoch(2)
    sub = torch.utils.data.Subset(ds, list(range(0, 200, 10)))
    loaded = torch.cat([x for x, _ in torch.utils.data.DataLoader(sub, batch_size=5, num_workers=2)])
    direct = torch.stack([ds[i][0] for i in range(0, 200, 10)])
    assert torch.equal(loaded, direct)


def test_most_tokens_are_background(val):
    # share of the 64 patches (8 px) that overlap the labelled digit, over many val images
    shares = []
    for i in range(0, len(val), 25):
        top, left, h, w = val.layout(i)["box"]
        rows = (top + h - 1) // 8 - top // 8 + 1
        cols = (left + w - 1) // 8 - left // 8 + 1
        shares.append(rows * cols / 64)
    assert 0.1 < np.mean(shares) < 0.4


def test_build_dataset_and_stats():
    args = types.SimpleNamespace(data_set="CLUTTERED_DIGITS", input_size=48, reprob=0.0, seed=0)
    train, ncls = datasets.build_dataset(True, args)
    plain, _ = datasets.build_dataset(True, args, train_transform=False)
    assert ncls == 10 and train.fresh and not plain.fresh
    assert len(train) == len(plain) == 1437 * datasets.CLUTTER_TRAIN_REPEATS
    assert train[0][0].shape == (3, 48, 48)
    assert datasets.data_stats("CLUTTERED_DIGITS") == (datasets.DIGITS_MEAN, datasets.DIGITS_STD)
    assert "CLUTTERED_DIGITS" in datasets.DATA_SETS


def test_bad_arguments(split):
    x_tr, y_tr, _, _ = split
    with pytest.raises(datasets.DataError, match="at least 16 px"):
        datasets.ClutteredDigits(x_tr, y_tr, canvas=12)
    with pytest.raises(datasets.DataError, match="digit_size"):
        datasets.ClutteredDigits(x_tr, y_tr, canvas=64, digit_size=(0.5, 1.5))
    with pytest.raises(datasets.DataError, match="fragment_cut"):
        datasets.ClutteredDigits(x_tr, y_tr, canvas=64, fragment_cut=(2, 9))
