"""The evaluation's metrics: PSNR and SSIM (pyiqa), LPIPS and FID (only with local weights), and
the IQA reward score of the configured scorer, with their exact conventions (:data:`CONVENTIONS`)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploy.eval_results import EvaluationError

if TYPE_CHECKING:
    import torch

    from common.config import ExperimentConfig
    from reward_server.scoring import Scorer

__all__ = [
    "CONVENTIONS",
    "NOTE_FID",
    "NOTE_FID_FEW",
    "NOTE_LPIPS",
    "build_eval_scorer",
    "build_lpips",
    "fid_between_folders",
    "iqa_scores",
    "lpips_distance",
    "psnr",
    "ssim",
]

NOTE_LPIPS = "not computed: needs local weights (--lpips-weights)"
NOTE_FID = "not computed: needs local weights (--fid-weights)"
NOTE_FID_FEW = "not computed: FID needs >= 2 restored and >= 2 ground-truth images"

#: What each number means, exactly (pyiqa 0.1.16 read at the source; see the tests).
CONVENTIONS: dict[str, str] = {
    "images": "All metrics are computed on the saved 8-bit outputs (uint8 PNG / 255 -> [0, 1]) at "
    "data.resolution, no border crop; per-image values are averaged over images (mean ± population "
    "std), e.g. PSNR is the mean of per-image PSNRs, not the PSNR of the mean MSE.",
    "psnr": "pyiqa `psnr` (PSNR, test_y_channel=False): RGB, all 3 channels, data_range 1 "
    "(inputs in [0, 1]); per image MSE over C×H×W, PSNR = 10·log10(1 / (MSE + 1e-8)), so identical "
    "images give 80 dB, never ∞.",
    "ssim": "pyiqa `ssim` (SSIM, test_y_channel=True, color_space='yiq', downsample=False): luma "
    "Y = 0.299·R + 0.587·G + 0.114·B (the Y of YIQ, i.e. full-range BT.601 luma — NOT the "
    "16–235 YCbCr Y of BasicSR/MATLAB rgb2ycbcr), scaled to [0, 255] and rounded to integers, "
    "float64; 11×11 Gaussian window σ = 1.5, 'valid' filtering (no padding: the map is "
    "(H−10)×(W−10)), C1 = (0.01·255)², C2 = (0.03·255)², contrast-structure term clamped at 0 "
    "(ReLU), no 1/f downsampling; the mean of the SSIM map.",
    "lpips": "pyiqa LPIPS v0.1, AlexNet backbone, inputs [0, 1] -> [−1, 1], spatial average over "
    "5 layers; lower is better. Only with local weights (--lpips-weights [+ --lpips-backbone]).",
    "fid": "pyiqa FID (clean-fid 'clean' mode: PIL bicubic resize to 299×299 per channel), "
    "InceptionV3 pool3 2048-d features with the pt_inception-2015-12-05 weights, the set of restored "
    "images vs the set of ground truths of this split; lower is better. With fewer than 2048 images "
    "the covariances are rank-deficient: small test sets (LOL eval15) give noisy, biased FIDs. Only "
    "with local weights (--fid-weights).",
    "iqa": "The configured reward scorer (reward.* of the config, built in-process), score in "
    "[0, 1], higher is better (each scorer maps its native range onto [0, 1], e.g. pyiqa piqe -> "
    "1 − piqe/100; DeQA/Q-Align levels 1–5 -> (s − 1)/4).",
}


# -------------------------------------------------------------------------------------- metrics
def _as_tensor(images: np.ndarray | torch.Tensor, device: str | torch.device) -> torch.Tensor:
    from common.policy import images_to_tensor

    return images_to_tensor(images, device)


def _pyiqa_metric(name: str, device: str | torch.device):
    import pyiqa

    key = (name, str(device))
    if key not in _PYIQA_CACHE:
        _PYIQA_CACHE[key] = pyiqa.create_metric(name, device=device, as_loss=False)
    return _PYIQA_CACHE[key]


_PYIQA_CACHE: dict[tuple[str, str], Any] = {}


def psnr(restored, reference, device: str | torch.device = "cpu") -> np.ndarray:
    """float64 [B] — pyiqa ``psnr`` of uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1] images
    (:data:`CONVENTIONS` ``psnr``)."""
    import torch

    with torch.inference_mode():
        v = _pyiqa_metric("psnr", device)(
            _as_tensor(restored, device), _as_tensor(reference, device)
        )
    return v.reshape(-1).double().cpu().numpy()


def ssim(restored, reference, device: str | torch.device = "cpu") -> np.ndarray:
    """float64 [B] — pyiqa ``ssim`` (Y of YIQ, rounded to 8 bits; :data:`CONVENTIONS` ``ssim``)."""
    import torch

    with torch.inference_mode():
        v = _pyiqa_metric("ssim", device)(
            _as_tensor(restored, device), _as_tensor(reference, device)
        )
    return v.reshape(-1).double().cpu().numpy()


def _load_state_dict(path: str | Path, flag: str) -> dict[str, Any]:
    """A local weights file as a state dict. ``weights_only``: a weights file runs no code."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise EvaluationError(f"{flag} {p}: no such file")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a bad file
        raise EvaluationError(
            f"{flag} {p}: not a readable weights file ({type(err).__name__}: {err})"
        ) from None
    for wrapper in ("params", "state_dict", "model"):
        if isinstance(sd, dict) and set(sd) == {wrapper}:
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise EvaluationError(f"{flag} {p}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


@contextlib.contextmanager
def _no_torchvision_download():
    # pyiqa 0.1.16's LPIPS `alexnet` wrapper calls models.alexnet(weights='IMAGENET1K_V1') whatever
    # `pretrained` says, i.e. a download. Build the bare architecture instead; the weights come
    # from the local files, loaded strictly by build_lpips.
    from unittest import mock

    import torchvision
    from pyiqa.archs import lpips_arch

    bare = torchvision.models.alexnet
    with mock.patch.object(lpips_arch.models, "alexnet", lambda *a, **k: bare(weights=None)):
        yield


def build_lpips(
    weights: str | Path, backbone: str | Path | None = None, device: str | torch.device = "cpu"
):
    """pyiqa's LPIPS (v0.1, AlexNet) with every tensor from local files; nothing downloads.

    ``weights``: a state dict of pyiqa's ``LPIPS`` module — the whole module (``net.slice*`` +
    ``lin0..4``), or only the linear heads ``lin0..4`` (pyiqa's LPIPS_v0.1_alex / richzhang's
    ``alex.pth``), then with ``backbone`` = torchvision's AlexNet state dict
    (alexnet-owt-7be5be79.pth; its ``features.i.*`` map onto ``net.sliceK.i.*``).
    Every backbone and head tensor must come from a file (EvaluationError naming what is missing).
    """
    from pyiqa.archs import lpips_arch

    with _no_torchvision_download():
        net = lpips_arch.LPIPS(
            pretrained=False, net="alex", version="0.1", pretrained_model_path=None
        )
    own = net.state_dict()
    by_suffix = {
        k.split(".", 2)[2]: k for k in own if k.startswith("net.slice")
    }  # "0.weight" -> key
    loaded: dict[str, Any] = {}
    if backbone is not None:
        for k, v in _load_state_dict(backbone, "--lpips-backbone").items():
            if k.startswith("features.") and k.removeprefix("features.") in by_suffix:
                loaded[by_suffix[k.removeprefix("features.")]] = v
        if not loaded:
            raise EvaluationError(
                f"--lpips-backbone {backbone}: no AlexNet 'features.*' tensors (expected torchvision's "
                "alexnet-owt-7be5be79.pth)"
            )
    sd = _load_state_dict(weights, "--lpips-weights")
    matched = {k: v for k, v in sd.items() if k in own}
    if not matched:
        raise EvaluationError(
            f"--lpips-weights {weights}: none of its {len(sd)} tensors is an LPIPS tensor "
            f"(e.g. {sorted(sd)[:3]}; expected 'lin0.model.1.weight', 'net.slice1.0.weight', ...)"
        )
    loaded.update(matched)
    # lins.k aliases link (same tensors); scaling_layer holds LPIPS's constants, not weights.
    required = {k for k in own if not k.startswith(("scaling_layer.", "lins."))}
    aliases = {f"lins.{k[3]}.{k.split('.', 1)[1]}": k for k in required if k.startswith("lin")}
    for alias, key in aliases.items():
        if alias in loaded and key not in loaded:
            loaded[key] = loaded[alias]
    missing = sorted(required - set(loaded))
    if missing:
        hint = (
            " — the file holds only the linear heads: add --lpips-backbone (torchvision's AlexNet "
            "weights, alexnet-owt-7be5be79.pth)"
            if all(k.startswith("net.") for k in missing)
            else ""
        )
        raise EvaluationError(
            f"--lpips-weights {weights}: {len(missing)} LPIPS tensors missing (e.g. {missing[:3]}){hint}"
        )
    try:
        net.load_state_dict({k: loaded[k] for k in required}, strict=False)
    except RuntimeError as err:
        raise EvaluationError(
            f"--lpips-weights {weights}: tensors do not fit LPIPS-alex ({err})"
        ) from None
    return net.to(device).eval().requires_grad_(False)


def lpips_distance(net, restored, reference, device: str | torch.device = "cpu") -> np.ndarray:
    """float64 [B] — LPIPS(restored, reference) with a :func:`build_lpips` network."""
    import torch

    with torch.inference_mode():
        v = net(_as_tensor(restored, device), _as_tensor(reference, device), normalize=True)
    return v.reshape(-1).double().cpu().numpy()


def fid_between_folders(
    restored_dir: str | Path,
    reference_dir: str | Path,
    weights: str | Path,
    device: str | torch.device = "cpu",
) -> float:
    """pyiqa FID ('clean' mode) between two folders of images, with local Inception weights.

    ``weights``: the FID Inception state dict (pt_inception-2015-12-05-6726825d.pth). pyiqa reads
    its weights from a module-level URL; it is pointed at the local file for the construction.
    Cost: besides the Inception forwards, one 2048×2048 matrix square root (~15 s on 2 CPU cores).
    """
    from unittest import mock

    import pyiqa
    from pyiqa.archs import inception

    _load_state_dict(weights, "--fid-weights")  # readable as plain tensors (pyiqa unpickles it)
    try:
        with mock.patch.object(
            inception, "FID_WEIGHTS_URL", str(Path(weights).expanduser().resolve())
        ):
            metric = pyiqa.create_metric("fid", device=device)
    except RuntimeError as err:
        raise EvaluationError(
            f"--fid-weights {weights}: tensors do not fit the FID InceptionV3 ({err})"
        ) from None
    value = float(
        metric(str(restored_dir), str(reference_dir), mode="clean", num_workers=0, verbose=False)
    )
    if not math.isfinite(value):
        raise EvaluationError(f"FID between {restored_dir} and {reference_dir} is {value}")
    return value


# ------------------------------------------------------------------------------------ the scorer
def build_eval_scorer(cfg: ExperimentConfig, device: str | None = None) -> Scorer:
    """The configured reward scorer, in this process (``reward_server.factory.scorer_spec``).

    ``device`` (transformers/pyiqa backends): default cuda when available, else cpu.
    """
    from reward_server.factory import scorer_spec

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return scorer_spec(cfg.reward, device=device)()


def iqa_scores(scorer: Scorer, ids: list[str], images: np.ndarray) -> np.ndarray:
    """float64 [N] scores in [0, 1]; a failed image raises (never a made-up score)."""
    from reward_server.factory import ScoreFailed, score_batch

    results = score_batch(scorer, ids, list(images))
    failed = [r for r in results if isinstance(r, ScoreFailed)]
    if failed:
        raise EvaluationError(
            f"IQA scorer {scorer.name}: {len(failed)} image(s) failed: {failed[0]}"
        )
    return np.array([r.score for r in results], dtype=np.float64)


