"""deploy.evaluate and deploy.figures: metric conventions, notes instead of fake numbers, outputs,
determinism across arms, checkpoints, local LPIPS/FID weights, the paper's figures.

Tiny seeded policy at 32 px, K = 2 (standard target), 3 test images, pyiqa piqe as the IQA scorer
(offline). LPIPS/FID run on random-weight files in the real layouts: the plumbing, not the values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import parse_config
from deploy import eval_checkpoints as ec
from deploy import eval_metrics as em
from deploy import eval_results as er
from deploy import evaluate as ev
from deploy import figures

RES = 32


def _cfg_dict(output_dir: Path) -> dict:
    return {
        "model": {"kind": "tiny"},
        "data": {"kind": "synthetic", "resolution": RES, "num_synthetic": 4, "num_test": 3},
        "rollout": {"num_inference_steps": 2, "eta": 1.0, "samples_per_input": 1, "batch_size": 1},
        "algorithm": {"policy_target": "standard"},  # one model call per step: a fast test
        "reward": {"backend": "pyiqa", "pyiqa_metric": "piqe"},
        "deploy": {"output_dir": str(output_dir), "run_name": "evaltest"},
    }


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny models are too small to gain from 2 threads; on shared cores a busy sibling makes
    # OpenMP barriers spin (one evaluation: 0.2 s alone, 1–5 s with 2 threads under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def cfg(workdir):
    return parse_config(_cfg_dict(workdir / "runs"))


@pytest.fixture(scope="module")
def scorer(cfg):
    return em.build_eval_scorer(cfg, device="cpu")


@pytest.fixture(scope="module")
def base_result(cfg, scorer, workdir):
    return ev.evaluate(cfg, "base", workdir / "base", scorer=scorer, device="cpu")


@pytest.fixture(scope="module")
def perturbed_policy(cfg):
    """The base policy with every LoRA B (and fully trained part) nudged: a stand-in for RL weights."""
    from common.policy import build_policy

    policy = build_policy(cfg.model, RES)
    gen = torch.Generator().manual_seed(7)
    sd = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen)
        for k, v in policy.trainable_state_dict().items()
    }
    policy.load_trainable_state_dict(sd)
    return policy


@pytest.fixture(scope="module")
def rl_checkpoint(cfg, perturbed_policy, workdir) -> Path:
    """A learner checkpoint (iteration 3, version 4) of the perturbed policy with its config snapshot."""
    from learner.checkpoint import save_checkpoint

    opt = torch.optim.AdamW(perturbed_policy.trainable_parameters(), lr=1e-4)
    return save_checkpoint(
        workdir / "runs" / "evaltest",
        3,
        policy=perturbed_policy,
        optimizer=opt,
        tracker_state={},
        rng_state={},
        policy_version=4,
        config_yaml=cfg.to_yaml(),
    )


@pytest.fixture(scope="module")
def rl_result(cfg, scorer, rl_checkpoint):
    return ev.evaluate(
        cfg, rl_checkpoint.parent.parent, None, scorer=scorer, device="cpu"
    )  # the run folder


def _numbers(result: er.EvalResult) -> list[tuple]:
    return [(r.name, r.sample, r.psnr, r.ssim, r.iqa) for r in result.per_image]


# ------------------------------------------------------------------------------ metric conventions
def test_psnr_by_hand():
    # x ∈ [0, 0.9], y = x + 0.1 (no clipping): MSE = 0.1² = 0.01 on every pixel of the 3 channels,
    # PSNR = 10·log10(data_range² / (MSE + 1e-8)) = 10·log10(1 / 0.01000001) = 20 − 4.3e-6 dB.
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.9
    np.testing.assert_allclose(em.psnr(x, x + 0.1), [20.0, 20.0], atol=1e-4)
    # uint8: an offset of 51 levels is 51/255 = 0.2: PSNR = 10·log10(1/0.04) = 13.9794 dB.
    a = np.full((1, 8, 8, 3), 100, np.uint8)
    np.testing.assert_allclose(em.psnr(a + 51, a), [10 * math.log10(1 / 0.04)], atol=1e-4)
    # identical images: 10·log10(1 / 1e-8) = 80 dB (pyiqa's eps), not inf.
    np.testing.assert_allclose(em.psnr(a, a), [80.0], atol=1e-4)


def _photo_pairs() -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage
    from skimage import data

    gt = np.stack([data.astronaut()[100:164, 100:164], data.chelsea()[50:114, 150:214]])
    rng = np.random.default_rng(0)
    noisy = np.clip(gt[0].astype(float) + rng.normal(0, 20, gt[0].shape), 0, 255)
    blurred = ndimage.gaussian_filter(gt[1].astype(float), sigma=(1.5, 1.5, 0))
    return np.stack([noisy, blurred]).round().astype(np.uint8), gt


def test_psnr_ssim_equal_pyiqa_and_its_documented_conventions():
    import pyiqa
    from skimage.metrics import structural_similarity

    out, gt = _photo_pairs()
    t_out, t_gt = (
        torch.from_numpy(a).permute(0, 3, 1, 2).contiguous().float() / 255 for a in (out, gt)
    )
    ours_psnr, ours_ssim = em.psnr(out, gt), em.ssim(out, gt)
    np.testing.assert_array_equal(
        ours_psnr, pyiqa.create_metric("psnr", device="cpu")(t_out, t_gt).double().numpy()
    )
    np.testing.assert_array_equal(
        ours_ssim, pyiqa.create_metric("ssim", device="cpu")(t_out, t_gt).double().numpy()
    )
    # PSNR: RGB, data_range 1, per-image MSE over C×H×W.
    mse = ((out / 255.0 - gt / 255.0) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(ours_psnr, 10 * np.log10(1 / (mse + 1e-8)), atol=1e-3)

    # SSIM: Y of YIQ (0.299, 0.587, 0.114) ×255 rounded, Gaussian 11×11 σ 1.5, valid region.
    def luma(u):
        return np.round((u / 255.0) @ np.array([0.299, 0.587, 0.114]) * 255)

    ref = [
        structural_similarity(
            luma(o),
            luma(g),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
        )
        for o, g in zip(out, gt)
    ]
    np.testing.assert_allclose(ours_ssim, ref, atol=1e-4)
    assert "yiq" in em.CONVENTIONS["ssim"] and "data_range 1" in em.CONVENTIONS["psnr"]


# ---------------------------------------------------------------------------------- evaluate
def test_base_writes_results_images_and_notes(base_result, workdir):
    out = workdir / "base"
    md, js = (out / "results.md").read_text(), json.loads((out / "results.json").read_text())
    assert len(base_result.per_image) == 3 and len(base_result.ground_truth) == 3
    for r in base_result.per_image:
        assert all(math.isfinite(v) for v in (r.psnr, r.ssim, r.iqa)) and 0 <= r.iqa <= 1
        from PIL import Image

        with Image.open(out / r.file) as im:
            assert im.size == (RES, RES) and im.format == "PNG"
    assert all(
        math.isfinite(g.iqa_gt) and math.isfinite(g.iqa_lq) for g in base_result.ground_truth
    )
    assert (out / "grid.png").is_file() and len(list((out / "reference" / "gt").glob("*.png"))) == 3
    # LPIPS/FID without local weights: the note, never a number.
    for key, note in (("lpips", em.NOTE_LPIPS), ("fid", em.NOTE_FID)):
        row = base_result.metrics[key]
        assert row.restored is None and row.lq is None and row.note == note
        assert js["metrics"][key]["restored"] is None and js["metrics"][key]["note"] == note
        assert note in md
    assert all(r["lpips"] is None for r in js["per_image"])
    assert "not computed: needs local weights (--lpips-weights)" in md
    # pyiqa conventions are written out; the JSON reads back to the same result.
    assert "Y = 0.299·R + 0.587·G + 0.114·B" in md and js["conventions"] == em.CONVENTIONS
    back = er.read_results(out)
    assert _numbers(back) == _numbers(base_result) and back.mean("psnr") == base_result.mean("psnr")
    assert back.mean("lpips") is None


def test_same_checkpoint_twice_and_untouched_weights_give_identical_numbers(
    cfg, scorer, base_result, workdir
):
    from common.policy import build_policy

    again = ev.evaluate(cfg, "base", workdir / "base-again", scorer=scorer, device="cpu")
    assert _numbers(again) == _numbers(base_result)
    assert (workdir / "base-again" / "images" / "test-00000-chelsea.png").read_bytes() == (
        workdir / "base" / "images" / "test-00000-chelsea.png"
    ).read_bytes()
    # A trainable-weights folder holding the base weights: same noise for every arm, so equal numbers.
    untouched = build_policy(cfg.model, RES).save_trainable(workdir / "untouched-lora")
    same = ev.evaluate(cfg, untouched, workdir / "untouched", scorer=scorer, device="cpu")
    assert same.checkpoint.kind == "trainable" and _numbers(same) == _numbers(base_result)


def test_run_checkpoint_is_loaded_verified_and_checked_against_the_config(
    cfg, base_result, rl_result, rl_checkpoint, workdir
):
    run = rl_checkpoint.parent.parent
    # a run folder resolves to its latest complete checkpoint; outputs default into the run folder
    assert rl_result.label == "ckpt-000003" and rl_result.checkpoint.kind == "run_checkpoint"
    assert rl_result.checkpoint.iteration == 3 and rl_result.checkpoint.policy_version == 4
    assert Path(rl_result.out_dir) == run / "eval" / "ckpt-000003"
    assert (run / "eval" / "ckpt-000003" / "results.md").is_file()
    # other weights, same inputs and ground truths
    assert _numbers(rl_result) != _numbers(base_result)
    assert [r.iqa_gt for r in rl_result.ground_truth] == [
        r.iqa_gt for r in base_result.ground_truth
    ]
    # its trainable/ folder is verified as part of the whole checkpoint
    assert ec.resolve_checkpoint(rl_checkpoint / "trainable") == ec.resolve_checkpoint(
        rl_checkpoint
    )
    # a --config whose model differs from the run's (another tiny seed) is refused, naming the field
    other = parse_config(
        {**_cfg_dict(workdir / "runs"), "model": {"kind": "tiny", "tiny": {"seed": 1}}}
    )
    with pytest.raises(er.EvaluationError, match=r"model\.tiny\.seed"):
        ec.load_eval_policy(other, ec.resolve_checkpoint(rl_checkpoint))
    with pytest.raises(er.EvaluationError, match="not a checkpoint"):
        ec.resolve_checkpoint(workdir / "base" / "images")


# ------------------------------------------------------------------------------- LPIPS and FID
@pytest.fixture(scope="module")
def lpips_files(workdir):
    """Random-weight stand-ins for the real files, in their real layouts: a whole LPIPS state dict,
    the heads only (lin0..4), and torchvision's AlexNet state dict."""
    import torchvision

    with em._no_torchvision_download():
        from pyiqa.archs.lpips_arch import LPIPS

        torch.manual_seed(0)
        net = LPIPS(pretrained=False, net="alex", version="0.1")
        for lin in net.lins:  # real LPIPS heads are non-negative: distances are >= 0
            lin.model[-1].weight.data.abs_()
    full, heads, backbone = (
        workdir / "lpips_full.pth",
        workdir / "lpips_heads.pth",
        workdir / "alexnet.pth",
    )
    torch.save(net.state_dict(), full)
    torch.save(
        {
            k: v
            for k, v in net.state_dict().items()
            if k.startswith("lin") and not k.startswith("lins")
        },
        heads,
    )
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), backbone)
    return full, heads, backbone


@pytest.fixture(scope="module")
def fid_file(workdir):
    """A random-weight FID InceptionV3 state dict (the layout of pt_inception-2015-12-05)."""
    from unittest import mock

    from pyiqa.archs import inception

    with mock.patch.object(inception, "load_pretrained_network", lambda *a, **k: None):
        torch.manual_seed(0)
        net = inception.fid_inception_v3()
    path = workdir / "fid_inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_lpips_needs_every_tensor_from_local_files(lpips_files):
    full, heads, backbone = lpips_files
    out, gt = _photo_pairs()
    d_full = em.lpips_distance(em.build_lpips(full), out, gt)
    assert d_full.shape == (2,) and np.all(np.isfinite(d_full)) and np.all(d_full > 0)
    assert np.all(em.lpips_distance(em.build_lpips(full), gt, gt) < 1e-6)
    with pytest.raises(er.EvaluationError, match="--lpips-backbone"):
        em.build_lpips(heads)
    d_split = em.lpips_distance(em.build_lpips(heads, backbone), out, gt)
    assert np.all(np.isfinite(d_split))
    with pytest.raises(er.EvaluationError, match="no such file"):
        em.build_lpips(full.parent / "missing.pth")


def test_lpips_computed_with_local_weights(cfg, scorer, base_result, lpips_files, workdir):
    res = ev.evaluate(
        cfg,
        "base",
        workdir / "with-lpips",
        scorer=scorer,
        device="cpu",
        lpips_weights=lpips_files[0],
    )
    assert _numbers(res) == _numbers(base_result)
    lp = res.metrics["lpips"]
    assert lp.note is None and math.isfinite(lp.restored.mean) and math.isfinite(lp.lq.mean)
    assert all(math.isfinite(r.lpips) for r in res.per_image)
    assert all(math.isfinite(g.lpips_lq) for g in res.ground_truth)
    md = (workdir / "with-lpips" / "results.md").read_text()
    assert em.NOTE_LPIPS not in md and em.NOTE_FID in md and "| LPIPS |" in md


def test_fid_is_wired_to_the_restored_and_ground_truth_folders(cfg, scorer, workdir, monkeypatch):
    with pytest.raises(er.EvaluationError, match="--fid-weights .*no such file"):
        em.fid_between_folders(workdir, workdir, workdir / "missing.pth")
    weights = workdir / "fid-stand-in.pth"  # fid_between_folders is replaced: never read
    weights.touch()
    calls = []
    monkeypatch.setattr(
        ev, "fid_between_folders", lambda a, b, w, d: calls.append((a, b, w)) or 12.5
    )
    res = ev.evaluate(
        cfg, "base", workdir / "with-fid", scorer=scorer, device="cpu", fid_weights=weights
    )
    assert calls == [
        (workdir / "with-fid" / "images", workdir / "with-fid" / "reference" / "gt", weights)
    ]
    assert res.metrics["fid"].restored.mean == 12.5 and "3 restored vs 3" in res.metrics["fid"].note
    assert em.NOTE_FID not in (workdir / "with-fid" / "results.md").read_text()


@pytest.mark.slow  # the 2048×2048 matrix square root of FID: 15–40 s on 2 shared cores
def test_fid_with_local_weights(base_result, fid_file):
    # pyiqa's FID with the local file loaded strictly, restored set vs ground-truth set
    out = Path(base_result.out_dir)
    value = em.fid_between_folders(out / "images", out / "reference" / "gt", fid_file)
    assert math.isfinite(value)


# ------------------------------------------------------------------------------------------- CLI
def test_cli(workdir, capsys):
    import yaml

    path = workdir / "cli.yaml"
    path.write_text(yaml.safe_dump(_cfg_dict(workdir / "runs")))
    out = workdir / "cli-out"
    rc = ev.main(
        [
            "--config",
            str(path),
            "--checkpoint",
            "base",
            "--out",
            str(out),
            "--samples-per-image",
            "2",
            "--set",
            "data.num_test=2",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert "| PSNR ↑ (dB) |" in capsys.readouterr().out
    js = json.loads((out / "results.json").read_text())
    assert len(js["per_image"]) == 4 and {r["file"] for r in js["per_image"]} >= {
        "images/test-00000-chelsea_s1.png"
    }
    rc = ev.main(
        ["--config", str(path), "--checkpoint", str(workdir / "nowhere"), "--out", str(out)]
    )
    assert rc == 2 and "not a folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- figures
def _assert_real_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        px = np.asarray(im.convert("RGB"))
    assert px.std() > 1 and len(np.unique(px.reshape(-1, 3), axis=0)) > 10  # not blank


def test_figure_1_iqa_distributions(base_result, rl_result, workdir):
    groups = figures.iqa_groups_from_results(
        {"base": workdir / "base" / "results.json", "RL": rl_result}
    )
    assert list(groups) == ["ground truth", "base", "RL"]
    assert groups["ground truth"] == [g.iqa_gt for g in base_result.ground_truth]
    assert groups["base"] == [r.iqa for r in base_result.per_image]
    path = figures.iqa_distribution_figure(groups, workdir / "fig1.png")
    _assert_real_png(path)


def test_figure_6_reward_curves(workdir):
    rng = np.random.default_rng(0)
    iqa, rec = workdir / "run-iqa", workdir / "run-rec"
    for run, values in (
        (iqa, 0.3 + 0.02 * np.arange(20) + rng.normal(0, 0.01, 20)),
        (rec, -0.2 + rng.normal(0, 0.05, 20)),
    ):
        run.mkdir()
        lines = [
            {"iteration": i, "reward/mean": float(v), "losses/total": 1.0}
            for i, v in enumerate(values)
        ]
        lines.insert(3, {"iteration": 99, "dropped": 8})  # a dropped batch has no reward
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    its, vals, key = figures.reward_curve(iqa)
    assert key == "reward/mean" and its == list(range(20)) and len(vals) == 20
    curves = {"IQA reward": (its, vals), "Reconstruction reward": figures.reward_curve(rec)[:2]}
    _assert_real_png(figures.reward_curves_figure(curves, workdir / "fig6.png"))
    _assert_real_png(figures.reward_curves_figure(curves, workdir / "fig6-passes.png", pass_window=4))
    with pytest.raises(ValueError, match="no finite reward_mean"):
        figures.reward_curve(iqa, key="reward_mean")
    # the CLI writes the same kind of figure
    assert (
        figures.main(
            [
                "rewards",
                "--run",
                f"IQA={iqa}",
                "--run",
                f"Rec={rec}",
                "--out",
                str(workdir / "f6.png"),
                "--pass-window",
                "4",
            ]
        )
        == 0
    )
    _assert_real_png(workdir / "f6.png")


def test_results_schema_round_trips_and_names_the_bad_field(tmp_path):
    """results.json is the pydantic schema's dump; a mistyped field is one error naming the file and field."""
    stat = er.Stat.of([1.0, 2.0, 4.0])
    assert (stat.n, round(stat.mean, 6)) == (3, round(7 / 3, 6))
    result = er.EvalResult(
        label="arm", checkpoint=er.CheckpointInfo(kind="base", config_yaml="model: {}\n"),
        metrics={"psnr": er.MetricRow(name="psnr", label="PSNR", restored=stat, digits=2)},
        per_image=[er.ImageRecord(id=0, name="a", sample=0, file="images/a.png", psnr=20.0, ssim=0.5, iqa=0.7)],
        ground_truth=[er.ReferenceRecord(id=0, name="a", gt_file="g.png", lq_file="l.png", iqa_gt=0.9, iqa_lq=0.2,
                                         psnr_lq=10.0, ssim_lq=0.3)],
        sampler={"num_inference_steps": 4}, data={"num_images": 1}, scorer={"name": "s", "version": "1"},
        conventions={"psnr": "rgb"}, seconds=1.5,
    )
    d = result.to_dict()
    assert list(d)[:4] == ["format", "version", "label", "checkpoint"]
    assert "config_yaml" not in d["checkpoint"]  # the config snapshot is not repeated in the results
    (tmp_path / "results.json").write_text(json.dumps(d))
    back = er.read_results(tmp_path)
    assert back.to_dict() == d and back.out_dir == str(tmp_path) and back.mean("psnr") == stat.mean
    d["per_image"][0]["psnr"] = "high"
    (tmp_path / "results.json").write_text(json.dumps(d))
    with pytest.raises(er.EvaluationError, match=r"results\.json: per_image\.0\.psnr"):
        er.read_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(er.EvaluationError, match="not a readable results file"):
        er.read_results(tmp_path)
