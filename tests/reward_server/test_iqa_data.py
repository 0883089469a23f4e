"""IQA training data: the label source, the level mapping, graded degradations, rated folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.data import TEST_PHOTOS
from reward_server.iqa_data import (
    IQA_HELD_OUT_PHOTOS,
    IQA_TRAIN_PHOTOS,
    IQADataError,
    IQAExamples,
    SSIMLabel,
    build_iqa_examples,
    degrade_at,
    level_of,
    load_rated_folder,
    soft_level_target,
    ssim_y,
)


def _images(n=3, size=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_ssim_y_equals_scikit_image_on_the_luma():
    from skimage.metrics import structural_similarity

    ref = _images(2, 32, seed=1)
    img = np.clip(ref.astype(int) + np.random.default_rng(2).integers(-40, 40, ref.shape), 0, 255).astype(np.uint8)
    ours = ssim_y(img, ref)
    luma = np.array([0.299, 0.587, 0.114])
    for k in range(2):
        theirs = structural_similarity(img[k] / 255.0 @ luma, ref[k] / 255.0 @ luma, data_range=1.0,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[k] == pytest.approx(theirs, abs=1e-9)
    assert ssim_y(ref, ref) == pytest.approx([1.0, 1.0])


def test_ssim_label_is_one_for_the_clean_photo_and_clipped():
    ref = _images(2, 32)
    inverted = 255 - ref  # negatively correlated: SSIM < 0, label clipped to 0
    q = SSIMLabel()(np.concatenate([ref, inverted]), np.concatenate([ref, ref]))
    assert q[:2] == pytest.approx([1.0, 1.0]) and np.all(q[2:] >= 0) and q[2:].max() < 0.05


def test_soft_level_target_hand_worked():
    # s = 3.25: 0.75 on "fair" (3) and 0.25 on "good" (4); columns are best first (5 .. 1)
    t = soft_level_target(np.array([3.25, 5.0, 1.0, 4.5]))
    np.testing.assert_allclose(t[0], [0, 0.25, 0.75, 0, 0])
    np.testing.assert_allclose(t[1], [1, 0, 0, 0, 0])
    np.testing.assert_allclose(t[2], [0, 0, 0, 0, 1])
    np.testing.assert_allclose(t[3], [0.5, 0.5, 0, 0, 0])
    # the expectation over the level weights is the native score itself
    s = np.random.default_rng(0).uniform(1, 5, 50)
    np.testing.assert_allclose(soft_level_target(s) @ np.array([5, 4, 3, 2, 1.0]), s, atol=1e-6)


def test_labels_outside_the_range_are_errors():
    assert level_of(np.array([0.0, 0.5, 1.0])).tolist() == [1.0, 3.0, 5.0]
    with pytest.raises(IQADataError, match=r"\[0, 1\]"):
        level_of(np.array([0.2, 1.2]))
    with pytest.raises(IQADataError):
        level_of(np.array([np.nan]))
    with pytest.raises(IQADataError, match=r"\[1, 5\]"):
        soft_level_target(np.array([0.5]))


def test_graded_severity_lowers_the_label_monotonically():
    from common.data import _photo

    gt = np.asarray(Image.fromarray(_photo("astronaut")).resize((64, 64)))
    x = gt.astype(np.float32) / 255.0
    for name in ("low_light", "blur", "rain"):
        q = [SSIMLabel()((np.clip(degrade_at(name, x, s, np.random.default_rng(0)), 0, 1)[None] * 255 + 0.5)
                         .astype(np.uint8), gt[None])[0] for s in (0.1, 0.4, 0.7, 1.0)]
        assert all(a > b for a, b in zip(q, q[1:])), (name, q)
    with pytest.raises(ValueError, match="severity"):
        degrade_at("blur", x, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="degradation"):
        degrade_at("fog", x, 0.5, np.random.default_rng(0))


def test_iqa_photos_are_disjoint_from_the_rl_test_split():
    from reward_server.iqa_data import IQA_VALIDATION_PHOTOS

    assert not set(IQA_TRAIN_PHOTOS) & set(TEST_PHOTOS)
    assert not set(IQA_HELD_OUT_PHOTOS) & (set(TEST_PHOTOS) | set(IQA_TRAIN_PHOTOS))
    assert not set(IQA_VALIDATION_PHOTOS) & (set(TEST_PHOTOS) | set(IQA_TRAIN_PHOTOS) | set(IQA_HELD_OUT_PHOTOS))
    assert "cat" not in IQA_TRAIN_PHOTOS + IQA_HELD_OUT_PHOTOS  # skimage's cat is the chelsea photo


def test_validation_photos_are_not_copies_of_other_photos():
    """Disjoint by content, not only by name: no validation photo equals (at 32 px) a training,
    held-out or RL test photo."""
    from reward_server.iqa_data import IQA_VALIDATION_PHOTOS, iqa_photo

    def thumb(name):
        return np.asarray(Image.fromarray(iqa_photo(name)).resize((32, 32)), dtype=np.float64)

    others = [thumb(n) for n in IQA_TRAIN_PHOTOS + IQA_HELD_OUT_PHOTOS + TEST_PHOTOS]
    for name in IQA_VALIDATION_PHOTOS:
        v = thumb(name)
        assert min(np.abs(v - o).mean() for o in others) > 10, name


def test_build_examples_kinds_labels_and_restorer():
    calls = []

    def restorer(lq):  # two "restorations" per input: the input itself and a brightened copy
        calls.append(lq.shape)
        return np.stack([lq, np.clip(lq.astype(int) * 3, 0, 255).astype(np.uint8)], axis=1)

    ex = build_iqa_examples(["coffee", "camera"], resolution=32, crops_per_photo=2, seed=0, restorer=restorer,
                            severities=(0.3, 1.0), degradations=("blur",))
    # per crop: gt + 2 graded + lq = 4; 4 crops -> 16, + 2 restored per lq crop -> 24
    assert len(ex) == 24 and ex.counts() == {"gt": 4, "degraded": 8, "lq": 4, "restored": 8}
    assert calls == [(4, 32, 32, 3)]
    kinds = np.asarray(ex.kinds)
    assert np.all(ex.quality[kinds == "gt"] == pytest.approx(1.0))
    assert ex.quality[kinds == "lq"].max() < ex.quality[kinds == "degraded"].max()
    again = build_iqa_examples(["coffee", "camera"], resolution=32, crops_per_photo=2, seed=0, restorer=restorer,
                               severities=(0.3, 1.0), degradations=("blur",))
    np.testing.assert_array_equal(ex.images, again.images)  # deterministic in the seed
    with pytest.raises(IQADataError, match="restorer"):
        build_iqa_examples(["coffee"], resolution=32, crops_per_photo=1, seed=0, restorer=lambda lq: lq)


def test_label_source_is_pluggable():
    class Brightness:
        name = "brightness"

        def __call__(self, images, references):
            return images.mean(axis=(1, 2, 3)) / 255.0

    ex = build_iqa_examples(["coffee"], resolution=32, crops_per_photo=1, seed=0, label=Brightness(),
                            degraded_per_crop=2)
    assert ex.label_source == "brightness"
    np.testing.assert_allclose(ex.quality, ex.images.mean(axis=(1, 2, 3)) / 255.0)


def test_rated_folder_loads_and_names_bad_files(tmp_path):
    for k in range(2):
        Image.fromarray(_images(1, 40, seed=k)[0]).save(tmp_path / f"im{k}.png")
    (tmp_path / "ratings.csv").write_text("file,score\nim0.png,4.5\nim1.png,1\n")
    ex = load_rated_folder(tmp_path, resolution=32)
    assert ex.images.shape == (2, 32, 32, 3) and ex.quality.tolist() == [0.875, 0.0]
    (tmp_path / "ratings.csv").write_text("file,score\nim0.png,6\n")
    with pytest.raises(IQADataError, match=r"im0.png is outside the level range \[1, 5\]"):
        load_rated_folder(tmp_path, resolution=32)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "ratings.csv").write_text("file,score\nim0.png,3\nbroken.png,3\n")
    with pytest.raises(IQADataError, match="broken.png: unreadable image"):
        load_rated_folder(tmp_path, resolution=32)
    (tmp_path / "ratings.csv").write_text("name,mos\nim0.png,3\n")
    with pytest.raises(IQADataError, match="file,score"):
        load_rated_folder(tmp_path, resolution=32)


def test_examples_check_their_lengths():
    with pytest.raises(IQADataError, match="2 images but 1 labels"):
        IQAExamples(_images(2), np.array([0.5]), ["gt", "gt"], ["a", "a"])


def test_package_photos_load_offline_and_are_real_colour_photographs():
    from reward_server.iqa_data import PYIQA_PHOTOS, iqa_photo

    for name in PYIQA_PHOTOS:
        img = iqa_photo(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 384, name
        assert img.std() > 20 and np.abs(img[..., 0].astype(int) - img[..., 2]).mean() > 5, name  # colour, not flat
    with pytest.raises(IQADataError, match="not installed"):
        from reward_server.iqa_data import _package_file

        _package_file("no-such-distribution-xyz", "a.png")


def test_crop_scale_defaults_to_the_old_recipe_and_is_checked():
    a = build_iqa_examples(["coffee"], resolution=32, crops_per_photo=1, seed=0, degraded_per_crop=0)
    b = build_iqa_examples(["coffee"], resolution=32, crops_per_photo=1, seed=0, degraded_per_crop=0,
                           crop_scale=(0.5, 1.0))
    np.testing.assert_array_equal(a.images, b.images)  # the default is the old recipe
    with pytest.raises(ValueError, match="crop_scale"):
        build_iqa_examples(["coffee"], resolution=32, crops_per_photo=1, seed=0, crop_scale=(0.0, 1.0))
