"""deploy.export: a run's checkpoint as a diffusers pipeline folder that diffusers alone restores with.

The round trip: a tiny LoRA policy with non-zero adapters (and a VAE with a shift_factor, as the
demo's pre-trained tiny VAE has) is saved through the learner's checkpoint code, exported, loaded
in a subprocess that cannot import this project, and run at η = 0; its output must equal the
project's own evaluation restoration of the same LQ image from the same noise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import parse_config
from deploy import export as ex

RES = 32  # a multiple of 8 (diffusers) and of the tiny policy's downscale (VAE 2 × UNet 2)
K = 4
SHIFT, SCALE = 0.3, 0.7  # a VAE latent convention with a shift, which diffusers' pipelines ignore

#: Max |export − project| over pixels of float images in [0, 1]. Both run float32 on the CPU; they
#: differ only by rounding: DDIM coefficients (the project takes √ᾱ in float64, diffusers in
#: float32, ~1e-7 relative), the merged LoRA (W + s·BA vs W·x + s·B(A·x)) and the VAE shift folded
#: into biases, carried through K steps and the decoder. 1e-5 is ~40 float32 ulps at 1.0 and 1/400
#: of an 8-bit level (1/255): a real mismatch (a missing shift, CFG, an unmerged or wrong LoRA, a
#: different x_T or control normalisation) is orders of magnitude larger.
TOL = 1e-5

#: Restores with diffusers alone. Any import of this project's packages raises (the project is
#: installed editable, so a clean sys.path alone would not keep it out); `python -I` ignores
#: PYTHONPATH and the current folder.
DIFFUSERS_ONLY = r"""
import importlib.abc, json, sys
PROJECT = {"common", "deploy", "learner", "rollout", "reward_server", "benchmarks", "tests"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT:
            raise ImportError(f"{name}: this check must not import restore-rl")
sys.meta_path.insert(0, Block())

import numpy as np, torch
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image
from safetensors.torch import load_file

d, png, seed, steps, etas, out, prompt = sys.argv[1:]
if prompt == "-":  # no text encoder: the saved prompt embedding
    pipe = StableDiffusionControlNetPipeline.from_pretrained(d, text_encoder=None, tokenizer=None)
    text = {"prompt_embeds": load_file(f"{d}/prompt_embeds.safetensors")["prompt_embeds"]}
else:  # the exported text encoder + tokenizer embed the prompt
    pipe = StableDiffusionControlNetPipeline.from_pretrained(d)
    text = {"prompt": prompt}
restored = {}
for eta in etas.split(","):
    images = pipe(image=Image.open(png).convert("RGB"), **text, guidance_scale=1.0,
                  eta=float(eta), num_inference_steps=int(steps),
                  generator=torch.Generator().manual_seed(int(seed)), output_type="np").images
    restored[f"eta={eta}"] = images[0]
np.savez(out, **restored)
print(json.dumps({
    "project_modules": sorted(m for m in sys.modules if m.split(".")[0] in PROJECT),
    "controlnet_class": type(pipe.controlnet).__name__,
    "lora_params": [n for n, _ in pipe.controlnet.named_parameters() if "lora" in n],
    "vae_shift_factor": pipe.vae.config.shift_factor,
}))
"""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


def _shifted_vae(path: Path) -> Path:
    from common.tiny.policy import tiny_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        vae = tiny_vae(RES)
    vae.register_to_config(shift_factor=SHIFT, scaling_factor=SCALE)
    vae.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def vae_dir(workdir) -> Path:
    return _shifted_vae(workdir / "vae")


@pytest.fixture(scope="module")
def cfg(workdir, vae_dir):
    return parse_config(
        {
            "model": {"kind": "tiny", "tiny": {"vae_dir": str(vae_dir)}},
            "data": {"kind": "synthetic", "resolution": RES, "num_synthetic": 2, "num_test": 1},
            "rollout": {"num_inference_steps": K, "eta": 1.0, "samples_per_input": 1, "batch_size": 1},
            "evaluation": {"eta": 0.0, "policy_target": "standard"},
            "reward": {"backend": "pyiqa", "pyiqa_metric": "piqe"},
            "deploy": {"output_dir": str(workdir / "runs"), "run_name": "exporttest"},
        }
    )


@pytest.fixture(scope="module")
def run(cfg, workdir) -> Path:
    """A run folder with one learner checkpoint (iteration 3) of a policy with non-zero LoRA."""
    from common.policy import build_policy
    from learner.checkpoint import save_checkpoint

    policy = build_policy(cfg.model, RES)
    gen = torch.Generator().manual_seed(7)
    sd = policy.trainable_state_dict()
    assert any("lora_B" in k for k in sd) and all(not v.any() for k, v in sd.items() if "lora_B" in k)
    policy.load_trainable_state_dict(
        {k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
    )
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-4)
    run_dir = workdir / "runs" / "exporttest"
    save_checkpoint(run_dir, 3, policy=policy, optimizer=opt, tracker_state={}, rng_state={},
                    policy_version=4, config_yaml=cfg.to_yaml())
    return run_dir


@pytest.fixture(scope="module")
def exported(run, workdir) -> Path:
    out = workdir / "export"
    assert ex.main(["--run", str(run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def lq_pair(cfg):
    from common.data import build_dataset

    return build_dataset(cfg.data, "test")[0]


def _project_restoration(cfg, checkpoint, pair) -> tuple[np.ndarray, np.ndarray]:
    """The project's own evaluation restoration (deploy.evaluate's policy, sampler and noise):
    (float32 [H, W, 3] in [0, 1] = D(x_0), uint8 [H, W, 3] = the saved output)."""
    from deploy.eval_checkpoints import load_eval_policy, resolve_checkpoint
    from deploy.evaluate import EVAL_ROUND, eval_sampler
    from rollout.sampler import sample_trajectories

    policy = load_eval_policy(cfg, resolve_checkpoint(checkpoint), "cpu")
    traj = sample_trajectories(policy, pair.lq[None], [pair.id], eval_sampler(cfg),
                               policy_version=0, seed=0, round_index=EVAL_ROUND)
    with torch.no_grad():
        img = policy.decode_latents(traj.latents[:, -1])  # [1, 3, H, W]
    return img[0].permute(1, 2, 0).numpy(), traj.final_images[0].numpy()


def _diffusers_restoration(
    export_dir: Path, png: Path, seed: int, etas: str, out: Path, steps: int = K, prompt: str = "-"
) -> dict:
    """Run :data:`DIFFUSERS_ONLY` in a fresh interpreter; the images land in ``out`` (.npz).
    ``prompt`` "-": pass the saved prompt_embeds; else the prompt text (exported text encoder)."""
    proc = subprocess.run(
        [sys.executable, "-I", "-c", DIFFUSERS_ONLY, str(export_dir), str(png), str(seed), str(steps),
         etas, str(out), prompt],
        check=False, capture_output=True, text=True, timeout=600, cwd=out.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_diffusers_alone_restores_like_the_project(cfg, run, exported, lq_pair, workdir):
    from PIL import Image

    from deploy.evaluate import EVAL_ROUND
    from rollout.sampler import trajectory_seed

    png = workdir / "lq.png"
    Image.fromarray(lq_pair.lq).save(png)  # lossless: the subprocess reads the same uint8 image
    seed = trajectory_seed(0, int(lq_pair.id), 0, EVAL_ROUND)  # the evaluation's x_T generator
    facts = _diffusers_restoration(exported, png, seed, "0.0,1.0", workdir / "diffusers.npz")
    restored = np.load(workdir / "diffusers.npz")
    ours = restored["eta=0.0"]
    assert facts["project_modules"] == []
    assert facts["controlnet_class"] == "ControlNetModel" and facts["lora_params"] == []
    assert facts["vae_shift_factor"] is None

    project, project_u8 = _project_restoration(cfg, run, lq_pair)
    base, _ = _project_restoration(cfg, "base", lq_pair)
    assert ours.shape == project.shape == (RES, RES, 3)
    diff = float(np.abs(ours - project).max())
    print(f"export round trip: max |diffusers - project| = {diff:.3g} (float pixels in [0, 1])")
    assert diff < TOL
    # The 8-bit outputs: equal up to a rounding flip at a half level.
    assert np.abs(np.round(ours * 255).astype(int) - project_u8.astype(int)).max() <= 1
    # The LoRA matters: the untrained base restores differently, far beyond the tolerance.
    lora_effect = float(np.abs(project - base).max())
    print(f"LoRA effect: max |trained - base| = {lora_effect:.3g}")
    assert float(np.abs(ours - base).max()) > 100 * TOL

    # η = 1 (beyond the brief): with one image the pipeline draws x_T and then each step's noise
    # from its generator in the order the project's sampler draws them from the trajectory's, so
    # the stochastic restoration matches too (σ_t in float32 vs float64 is the only difference).
    cfg_eta1 = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"eta": 1.0})})
    project_eta1, _ = _project_restoration(cfg_eta1, run, lq_pair)
    diff_eta1 = float(np.abs(restored["eta=1.0"] - project_eta1).max())
    print(f"export round trip at eta = 1: max |diffusers - project| = {diff_eta1:.3g}")
    assert diff_eta1 < TOL
    assert float(np.abs(project_eta1 - project).max()) > 100 * TOL  # η = 1 did add noise


def test_export_folder_is_a_diffusers_pipeline_with_the_lora_merged(exported, run):
    import diffusers
    from safetensors import safe_open

    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    assert index["_diffusers_version"] == diffusers.__version__
    assert index["controlnet"] == ["diffusers", "ControlNetModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["text_encoder"] == [None, None] and index["requires_safety_checker"] is False
    assert not list(exported.rglob("adapter_config.json"))  # no peft adapter: merged
    with safe_open(str(exported / "controlnet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]  # noqa: SIM118 - safe_open has no __iter__
    vae_cfg = json.loads((exported / "vae" / "config.json").read_text())
    assert vae_cfg["shift_factor"] is None and vae_cfg["scaling_factor"] == pytest.approx(SCALE)
    info = json.loads((exported / ex.EXPORT_INFO_FILE).read_text())
    assert info["source"]["iteration"] == 3 and info["source"]["policy_version"] == 4
    assert info["source"]["checkpoint"].endswith("ckpt-000003")
    assert info["model"]["lora"]["merged"] is True and info["model"]["vae_shift_folded"] == SHIFT
    assert info["sampler"]["num_inference_steps"] == K and info["sampler"]["eta"] == 0.0
    assert info["versions"]["diffusers"] == diffusers.__version__
    readme = (exported / "README.md").read_text()
    assert "text_encoder=None, tokenizer=None" in readme and f"num_inference_steps={K}" in readme


def test_fold_vae_shift_keeps_the_latent_convention():
    """diffusers' convention on the folded VAE == the project's convention on the original one."""
    from common.tiny.policy import tiny_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        vae = tiny_vae(RES).eval()
    vae.register_to_config(shift_factor=SHIFT, scaling_factor=SCALE)
    folded, shift = ex.fold_vae_shift(vae)
    assert shift == SHIFT and folded.config.shift_factor is None and vae.config.shift_factor == SHIFT
    x = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lat = torch.randn(2, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        project_z = (vae.encode(x).latent_dist.mean - SHIFT) * SCALE
        diffusers_z = folded.encode(x).latent_dist.mean * SCALE
        project_x = vae.decode(lat / SCALE + SHIFT).sample
        diffusers_x = folded.decode(lat / SCALE).sample
        unfolded_x = vae.decode(lat / SCALE).sample  # what a pipeline would do without the fold
        var = (vae.encode(x).latent_dist.logvar, folded.encode(x).latent_dist.logvar)
    assert (project_z - diffusers_z).abs().max() < 1e-5
    assert (project_x - diffusers_x).abs().max() < 1e-5
    assert (var[0] - var[1]).abs().max() < 1e-6
    assert (project_x - unfolded_x).abs().max() > 1e-3


def test_errors_are_clear(run, workdir, capsys):
    # 1. a run folder without a checkpoint
    empty = workdir / "runs" / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    assert ex.main(["--run", str(empty), "--out", str(workdir / "o1")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (workdir / "o1").exists()
    # 2. a checkpoint whose weights fail verification (same size, one byte flipped)
    bad = workdir / "runs" / "corrupt"
    shutil.copytree(run, bad)
    weights = next((bad / "checkpoints").glob("ckpt-*/trainable/adapter_model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert ex.main(["--run", str(bad), "--out", str(workdir / "o2")]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "adapter_model.safetensors" in err
    assert not (workdir / "o2").exists() and not list(workdir.glob(".tmp-export-*"))
    # 3. an existing, non-empty --out
    taken = workdir / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert ex.main(["--run", str(run), "--out", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (taken / "keep.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1
    # 4. a checkpoint name that does not exist, and a missing run folder
    assert ex.main(["--run", str(run), "--checkpoint", "ckpt-000099", "--out", str(workdir / "o3")]) == 2
    assert "ckpt-000099" in capsys.readouterr().err
    assert ex.main(["--run", str(workdir / "nope"), "--out", str(workdir / "o4")]) == 2
    assert "not a folder" in capsys.readouterr().err
    # 5. bare trainable weights carry no config snapshot: --config is needed
    bare = workdir / "bare-trainable"
    shutil.copytree(next((run / "checkpoints").glob("ckpt-*/trainable")), bare)
    assert ex.main(["--run", str(run), "--checkpoint", str(bare), "--out", str(workdir / "o5")]) == 2
    assert "no config.yaml snapshot; pass --config" in capsys.readouterr().err


# ------------------------------------------------------------- a pretrained folder with CLIP
def _tiny_clip(folder: Path, width: int) -> None:
    """A tiny CLIP text encoder + a character-level CLIP tokenizer (nothing downloads)."""
    import string

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = [*string.ascii_lowercase, ","]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab |= {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    raw = folder / "raw_tokenizer"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=16).save_pretrained(
        str(folder / "tokenizer")
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=len(vocab) - 2,
            eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1,
        ))
    te.save_pretrained(str(folder / "text_encoder"))


@pytest.fixture(scope="module")
def pretrained_run(workdir, vae_dir) -> tuple:
    """A kind=pretrained run: unet/ vae/ scheduler/ text_encoder/ tokenizer/ and no controlnet/
    (the ControlNet is copied from the UNet: its zero convolutions train in full beside the LoRA,
    peft modules_to_save, which the merge must keep too)."""
    from common.policy import build_policy
    from common.tiny.policy import build_tiny_policy
    from learner.checkpoint import save_checkpoint

    folder = workdir / "sd-tiny"
    tiny = build_tiny_policy(RES, seed=1, vae_dir=vae_dir)
    tiny.unet.save_pretrained(str(folder / "unet"))
    tiny.vae.save_pretrained(str(folder / "vae"))
    tiny.scheduler.save_pretrained(str(folder / "scheduler"))
    _tiny_clip(folder, tiny.unet.config.cross_attention_dim)
    cfg = parse_config(
        {
            "model": {"kind": "pretrained", "pretrained_dir": str(folder), "prompt": "a sharp photo"},
            "data": {"kind": "synthetic", "resolution": RES, "num_synthetic": 2, "num_test": 1},
            "rollout": {"num_inference_steps": K, "eta": 1.0, "samples_per_input": 1, "batch_size": 1},
            "evaluation": {"eta": 0.0},
            "reward": {"backend": "pyiqa", "pyiqa_metric": "piqe"},
            "deploy": {"output_dir": str(workdir / "runs"), "run_name": "pretrained"},
        }
    )
    policy = build_policy(cfg.model, RES)
    sd = policy.trainable_state_dict()
    assert any("modules_to_save" in k for k in sd)
    gen = torch.Generator().manual_seed(8)
    policy.load_trainable_state_dict({k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in sd.items()})
    run_dir = workdir / "runs" / "pretrained"
    save_checkpoint(run_dir, 1, policy=policy, optimizer=torch.optim.AdamW(policy.trainable_parameters()),
                    tracker_state={}, rng_state={}, policy_version=1, config_yaml=cfg.to_yaml())
    return cfg, run_dir


@pytest.mark.slow
def test_pretrained_export_ships_the_text_encoder_and_restores_from_the_prompt(
    pretrained_run, lq_pair, workdir
):
    from PIL import Image

    from deploy.evaluate import EVAL_ROUND
    from rollout.sampler import trajectory_seed

    cfg, run_dir = pretrained_run
    out = workdir / "export-pretrained"
    result = ex.export_checkpoint(run_dir, out)
    assert result.lora_merged and result.iteration == 1
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]

    png = workdir / "lq-pretrained.png"
    Image.fromarray(lq_pair.lq).save(png)
    seed = trajectory_seed(0, int(lq_pair.id), 0, EVAL_ROUND)
    facts = _diffusers_restoration(out, png, seed, "0.0", workdir / "pretrained.npz", prompt=cfg.model.prompt)
    assert facts["project_modules"] == [] and facts["lora_params"] == []
    ours = np.load(workdir / "pretrained.npz")["eta=0.0"]
    project, _ = _project_restoration(cfg, run_dir, lq_pair)
    base, _ = _project_restoration(cfg, "base", lq_pair)
    diff = float(np.abs(ours - project).max())
    print(f"pretrained export (prompt through the exported CLIP): max |diffusers - project| = {diff:.3g}")
    assert diff < TOL
    assert float(np.abs(ours - base).max()) > 100 * TOL
