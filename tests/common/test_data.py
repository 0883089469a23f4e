"""Paired datasets: real broken files on disk, stem matching, identical crops on both sides,
deterministic synthetic pairs, and degradations that do what they say."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import DataConfig
from common.data import (
    TEST_PHOTOS,
    BadFileWarning,
    DatasetError,
    PairedFolderDataset,
    SyntheticRestorationDataset,
    blur,
    build_dataset,
    low_light,
    rain,
)


def _image(seed: int, w: int = 48, h: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def _truncated_png(path: Path) -> Path:
    _save(path, _image(99, 64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def lol_root(tmp_path: Path) -> Path:
    """low/ + high/ with 3 good pairs (one across .png/.bmp), plus three kinds of bad files."""
    root = tmp_path / "lol"
    for i, name in enumerate(["a", "b", "c"]):
        img = _image(i)
        _save(root / "low" / f"{name}.png", img // 4)
        _save(root / "high" / (f"{name}.bmp" if name == "b" else f"{name}.png"), img)
    _truncated_png(root / "low" / "trunc.png")  # a truncated PNG ...
    _save(root / "high" / "trunc.png", _image(5))  # ... whose partner is fine
    (root / "high" / "text.png").write_text("not an image")  # a text file renamed .png
    _save(root / "low" / "text.png", _image(6))
    _save(root / "low" / "lonely.png", _image(7))  # an LQ without GT
    (root / "low" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored
    return root


# --------------------------------------------------------------------------------- folder data
def test_bad_files_are_skipped_named_and_counted(lol_root):
    with pytest.warns(BadFileWarning) as record:
        ds = PairedFolderDataset(lol_root, "lol", resolution=32, on_bad_file="skip")
    assert ds.names == ["a", "b", "c"]
    assert dict(ds.skipped) == {"unreadable": 2, "unpaired": 1}
    messages = "\n".join(str(w.message) for w in record)
    for bad in ("low/trunc.png", "high/text.png", "low/lonely.png"):
        assert bad in messages
    assert {(p.name, reason) for p, reason in ds.skipped_files} == {
        ("trunc.png", "unreadable"),
        ("text.png", "unreadable"),
        ("lonely.png", "unpaired"),
    }
    # Every kept pair is read back without a warning, LQ and GT from the same stem.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairs = [ds[i] for i in range(len(ds))]
    for i, pair in enumerate(pairs):
        assert pair.id == i and pair.lq.shape == pair.gt.shape == (32, 32, 3)
        assert pair.lq.dtype == pair.gt.dtype == np.uint8


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("trunc", "lq/trunc.png: unreadable"),
        ("text", "gt/text.png: unreadable"),
        ("lonely", "lq/lonely.png: unpaired"),
    ],
)
def test_bad_files_raise_with_error(tmp_path, bad, fragment):
    root = tmp_path / "d"
    _save(root / "lq" / "ok.png", _image(0))
    _save(root / "gt" / "ok.jpg", _image(0))
    if bad == "trunc":
        _truncated_png(root / "lq" / "trunc.png")
        _save(root / "gt" / "trunc.png", _image(1))
    elif bad == "text":
        _save(root / "lq" / "text.png", _image(1))
        (root / "gt" / "text.png").write_text("hello")
    else:
        _save(root / "lq" / "lonely.png", _image(1))
    with pytest.raises(DatasetError, match=fragment):
        PairedFolderDataset(root, "lq_gt", resolution=16, on_bad_file="error")
    with pytest.warns(BadFileWarning):
        assert PairedFolderDataset(root, "lq_gt", resolution=16, on_bad_file="skip").names == ["ok"]


def test_missing_folders_and_empty_dataset_are_named(tmp_path):
    _save(tmp_path / "low" / "a.png", _image(0))
    with pytest.raises(DatasetError, match=r"high: missing folder \(layout 'lol' expects"):
        PairedFolderDataset(tmp_path, "lol")
    (tmp_path / "high").mkdir()
    with pytest.warns(BadFileWarning), pytest.raises(DatasetError, match="no valid LQ/GT pairs"):
        PairedFolderDataset(tmp_path, "lol")


@pytest.mark.parametrize("resize", ["resize", "center_crop", "random_crop"])
def test_both_sides_get_the_same_crop(tmp_path, resize):
    # GT file == LQ file: any difference would be a crop/resize mismatch.
    for i in range(3):
        img = _image(10 + i, w=90, h=50)
        _save(tmp_path / "lq" / f"{i}.png", img)
        _save(tmp_path / "gt" / f"{i}.png", img)
    ds = PairedFolderDataset(tmp_path, "lq_gt", resolution=32, resize=resize, seed=3)
    for i in range(3):
        p = ds[i]
        assert p.lq.shape == (32, 32, 3) and np.array_equal(p.lq, p.gt)
    if resize == "random_crop":
        first = ds[0].lq
        assert np.array_equal(
            first, PairedFolderDataset(tmp_path, "lq_gt", 32, resize, seed=3)[0].lq
        )
        ds.set_epoch(1)
        assert not np.array_equal(first, ds[0].lq)


def test_sr_style_lq_is_brought_to_the_gt_grid_and_aspect_mismatch_is_skipped(tmp_path):
    gt = _image(0, w=64, h=48)
    _save(tmp_path / "gt" / "sr.png", gt)
    _save(
        tmp_path / "lq" / "sr.png",
        np.asarray(Image.fromarray(gt).resize((16, 12), Image.Resampling.BICUBIC)),
    )
    _save(tmp_path / "gt" / "odd.png", gt)
    _save(tmp_path / "lq" / "odd.png", _image(1, w=64, h=64))
    with pytest.warns(BadFileWarning, match="odd.png: skipped, size_mismatch"):
        ds = PairedFolderDataset(tmp_path, "lq_gt", resolution=16, resize="resize")
    assert ds.names == ["sr"] and ds.skipped == {"size_mismatch": 1}
    assert ds[0].lq.shape == ds[0].gt.shape == (16, 16, 3)


def test_duplicate_stem_and_file_vanishing_mid_run(tmp_path):
    for name in ("a", "b"):
        _save(tmp_path / "lq" / f"{name}.png", _image(0))
        _save(tmp_path / "gt" / f"{name}.png", _image(0))
    _save(tmp_path / "lq" / "a.jpg", _image(1))  # a.png and a.jpg: which one is the LQ of 'a'?
    with pytest.warns(BadFileWarning, match="duplicate_stem"):
        ds = PairedFolderDataset(tmp_path, "lq_gt", resolution=16)
    assert ds.names == ["b"] and ds.skipped["duplicate_stem"] == 2 and ds.skipped["unpaired"] == 1

    _save(tmp_path / "lq" / "c.png", _image(2))
    _save(tmp_path / "gt" / "c.png", _image(2))
    with pytest.warns(BadFileWarning):
        ds = PairedFolderDataset(tmp_path, "lq_gt", resolution=16)
    (tmp_path / "gt" / "b.png").write_bytes(b"gone bad")  # after validation, before use
    with pytest.warns(BadFileWarning, match="unreadable_at_load"):
        pair = ds[0]
    assert pair.name == "c" and pair.id == 1  # the next good pair, labelled as itself
    assert ds.skipped["unreadable_at_load"] == 1


# ------------------------------------------------------------------------------ synthetic data
def test_synthetic_is_deterministic_and_pairs_differ():
    a = SyntheticRestorationDataset(6, 32, ["low_light", "blur", "rain"], seed=1)
    b = SyntheticRestorationDataset(6, 32, ["low_light", "blur", "rain"], seed=1)
    c = SyntheticRestorationDataset(6, 32, ["low_light", "blur", "rain"], seed=2)
    for i in range(6):
        assert np.array_equal(a[i].lq, b[i].lq) and np.array_equal(a[i].gt, b[i].gt)
        assert a[i].lq.shape == a[i].gt.shape == (32, 32, 3) and a[i].lq.dtype == np.uint8
    assert not np.array_equal(a[0].gt, c[0].gt)
    gts = [a[i].gt for i in range(6)]
    assert all(not np.array_equal(gts[i], gts[j]) for i in range(6) for j in range(i))
    # Index 8 reuses photo 0 with another crop.
    d = SyntheticRestorationDataset(9, 32, [], seed=1)
    assert d[0].name.endswith("astronaut") and d[8].name.endswith("astronaut")
    assert not np.array_equal(d[0].gt, d[8].gt)
    assert np.array_equal(d[0].lq, d[0].gt)  # no degradation: LQ == GT


def test_test_split_is_held_out():
    train = SyntheticRestorationDataset(8, 32, ["blur"], seed=0, split="train")
    test = SyntheticRestorationDataset(3, 32, ["blur"], seed=0, split="test")
    assert {n.split("-")[-1] for n in test.names} == set(TEST_PHOTOS)
    assert not {n.split("-")[-1] for n in train.names} & set(TEST_PHOTOS)
    cfg = DataConfig(num_synthetic=5, num_test=2, resolution=32)
    tr, te = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(tr) == 5 and len(te) == 2 and te[0].name.startswith("test-")
    with pytest.raises(DatasetError, match="data.test_root"):
        build_dataset(DataConfig(kind="folder", root="/nonexistent"), "test")


def _gt(seed: int = 0) -> np.ndarray:
    return SyntheticRestorationDataset(1, 64, [], seed=seed)[0].gt.astype(np.float32) / 255.0


def _high_frequency_energy(img: np.ndarray) -> float:
    g = img.mean(axis=2)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(np.mean(lap**2))


def test_low_light_darkens_and_adds_noise():
    x = _gt()
    rng = np.random.default_rng(0)
    y = low_light(x, rng)
    assert y.dtype == np.float32 and y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert y.mean() < 0.5 * x.mean()
    # Noise-free it is exactly gain · x^γ; the noise is what remains.
    clean = low_light(x, rng, gamma=2.0, gain=0.2, photons=1e9, read_noise=0.0)
    np.testing.assert_allclose(clean, 0.2 * x.astype(np.float64) ** 2, atol=1e-4)
    noisy = low_light(x, rng, gamma=2.0, gain=0.2, photons=50, read_noise=0.01)
    assert np.std(noisy - clean) > 0.01


@pytest.mark.parametrize("kind", ["gaussian", "motion"])
def test_blur_removes_high_frequencies(kind):
    x = _gt()
    y = blur(x, np.random.default_rng(0), kind=kind)
    assert y.shape == x.shape and y.dtype == np.float32
    assert _high_frequency_energy(y) < 0.5 * _high_frequency_energy(x)
    assert abs(y.mean() - x.mean()) < 0.02  # blur moves no light around on average


def test_rain_adds_bright_vertical_streaks():
    x = _gt() * 0.5  # mid-grey room for bright streaks
    y = rain(x, np.random.default_rng(0), angle=0.0, length=9, density=0.004, intensity=0.8)
    diff = (y - x).mean(axis=2)
    assert diff.min() >= -1e-6  # screen blend only brightens
    bright = diff > 0.2
    assert bright.sum() > 20
    # Streaks are vertical lines: a bright pixel's vertical neighbour is bright far more often
    # than its horizontal neighbour.
    vertical = (bright[1:, :] & bright[:-1, :]).sum()
    horizontal = (bright[:, 1:] & bright[:, :-1]).sum()
    assert vertical > 3 * max(horizontal, 1)
    # Drawn parameters are seeded: same rng seed, same rain.
    assert np.array_equal(rain(x, np.random.default_rng(3)), rain(x, np.random.default_rng(3)))


def test_error_mode_names_every_bad_file_at_once(lol_root):
    with pytest.raises(DatasetError) as err:
        PairedFolderDataset(lol_root, "lol", resolution=32, on_bad_file="error")
    msg = str(err.value)
    assert "3 bad file(s)" in msg
    for bad in ("low/trunc.png: unreadable", "high/text.png: unreadable", "low/lonely.png: unpaired"):
        assert bad in msg


def test_skip_mode_summary_names_the_skipped_files(lol_root):
    with pytest.warns(BadFileWarning):
        ds = PairedFolderDataset(lol_root, "lol", resolution=32, on_bad_file="skip")
    line = ds.summary()
    assert "3 pairs; skipped 3 file(s)" in line and "trunc.png (unreadable)" in line and "lonely.png (unpaired)" in line


@pytest.mark.parametrize(
    "values, mode, expect",
    [
        (np.array([[0.0, 0.5, 1.0]], np.float32), "F", [0, 128, 255]),  # float in [0, 1]: not all black
        (np.array([[0.0, 100.0, 255.0]], np.float32), "F", [0, 100, 255]),  # float in [0, 255]: kept
        (np.array([[0, 32768, 65535]], np.int32), "I", [0, 128, 255]),  # 16-bit data in an int32 file: not white
        (np.array([[0, 7, 255]], np.int32), "I", [0, 7, 255]),  # 8-bit data in an int32 file: kept
    ],
)
def test_float_and_wide_integer_tiffs_are_scaled_not_clipped(tmp_path, values, mode, expect):
    from common.data import _read_rgb

    path = tmp_path / "x.tif"
    Image.fromarray(values, mode=mode).save(path)
    rgb = _read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 3, 3)
    assert rgb[0, :, 0].tolist() == expect and np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize(
    "values, mode, fragment",
    [
        (np.array([[0.0, 3000.0]], np.float32), "F", "HDR"),
        (np.array([[-1.0, 0.5]], np.float32), "F", "negative"),
        (np.array([[0, 100000]], np.int32), "I", "16-bit"),
    ],
)
def test_pixels_that_cannot_be_scaled_are_refused_with_the_range(tmp_path, values, mode, fragment):
    from common.data import _read_rgb

    path = tmp_path / "x.tif"
    Image.fromarray(values, mode=mode).save(path)
    with pytest.raises(ValueError, match=fragment):
        _read_rgb(path)
