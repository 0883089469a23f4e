"""Paired low-quality / ground-truth (LQ/GT) image datasets.

* :class:`PairedFolderDataset` — a local benchmark folder (LOL ``low/`` + ``high/``, or a generic
  ``lq/`` + ``gt/``); pairs matched by file stem. Every file is opened and decoded once at
  construction, so a broken file is found before training starts, never in the middle of a run.
* :class:`SyntheticRestorationDataset` — real photographs that ship inside scikit-image, degraded
  by seeded pure functions (:func:`low_light`, :func:`blur`, :func:`rain`). The CPU demo and tests.
* :func:`build_dataset` — the adapter from :class:`common.config.DataConfig`.

Both datasets are map-style (``len`` / ``[i]``, usable by ``torch.utils.data.DataLoader``) and
return :class:`Pair` items of uint8 RGB arrays with the LQ and GT cropped identically.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from common.config import DataConfig

__all__ = [
    "DEGRADATIONS",
    "TEST_PHOTOS",
    "TRAIN_PHOTOS",
    "BadFileWarning",
    "DatasetError",
    "Pair",
    "PairedDataset",
    "PairedFolderDataset",
    "SyntheticRestorationDataset",
    "blur",
    "build_dataset",
    "low_light",
    "rain",
]

logger = logging.getLogger(__name__)

Layout = Literal["lol", "lq_gt"]
ResizeMode = Literal["resize", "center_crop", "random_crop"]

#: (LQ folder, GT folder) of each layout.
LAYOUTS: dict[str, tuple[str, str]] = {"lol": ("low", "high"), "lq_gt": ("lq", "gt")}
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class Pair(NamedTuple):
    """One LQ/GT pair.

    Attributes:
        id: int — index of the pair in its dataset (stable: folder pairs are sorted by name).
        name: str — file stem (folder) or ``<split>-<index>-<photo>`` (synthetic).
        lq: uint8 [H, W, 3] — the degraded input, RGB.
        gt: uint8 [H, W, 3] — the ground truth, RGB, same crop as ``lq``.
    """

    id: int
    name: str
    lq: np.ndarray
    gt: np.ndarray


class PairedDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Pair: ...


class DatasetError(ValueError):
    """A dataset folder or file that cannot be used; the message names the path."""


class BadFileWarning(UserWarning):
    """A file skipped by a dataset built with ``on_bad_file="skip"``."""


# ---------------------------------------------------------------------------------- image I/O
def _grey_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """One-channel float or wide-integer pixels [H, W] → uint8 [H, W, 3], scaled by what the
    values say, never clipped: PIL's own ``convert("RGB")`` clips mode ``F`` and ``I`` to 0..255,
    which turns a float image in [0, 1] all black and 16-bit data in an int32 file all white.

    * float (mode ``F``): values in [0, 1] are scaled by 255; values in [0, 255] are kept;
    * integer (``I;16*``, ``I``): values up to 255 are kept, up to 65535 scaled by 255/65535;
    * anything else (negative, NaN, HDR floats above 255, int32 above 65535) is refused, with
      the range found: a silent guess would hand the model a wrong image."""
    a = arr.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"mode {mode!r} image has non-finite pixels")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0:
        raise ValueError(f"mode {mode!r} image has negative pixels (range {lo:g}..{hi:g}); convert it to 8-bit")
    if mode == "F":
        if hi <= 1.0:
            scale = 255.0
        elif hi <= 255.0:
            scale = 1.0
        else:
            raise ValueError(f"mode 'F' (float) image has pixels up to {hi:g} (HDR?); expected [0, 1] or [0, 255]")
    elif mode.startswith("I;16") or hi > 255:
        if hi > 65535:
            raise ValueError(f"mode {mode!r} image has pixels up to {hi:g}; expected at most 16-bit values")
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    out = np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=2)


def _read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to uint8 [H, W, 3] RGB (EXIF orientation applied; alpha dropped).

    8-bit files go through PIL's conversion; one-channel float and 16/32-bit integer files
    (TIFFs from raw pipelines) are rescaled by :func:`_grey_to_uint8` or refused with a reason."""
    with Image.open(path) as im:
        im.load()  # decodes fully: a truncated file raises here
        im = ImageOps.exif_transpose(im)
        if im.mode == "F" or im.mode == "I" or im.mode.startswith("I;16"):
            return _grey_to_uint8(np.asarray(im), im.mode)
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    if img.shape[1] == width and img.shape[0] == height:
        return img
    # PIL's bicubic widens its support when downscaling, so it also anti-aliases.
    return np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BICUBIC))


def _fit(
    lq: np.ndarray,
    gt: np.ndarray,
    resolution: int,
    mode: ResizeMode,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bring an aligned pair (equal sizes) to resolution × resolution with the same geometry."""
    H, W = gt.shape[:2]
    if mode == "resize":
        return _resize(lq, resolution, resolution), _resize(gt, resolution, resolution)
    # Shorter side to `resolution`, then one crop box for both sides.
    scale = resolution / min(H, W)
    h, w = max(resolution, round(H * scale)), max(resolution, round(W * scale))
    lq, gt = _resize(lq, w, h), _resize(gt, w, h)
    if mode == "center_crop" or rng is None:
        y0, x0 = (h - resolution) // 2, (w - resolution) // 2
    elif mode == "random_crop":
        y0, x0 = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
    else:
        raise ValueError(f"resize: got {mode!r}; expected 'resize', 'center_crop' or 'random_crop'")
    box = (slice(y0, y0 + resolution), slice(x0, x0 + resolution))
    return np.ascontiguousarray(lq[box]), np.ascontiguousarray(gt[box])


def _same_aspect(lq_size: tuple[int, int], gt_size: tuple[int, int]) -> bool:
    """True when the LQ is the GT rescaled by one factor (to the pixel), e.g. a ×4 SR input."""
    (lw, lh), (gw, gh) = lq_size, gt_size
    f = lw / gw
    return abs(gh * f - lh) <= max(1.0, f)


# -------------------------------------------------------------------------------- folder data
class PairedFolderDataset:
    """LQ/GT pairs from ``root/<lq>/`` and ``root/<gt>/`` matched by file stem.

    ``layout="lol"``: ``low/`` + ``high/`` (LOL: point ``root`` at ``our485/`` or ``eval15/``);
    ``layout="lq_gt"``: ``lq/`` + ``gt/``. Extensions may differ (``a.png`` pairs with ``a.jpg``).

    Every file is decoded once here. A bad file — unreadable or truncated, a stem present on one
    side only, a stem that appears twice on one side, a non-image extension, or an LQ whose shape
    is not the GT's shape rescaled (different aspect ratio) — is, with ``on_bad_file="skip"``,
    dropped with a :class:`BadFileWarning` naming it and counted in ``skipped[reason]``; with
    ``on_bad_file="error"`` it raises :class:`DatasetError` naming it. Hidden files are ignored.

    Sizes: an LQ that is the GT rescaled (SR-style ×s input) is resized (bicubic) to the GT size
    when loaded, as PASD/DiffBIR upsample their input before conditioning; then both sides get
    the same resize/crop (``resize``: squash to resolution²; ``center_crop``/``random_crop``:
    shorter side to ``resolution``, then one crop box). Random crops are drawn from
    ``(seed, epoch, index)``: deterministic, and different per epoch after :meth:`set_epoch`.

    Attributes:
        names: the stems of the kept pairs, sorted (``Pair.id`` indexes this list).
        skipped: {reason: count} of dropped pairs or lone files (reasons: ``unreadable``,
            ``unpaired``, ``duplicate_stem``, ``unsupported_extension``, ``size_mismatch``,
            ``unreadable_at_load``).
        skipped_files: [(path, reason)] in the order found.
    """

    def __init__(
        self,
        root: str | Path,
        layout: Layout = "lol",
        resolution: int = 64,
        resize: ResizeMode = "center_crop",
        on_bad_file: Literal["skip", "error"] = "skip",
        seed: int = 0,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"layout: got {layout!r}; expected one of {sorted(LAYOUTS)}")
        if resize not in ("resize", "center_crop", "random_crop"):
            raise ValueError(
                f"resize: got {resize!r}; expected 'resize', 'center_crop' or 'random_crop'"
            )
        if on_bad_file not in ("skip", "error"):
            raise ValueError(f"on_bad_file: got {on_bad_file!r}; expected 'skip' or 'error'")
        self.root = Path(root)
        self.layout = layout
        self.resolution = resolution
        self.resize = resize
        self.on_bad_file = on_bad_file
        self.seed = seed
        self.epoch = 0
        self.skipped: Counter[str] = Counter()
        self.skipped_files: list[tuple[Path, str]] = []
        self._errors: list[str] = []

        lq_name, gt_name = LAYOUTS[layout]
        lq_dir, gt_dir = self.root / lq_name, self.root / gt_name
        for d in (lq_dir, gt_dir):
            if not d.is_dir():
                raise DatasetError(
                    f"{d}: missing folder (layout {layout!r} expects {self.root}/{lq_name}/ and {self.root}/{gt_name}/)"
                )
        lq_files, gt_files = self._list(lq_dir), self._list(gt_dir)
        self._pairs: list[tuple[str, Path, Path]] = []
        for stem in sorted(set(lq_files) | set(gt_files)):
            lq, gt = lq_files.get(stem), gt_files.get(stem)
            if lq is None or gt is None:
                present = lq or gt
                assert present is not None
                other = gt_dir if gt is None else lq_dir
                self._bad(present, "unpaired", f"no file with stem {stem!r} in {other}")
                continue
            sizes = []
            for path in (lq, gt):
                try:
                    sizes.append(self._probe(path))
                except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
                    self._bad(
                        path,
                        "unreadable",
                        f"{type(err).__name__}: {err}; its pair {stem!r} is dropped",
                    )
                    break
            if len(sizes) < 2:
                continue
            if sizes[0] != sizes[1] and not _same_aspect(sizes[0], sizes[1]):
                self._bad(
                    lq,
                    "size_mismatch",
                    f"LQ is {sizes[0][0]}x{sizes[0][1]}, GT {gt} is {sizes[1][0]}x{sizes[1][1]}",
                )
                continue
            self._pairs.append((stem, lq, gt))
        if self._errors:  # on_bad_file="error": every bad file at once, not only the first
            raise DatasetError(
                f"{self.root}: {len(self._errors)} bad file(s) (data.on_bad_file=error):\n  "
                + "\n  ".join(self._errors)
            )
        if not self._pairs:
            raise DatasetError(
                f"{self.root}: no valid LQ/GT pairs (skipped: {dict(self.skipped) or 'none found'})"
            )
        self._failed_at_load: set[int] = set()

    # -- construction helpers --------------------------------------------------------------
    def summary(self) -> str:
        """One line for the console: pairs kept, files skipped by reason, the first few named."""
        if not self.skipped_files:
            return f"{self.root}: {len(self)} pairs"
        named = ", ".join(f"{p.name} ({r})" for p, r in self.skipped_files[:5])
        more = f", and {len(self.skipped_files) - 5} more" if len(self.skipped_files) > 5 else ""
        return (f"{self.root}: {len(self)} pairs; skipped {len(self.skipped_files)} file(s) "
                f"{dict(self.skipped)}: {named}{more}")

    def _bad(self, path: Path, reason: str, detail: str) -> None:
        if self.on_bad_file == "error":
            self._errors.append(f"{path}: {reason} ({detail})")
            return
        self.skipped[reason] += 1
        self.skipped_files.append((path, reason))
        warnings.warn(
            f"{path}: skipped, {reason} ({detail}); {reason} so far: {self.skipped[reason]}",
            BadFileWarning,
            stacklevel=3,
        )

    def _list(self, folder: Path) -> dict[str, Path]:
        files: dict[str, Path] = {}
        seen: dict[str, list[Path]] = {}
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not p.is_file():
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                self._bad(p, "unsupported_extension", f"expected one of {sorted(IMAGE_EXTENSIONS)}")
                continue
            seen.setdefault(p.stem, []).append(p)
        for stem, paths in seen.items():
            if len(paths) > 1:
                for p in paths:
                    self._bad(
                        p, "duplicate_stem", f"stem {stem!r} appears {len(paths)} times in {folder}"
                    )
            else:
                files[stem] = paths[0]
        return files

    @staticmethod
    def _probe(path: Path) -> tuple[int, int]:
        """Fully decode ``path``; returns its (width, height) after EXIF orientation."""
        img = _read_rgb(path)
        return img.shape[1], img.shape[0]

    # -- access ----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [stem for stem, _, _ in self._pairs]

    def set_epoch(self, epoch: int) -> None:
        """Draw different random crops (``random_crop``) in each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._pairs)

    def _load(self, index: int) -> Pair:
        stem, lq_path, gt_path = self._pairs[index]
        lq, gt = _read_rgb(lq_path), _read_rgb(gt_path)
        if lq.shape != gt.shape:  # an SR-style input: bring it onto the GT grid
            lq = _resize(lq, gt.shape[1], gt.shape[0])
        rng = (
            np.random.default_rng([self.seed, self.epoch, index])
            if self.resize == "random_crop"
            else None
        )
        lq, gt = _fit(lq, gt, self.resolution, self.resize, rng)
        return Pair(index, stem, lq, gt)

    def __getitem__(self, index: int) -> Pair:
        n = len(self._pairs)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} pairs")
        index %= n
        # A file validated at construction can still vanish or change on disk; in skip mode the
        # run goes on with the next good pair (counted, warned), whose Pair carries its own id.
        for k in range(n):
            i = (index + k) % n
            if i in self._failed_at_load:
                continue
            try:
                return self._load(i)
            except Exception as err:
                if self.on_bad_file == "error":
                    raise DatasetError(
                        f"{self._pairs[i][1]} / {self._pairs[i][2]}: could not load ({err})"
                    ) from err
                self._failed_at_load.add(i)
                self._bad(self._pairs[i][1], "unreadable_at_load", f"{type(err).__name__}: {err}")
        raise DatasetError(f"{self.root}: every pair failed to load")


# ------------------------------------------------------------------------------- degradations
# Pure functions: float32 [H, W, 3] in [0, 1] + a Generator -> float32 [H, W, 3] in [0, 1].
# A parameter left as None is drawn from the documented range with `rng`.


def low_light(
    img: np.ndarray,
    rng: np.random.Generator,
    *,
    gamma: float | None = None,
    gain: float | None = None,
    photons: float | None = None,
    read_noise: float | None = None,
) -> np.ndarray:
    """Under-exposure with sensor noise: y = clip(Poisson(p · g · x^γ) / p + N(0, σ²)).

    γ ∈ [1.5, 2.5] (darker shadows), gain g ∈ [0.1, 0.35], photons p ∈ [100, 1000] at full
    scale (log-uniform: fewer photons, more shot noise), read noise σ ∈ [0.002, 0.01].
    """
    gamma = rng.uniform(1.5, 2.5) if gamma is None else gamma
    gain = rng.uniform(0.1, 0.35) if gain is None else gain
    photons = math.exp(rng.uniform(math.log(100), math.log(1000))) if photons is None else photons
    read_noise = rng.uniform(0.002, 0.01) if read_noise is None else read_noise
    dark = gain * np.power(img.astype(np.float64), gamma)
    shot = rng.poisson(dark * photons) / photons
    noisy = shot + rng.normal(0.0, read_noise, size=img.shape)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def _line_kernel(length: int, angle: float) -> np.ndarray:
    """A size×size kernel (size = length, odd) with 1 on a line through the centre at ``angle``
    (radians from the vertical axis), 0 elsewhere."""
    size = length if length % 2 else length + 1
    k = np.zeros((size, size), dtype=np.float64)
    c = size // 2
    for s in np.linspace(-(length - 1) / 2, (length - 1) / 2, 4 * length):
        y, x = round(c + s * math.cos(angle)), round(c + s * math.sin(angle))
        k[y, x] = 1.0
    return k


def _convolve_channels(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.stack(
        [ndimage.convolve(img[..., ch], kernel, mode="reflect") for ch in range(img.shape[-1])],
        axis=-1,
    )


def blur(
    img: np.ndarray,
    rng: np.random.Generator,
    *,
    kind: Literal["gaussian", "motion"] | None = None,
    sigma: float | None = None,
    length: int | None = None,
    angle: float | None = None,
) -> np.ndarray:
    """Gaussian blur (σ ∈ [0.8, 2.0] px) or linear motion blur (length ∈ [3, 9] px, any angle);
    the kind is drawn 50/50. Borders reflect."""
    from scipy import ndimage

    kind = ("gaussian", "motion")[int(rng.integers(2))] if kind is None else kind
    x = img.astype(np.float64)
    if kind == "gaussian":
        sigma = rng.uniform(0.8, 2.0) if sigma is None else sigma
        out = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")
    elif kind == "motion":
        length = int(rng.integers(3, 10)) if length is None else length
        angle = rng.uniform(0.0, math.pi) if angle is None else angle
        k = _line_kernel(length, angle)
        out = _convolve_channels(x, k / k.sum())
    else:
        raise ValueError(f"blur kind: got {kind!r}; expected 'gaussian' or 'motion'")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def rain(
    img: np.ndarray,
    rng: np.random.Generator,
    *,
    density: float | None = None,
    length: int | None = None,
    angle: float | None = None,
    intensity: float | None = None,
) -> np.ndarray:
    """Bright rain streaks: sparse drops smeared along one direction, screen-blended onto the image.

    Drop density ∈ [0.002, 0.006] per px, streak length ∈ [8%, 20%] of the image height, angle
    ∈ [−25°, 25°] from vertical, intensity ∈ [0.5, 0.9]. Screen blend 1 − (1 − x)(1 − s) only
    ever brightens, like light scattered by rain.
    """
    H, W = img.shape[:2]
    density = rng.uniform(0.002, 0.006) if density is None else density
    length = max(3, round(rng.uniform(0.08, 0.2) * H)) if length is None else length
    angle = math.radians(rng.uniform(-25.0, 25.0)) if angle is None else angle
    intensity = rng.uniform(0.5, 0.9) if intensity is None else intensity
    drops = (rng.random((H, W)) < density) * rng.uniform(0.6, 1.0, size=(H, W))
    streaks = _convolve_channels(drops[..., None], _line_kernel(length, angle))[..., 0]
    streaks = np.clip(streaks, 0.0, 1.0) * intensity
    out = 1.0 - (1.0 - img.astype(np.float64)) * (1.0 - streaks[..., None])
    return np.clip(out, 0.0, 1.0).astype(np.float32)


DEGRADATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "low_light": low_light,
    "blur": blur,
    "rain": rain,
}

# ----------------------------------------------------------------------------- synthetic data
#: Photographs bundled with scikit-image (no download). Train and test use disjoint photos so the
#: held-out pairs show content never seen in training.
TRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "rocket",
    "camera",
    "motorcycle",
    "immunohistochemistry",
    "brick",
    "gravel",
)
TEST_PHOTOS: tuple[str, ...] = ("chelsea", "coins", "moon")
_SPLIT_CODE = {"train": 0, "test": 1}


@functools.cache
def _photo(name: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB photograph from ``skimage.data`` (grey ones replicated to 3 channels)."""
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3])
    img.setflags(write=False)
    return img


class SyntheticRestorationDataset:
    """Pairs made from bundled photographs and seeded degradations (DESIGN.md §6 demo data).

    Item ``i`` (fully determined by ``(seed, split, i)``): photo ``photos[i % len(photos)]``, a
    random square crop of 50–100 % of its shorter side (at least ``resolution`` px when the photo
    allows), resized to ``resolution``² and randomly mirrored → GT; then each name in
    ``degradations`` is applied in order → LQ. ``split="train"`` uses :data:`TRAIN_PHOTOS`,
    ``"test"`` the disjoint :data:`TEST_PHOTOS` with a different random stream.
    """

    def __init__(
        self,
        num_pairs: int,
        resolution: int = 64,
        degradations: Sequence[str] = ("low_light",),
        seed: int = 0,
        split: Literal["train", "test"] = "train",
    ):
        unknown = [d for d in degradations if d not in DEGRADATIONS]
        if unknown:
            raise ValueError(
                f"degradations: unknown {unknown}; expected names from {sorted(DEGRADATIONS)}"
            )
        if split not in _SPLIT_CODE:
            raise ValueError(f"split: got {split!r}; expected 'train' or 'test'")
        if num_pairs < 0:
            raise ValueError(f"num_pairs: got {num_pairs}; expected >= 0")
        self.num_pairs = num_pairs
        self.resolution = resolution
        self.degradations = tuple(degradations)
        self.seed = seed
        self.split = split
        self.photos = TRAIN_PHOTOS if split == "train" else TEST_PHOTOS

    def __len__(self) -> int:
        return self.num_pairs

    @property
    def names(self) -> list[str]:
        return [self._name(i) for i in range(self.num_pairs)]

    def _name(self, index: int) -> str:
        return f"{self.split}-{index:05d}-{self.photos[index % len(self.photos)]}"

    def __getitem__(self, index: int) -> Pair:
        if not -self.num_pairs <= index < self.num_pairs:
            raise IndexError(f"index {index} out of range for {self.num_pairs} pairs")
        index %= self.num_pairs
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index])
        photo = _photo(self.photos[index % len(self.photos)])
        H, W = photo.shape[:2]
        short = min(H, W)
        side = max(int(rng.uniform(0.5, 1.0) * short), min(self.resolution, short))
        y0, x0 = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
        gt = _resize(
            np.ascontiguousarray(photo[y0 : y0 + side, x0 : x0 + side]),
            self.resolution,
            self.resolution,
        )
        if rng.random() < 0.5:
            gt = np.ascontiguousarray(gt[:, ::-1])
        x = gt.astype(np.float32) / 255.0
        for name in self.degradations:
            x = DEGRADATIONS[name](x, rng)
        lq = (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        return Pair(index, self._name(index), lq, np.array(gt, dtype=np.uint8))


# ------------------------------------------------------------------------------------- adapter
def build_dataset(data_cfg: DataConfig, split: Literal["train", "test"] = "train") -> PairedDataset:
    """The dataset ``data_cfg`` describes. ``test``: ``num_test`` held-out synthetic pairs, or
    ``test_root``; evaluation never crops at random (``random_crop`` becomes ``center_crop``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: got {split!r}; expected 'train' or 'test'")
    if data_cfg.kind == "synthetic":
        n = data_cfg.num_synthetic if split == "train" else data_cfg.num_test
        return SyntheticRestorationDataset(
            n, data_cfg.resolution, list(data_cfg.degradations), data_cfg.seed, split
        )
    root = data_cfg.root if split == "train" else data_cfg.test_root
    if root is None:
        raise DatasetError(
            "data.test_root: not set; the test split of kind=folder needs a held-out folder"
        )
    resize = (
        data_cfg.resize
        if split == "train"
        else ("center_crop" if data_cfg.resize == "random_crop" else data_cfg.resize)
    )
    return PairedFolderDataset(
        root, data_cfg.layout, data_cfg.resolution, resize, data_cfg.on_bad_file, data_cfg.seed
    )
