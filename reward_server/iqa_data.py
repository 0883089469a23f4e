"""Labelled images for training the IQA reward model (DESIGN.md §3.1, paper §6.2.7).

The paper trains its reward on human ratings of restored images. On these machines there are no
raters and no downloadable IQA data, so the ratings come from a *label source*: a pluggable
function of (image, its clean photo) -> quality in [0, 1]. The default is a documented
full-reference measure, :class:`SSIMLabel`; a user can plug in their own (e.g. ratings read from a
folder, :func:`load_rated_folder`).

An IQA example set is built from photographs that ship in scikit-image, at the demo's resolution:

* the clean crop itself (the "GT" kind),
* the same crop degraded at graded severities by the data module's degradations (``degraded``),
* the crop degraded as the RL data is (the "LQ" kind: :func:`common.data.low_light` at its random
  range),
* restored outputs of the base policy on those LQ crops, and the intermediate x̂0 predictions the
  step-wise reward scores (``restored``; made by a :class:`Restorer` that the caller supplies, so
  this module does not depend on the rollout role).

Photos: :data:`IQA_TRAIN_PHOTOS` for training, :data:`IQA_HELD_OUT_PHOTOS` for the held-out
metrics; both are disjoint from :data:`common.data.TEST_PHOTOS`, the RL test split, so the reward
never sees the evaluation content.

Labels map onto the five Q-Align levels (excellent 5 ... bad 1) as native score s = 1 + 4q, and
the training target is the two-point soft label over the neighbouring levels whose expectation is
exactly s (:func:`soft_level_target`).
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from common.data import TEST_PHOTOS, TRAIN_PHOTOS, _photo, _resize, blur, low_light, rain
from common.types import LEVEL_NAMES

__all__ = [
    "IQA_HELD_OUT_PHOTOS",
    "IQA_TRAIN_PHOTOS",
    "IQA_VALIDATION_PHOTOS",
    "PYIQA_PHOTOS",
    "IQADataError",
    "IQAExamples",
    "LabelSource",
    "Restorer",
    "SSIMLabel",
    "build_iqa_examples",
    "degrade_at",
    "level_of",
    "load_rated_folder",
    "soft_level_target",
    "ssim_y",
]

ExampleKind = Literal["gt", "degraded", "lq", "restored", "rated", "policy"]

#: Colour photographs that ship inside the pyiqa wheel (a requirement of the project): the five
#: reference images of its calibration set (``ResultsCalibra/ref_dir``, 512×384, the Kodak-style
#: references of the TID2013/KADID family) and the four photos of its efficiency test
#: (``tests/test_efficiency_img_dir``, about 1000 px). Name -> path inside the distribution.
PYIQA_PHOTOS: dict[str, str] = {
    "caps": "ResultsCalibra/ref_dir/I03.bmp",
    "red_hat": "ResultsCalibra/ref_dir/I04.bmp",
    "sailboat": "ResultsCalibra/ref_dir/I06.bmp",
    "houses": "ResultsCalibra/ref_dir/I08.bmp",
    "lighthouse": "ResultsCalibra/ref_dir/I19.bmp",
    "night_road": "tests/test_efficiency_img_dir/SPAQ_10241.jpg",
    "garden": "tests/test_efficiency_img_dir/frame_4wrwr48cdk6rbcjl.jpg",
    "sunset": "tests/test_efficiency_img_dir/frame_7gzdcz9sif0ekg31.jpg",
    "snow_traffic": "tests/test_efficiency_img_dir/frame_9ogwhvvy7gfj6jzh.jpg",
}

#: The RL training photos plus photos no RL split uses (all from ``skimage.data``). Never one of
#: common.data.TEST_PHOTOS (nor skimage's ``cat``, which is the ``chelsea`` photo of the test split).
IQA_TRAIN_PHOTOS: tuple[str, ...] = TRAIN_PHOTOS + ("retina", "hubble_deep_field", "grass", "clock", "cell")
#: Measures the trained model only: in no IQA training set and not in the RL test split. Colour
#: photographs from other packages: scikit-learn's sample images and matplotlib's sample data.
IQA_HELD_OUT_PHOTOS: tuple[str, ...] = ("china", "flower", "grace_hopper")

#: Chooses the training step whose weights are kept (``select_every``): the pyiqa photos, in
#: neither the training nor the held-out set, so the held-out metric stays untouched by selection.
IQA_VALIDATION_PHOTOS: tuple[str, ...] = tuple(PYIQA_PHOTOS)

assert not set(IQA_TRAIN_PHOTOS) & set(TEST_PHOTOS), "IQA training photos overlap the RL test split"
assert not set(IQA_HELD_OUT_PHOTOS) & (set(TEST_PHOTOS) | set(IQA_TRAIN_PHOTOS))
assert not set(IQA_VALIDATION_PHOTOS) & (set(TEST_PHOTOS) | set(IQA_TRAIN_PHOTOS) | set(IQA_HELD_OUT_PHOTOS))

#: Graded severities in (0, 1] at which every degradation of :func:`degrade_at` is applied.
DEFAULT_SEVERITIES: tuple[float, ...] = (0.15, 0.4, 0.7, 1.0)


class IQADataError(ValueError):
    """An IQA training folder, file or label that cannot be used; the message names it."""


class LabelSource(Protocol):
    """The stand-in for human raters: quality in [0, 1] of each image against its clean photo.

    ``images``, ``references``: uint8 [N, H, W, 3] RGB, same shapes. Returns float64 [N].
    """

    name: str

    def __call__(self, images: np.ndarray, references: np.ndarray) -> np.ndarray: ...


class Restorer(Protocol):
    """The base policy, as the IQA data needs it: LQ images -> restored images.

    ``lq``: uint8 [N, H, W, 3]. Returns uint8 [N, M, H, W, 3]: M images per input (the final
    output and, e.g., the intermediate x̂0 predictions the step-wise reward scores).
    """

    def __call__(self, lq: np.ndarray) -> np.ndarray: ...


# ------------------------------------------------------------------------------------ labels
def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_y(images: np.ndarray, references: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004) on the luma Y = 0.299 R + 0.587 G + 0.114 B, data range 1.

    11-tap Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03, 'valid' filtering (no padding), mean
    over the map. ``images``, ``references``: uint8 [N, H, W, 3] (H, W ≥ 11). Returns float64 [N].
    """
    from scipy.ndimage import correlate1d

    x = np.asarray(images, dtype=np.float64) / 255.0
    y = np.asarray(references, dtype=np.float64) / 255.0
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise IQADataError(
            f"ssim_y: expected two uint8 [N, H, W, 3] arrays of one shape, got {list(x.shape)} and {list(y.shape)}"
        )
    luma = np.array([0.299, 0.587, 0.114])
    x, y = x @ luma, y @ luma  # [N, H, W]
    w = _gaussian_window()
    half = len(w) // 2

    def blur_valid(a: np.ndarray) -> np.ndarray:
        a = correlate1d(correlate1d(a, w, axis=1, mode="nearest"), w, axis=2, mode="nearest")
        return a[:, half:-half, half:-half]

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur_valid(x), blur_valid(y)
    vx = blur_valid(x * x) - mx * mx
    vy = blur_valid(y * y) - my * my
    cxy = blur_valid(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim_map.mean(axis=(1, 2))


@dataclass(frozen=True)
class SSIMLabel:
    """The default label source: q = clip(SSIM_Y(image, clean photo), 0, 1) (:func:`ssim_y`).

    Full-reference and documented: the clean photo scores 1 ("excellent"), a dark noisy input
    ~0.1–0.3 ("bad"), a blurry restoration in between. It rewards structure and exposure, which is
    what the restoration task is judged by (the paper's SSIM column), and it is cheap.
    """

    name: str = "ssim_y"

    def __call__(self, images: np.ndarray, references: np.ndarray) -> np.ndarray:
        return np.clip(ssim_y(images, references), 0.0, 1.0)


def level_of(quality: np.ndarray | float) -> np.ndarray:
    """Quality in [0, 1] -> native Q-Align score s = 1 + 4q in [1, 5] (5 = excellent)."""
    q = np.asarray(quality, dtype=np.float64)
    if not np.all(np.isfinite(q)) or np.any(q < 0) or np.any(q > 1):
        raise IQADataError(f"quality labels must lie in [0, 1], got {q[(~np.isfinite(q)) | (q < 0) | (q > 1)][:5]}")
    return 1.0 + 4.0 * q


def soft_level_target(native: np.ndarray) -> np.ndarray:
    """Native scores s in [1, 5] -> float32 [N, 5] target over the levels, best first.

    The mass sits on the two levels around s, split so that Σ p_l·w_l = s exactly (w = 5..1):
    s = 3.25 -> 0.75 on "fair" (3) and 0.25 on "good" (4). An integer s is one-hot.
    """
    s = np.asarray(native, dtype=np.float64).reshape(-1)
    if np.any(s < 1) or np.any(s > 5) or not np.all(np.isfinite(s)):
        raise IQADataError(f"native scores must lie in [1, 5], got {s[(s < 1) | (s > 5) | ~np.isfinite(s)][:5]}")
    lo = np.clip(np.floor(s), 1, 4)  # the lower neighbouring level, 1..4
    frac = s - lo  # in [0, 1]
    out = np.zeros((len(s), len(LEVEL_NAMES)), dtype=np.float32)
    rows = np.arange(len(s))
    # Column of native level v (best first): 5 - v.
    out[rows, (5 - lo).astype(int)] = 1.0 - frac
    out[rows, (5 - (lo + 1)).astype(int)] += frac
    return out


# ----------------------------------------------------------------------------- degradations
def degrade_at(name: str, img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """One of the data module's degradations at a severity in (0, 1] (1 = its harshest setting).

    float32 [H, W, 3] in [0, 1] -> same. ``low_light``: γ 1 → 2.5, gain 1 → 0.1, photons
    5000 → 100 (log scale), read noise 0 → 0.01. ``blur``: Gaussian σ 0.3 → 2.5 px. ``rain``:
    density 0.0015 → 0.008 per px, intensity 0.3 → 0.9.
    """
    s = float(severity)
    if not 0.0 < s <= 1.0:
        raise ValueError(f"severity: got {severity}; expected in (0, 1]")
    if name == "low_light":
        return low_light(
            img, rng, gamma=1.0 + 1.5 * s, gain=1.0 - 0.9 * s,
            photons=math.exp(math.log(5000) - s * math.log(50)), read_noise=0.01 * s,
        )
    if name == "blur":
        return blur(img, rng, kind="gaussian", sigma=0.3 + 2.2 * s)
    if name == "rain":
        return rain(img, rng, density=0.0015 + 0.0065 * s, intensity=0.3 + 0.6 * s)
    raise ValueError(f"degradation: got {name!r}; expected 'low_light', 'blur' or 'rain'")


def _to_u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _crop(
    photo: np.ndarray, resolution: int, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.0)
) -> np.ndarray:
    """A random square of ``scale`` (fractions, default 50–100 %) of the shorter side, resized to
    resolution², maybe mirrored (the default is the recipe of
    :class:`common.data.SyntheticRestorationDataset`). uint8 [H, W, 3] -> [res, res, 3]."""
    H, W = photo.shape[:2]
    short = min(H, W)
    side = max(int(rng.uniform(*scale) * short), min(resolution, short))
    y0, x0 = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
    gt = _resize(np.ascontiguousarray(photo[y0 : y0 + side, x0 : x0 + side]), resolution, resolution)
    return np.ascontiguousarray(gt[:, ::-1]) if rng.random() < 0.5 else gt


def _package_file(distribution: str, relative: str) -> Path:
    """A file installed by ``distribution`` (from its RECORD; nothing is downloaded)."""
    import importlib.metadata

    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
    except importlib.metadata.PackageNotFoundError:
        raise IQADataError(f"photo {relative!r} ships in the {distribution!r} package, which is not installed") from None
    if not path.is_file():
        raise IQADataError(f"photo {path}: missing from the installed {distribution!r} package")
    return path


@functools.cache
def iqa_photo(name: str) -> np.ndarray:
    """uint8 [H, W, 3]: ``china``/``flower`` (scikit-learn), ``grace_hopper`` (matplotlib), the
    names of :data:`PYIQA_PHOTOS` (pyiqa), else a photo of ``skimage.data``
    (:func:`common.data._photo`). All ship inside the packages."""
    from PIL import Image

    if name in PYIQA_PHOTOS:
        path = _package_file("pyiqa", PYIQA_PHOTOS[name])
    elif name in ("china", "flower"):
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / f"{name}.jpg"
    elif name == "grace_hopper":
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    else:
        return _photo(name)
    with Image.open(path) as im:
        img = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    img.setflags(write=False)
    return img


# ---------------------------------------------------------------------------------- examples
@dataclass
class IQAExamples:
    """A labelled image set.

    Attributes:
        images: uint8 [N, H, W, 3] RGB.
        quality: float64 [N] in [0, 1] — the label source's quality.
        kinds: [N] — ``gt`` | ``degraded`` | ``lq`` | ``restored`` | ``rated`` | ``policy`` (the
            RL policy's images, labelled for a refresh of iterative RL).
        photos: [N] — the photo (or file) each image comes from.
        label_source: the label source's name.
        groups: int64 [N] — the clean crop each image was made from (images of a group share
            their content and differ in quality); default: every image its own group.
    """

    images: np.ndarray
    quality: np.ndarray
    kinds: list[str]
    photos: list[str]
    label_source: str = "ssim_y"
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.groups is None:
            self.groups = np.arange(n, dtype=np.int64)
        self.groups = np.asarray(self.groups, dtype=np.int64)
        if self.groups.shape != (n,):
            raise IQADataError(f"IQAExamples: {n} images but groups of shape {list(self.groups.shape)}")
        if not (len(self.quality) == len(self.kinds) == len(self.photos) == n):
            raise IQADataError(
                f"IQAExamples: {n} images but {len(self.quality)} labels, {len(self.kinds)} kinds, "
                f"{len(self.photos)} photos"
            )
        level_of(self.quality)  # raises on labels outside [0, 1]

    def __len__(self) -> int:
        return len(self.images)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.kinds:
            out[k] = out.get(k, 0) + 1
        return out

    def select(self, mask: np.ndarray) -> IQAExamples:
        idx = np.flatnonzero(mask)
        return IQAExamples(
            self.images[idx], self.quality[idx], [self.kinds[i] for i in idx],
            [self.photos[i] for i in idx], self.label_source, self.groups[idx],
        )

    @staticmethod
    def concat(parts: Sequence[IQAExamples]) -> IQAExamples:
        parts = [p for p in parts if len(p)]
        if not parts:
            raise IQADataError("IQAExamples.concat: no examples")
        offsets = np.cumsum([0] + [int(p.groups.max()) + 1 for p in parts[:-1]])  # groups stay distinct
        return IQAExamples(
            np.concatenate([p.images for p in parts]),
            np.concatenate([p.quality for p in parts]),
            [k for p in parts for k in p.kinds],
            [ph for p in parts for ph in p.photos],
            parts[0].label_source,
            np.concatenate([p.groups + o for p, o in zip(parts, offsets)]),
        )


def build_iqa_examples(
    photos: Sequence[str],
    *,
    resolution: int,
    crops_per_photo: int,
    seed: int,
    label: LabelSource | None = None,
    restorer: Restorer | None = None,
    severities: Sequence[float] = DEFAULT_SEVERITIES,
    degradations: Sequence[str] = ("low_light", "blur", "rain"),
    degraded_per_crop: int | None = None,
    restored_inputs: int | None = None,
    photo_loader: Callable[[str], np.ndarray] = iqa_photo,
    crop_scale: tuple[float, float] = (0.5, 1.0),
) -> IQAExamples:
    """The labelled set of the module docstring for ``photos`` (names in ``skimage.data``).

    Per crop: 1 clean + len(degradations)·len(severities) graded (or ``degraded_per_crop``
    random draws of a degradation at a severity ~ U(0.05, 1)) + 1 LQ (RL-style low light) + M
    restored (``restorer`` output per LQ, none without a restorer; ``restored_inputs``: only that
    many LQ crops, evenly spread over the photos). ``crop_scale``: the range of a crop's side as a
    fraction of the photo's shorter side (smaller crops of a large photo show more distinct
    content). Deterministic in ``seed``.
    """
    if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ValueError(f"crop_scale: got {crop_scale}; expected 0 < low <= high <= 1")
    label = label or SSIMLabel()
    rng = np.random.default_rng([seed, 0x1A0])
    gts, images, refs, kinds, names, lqs, groups = [], [], [], [], [], [], []
    for name in photos:
        photo = photo_loader(name)
        for _ in range(crops_per_photo):
            gt = _crop(photo, resolution, rng, crop_scale)
            x = gt.astype(np.float32) / 255.0
            gts.append(gt)
            crop = len(gts) - 1
            images.append(gt), refs.append(gt), kinds.append("gt"), names.append(name), groups.append(crop)
            if degraded_per_crop is None:  # every degradation at every graded severity
                draws = [(d, s) for d in degradations for s in severities]
            else:  # a random (degradation, severity) per draw: more content for the same cost
                draws = [(degradations[int(rng.integers(len(degradations)))], float(rng.uniform(0.05, 1.0)))
                         for _ in range(degraded_per_crop)]
            for d, s in draws:
                images.append(_to_u8(degrade_at(d, x, s, rng)))
                refs.append(gt), kinds.append("degraded"), names.append(name), groups.append(crop)
            lq = _to_u8(low_light(x, rng))  # the RL data's degradation at its random range
            lqs.append(lq)
            images.append(lq), refs.append(gt), kinds.append("lq"), names.append(name), groups.append(crop)
    n_restore = len(lqs) if restored_inputs is None else min(restored_inputs, len(lqs))
    if restorer is not None and n_restore:
        pick = np.linspace(0, len(lqs) - 1, n_restore).round().astype(int)  # crop indices
        restored = np.asarray(restorer(np.stack([lqs[i] for i in pick])))  # [n, M, H, W, 3]
        if restored.ndim != 5 or restored.shape[0] != n_restore or restored.dtype != np.uint8:
            raise IQADataError(
                f"restorer: expected uint8 [{n_restore}, M, H, W, 3], got {restored.dtype} {list(restored.shape)}"
            )
        photo_of_crop = [n for n in photos for _ in range(crops_per_photo)]
        for row, i in enumerate(pick):
            for m in range(restored.shape[1]):
                images.append(restored[row, m]), refs.append(gts[i])
                kinds.append("restored"), names.append(photo_of_crop[i]), groups.append(int(i))
    images_a, refs_a = np.stack(images), np.stack(refs)
    quality = np.asarray(label(images_a, refs_a), dtype=np.float64)
    if quality.shape != (len(images_a),):
        raise IQADataError(f"label source {label.name!r}: returned shape {list(quality.shape)}, expected [{len(images_a)}]")
    return IQAExamples(images_a, quality, kinds, names, label.name, np.asarray(groups))


def load_rated_folder(root: str | Path, resolution: int, ratings_file: str = "ratings.csv") -> IQAExamples:
    """User-supplied ratings: ``root/ratings.csv`` with columns ``file,score`` — a mean opinion
    score on the level scale [1, 5] (5 = excellent), files relative to ``root``. Every file is
    decoded here and resized to resolution²; an unreadable image or a score outside [1, 5] raises
    :class:`IQADataError` naming the file. Quality = (score − 1) / 4."""
    from PIL import Image

    root = Path(root)
    table = root / ratings_file
    if not table.is_file():
        raise IQADataError(f"{table}: missing (expected a CSV with columns file,score)")
    images, quality, names = [], [], []
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"file", "score"} <= set(reader.fieldnames):
            raise IQADataError(f"{table}: expected a header with columns file,score, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            path = root / row["file"]
            try:
                score = float(row["score"])
            except (TypeError, ValueError):
                raise IQADataError(f"{table}:{line}: score {row['score']!r} of {path} is not a number") from None
            if not (math.isfinite(score) and 1.0 <= score <= 5.0):
                raise IQADataError(f"{table}:{line}: score {score} of {path} is outside the level range [1, 5]")
            try:
                with Image.open(path) as im:
                    im.load()
                    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
                raise IQADataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
            images.append(_resize(arr, resolution, resolution))
            quality.append((score - 1.0) / 4.0)
            names.append(row["file"])
    if not images:
        raise IQADataError(f"{table}: no rated images")
    return IQAExamples(np.stack(images), np.asarray(quality), ["rated"] * len(images), names, f"folder:{root}")
