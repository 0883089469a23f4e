"""The diffusion restoration policy: seeded tiny builds, LoRA/full fine-tuning, reference policy,
trainable-weight round trips, and loading a local SD-style folder (nothing is downloaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from common.config import ModelConfig
from common.controlnet_policy import ControlNetPolicy
from common.policy import (
    Policy,
    PolicyLoadError,
    build_policy,
    encode_prompt,
    images_to_tensor,
    images_to_uint8,
)
from common.policy_loading import load_pretrained_policy
from common.tiny.policy import build_tiny_policy
from common.types import ShapeError

RES = 32  # latent 16×16
PROMPT = "a sharp photo"


def _inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, RES // 2, RES // 2, generator=g)
    t = torch.tensor([999, 400][:batch] + [10] * max(0, batch - 2))
    control = torch.rand(batch, 3, RES, RES, generator=g)
    return x, t, control


@torch.no_grad()
def _predict(policy: ControlNetPolicy, reference: bool = False) -> torch.Tensor:
    x, t, c = _inputs()
    if reference:
        with policy.reference():
            return policy.predict(x, t, c)
    return policy.predict(x, t, c)


def _perturb_lora(policy: ControlNetPolicy, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _model_state(policy: ControlNetPolicy) -> dict[str, torch.Tensor]:
    sd = {f"unet.{k}": v for k, v in policy.unet.state_dict().items()}
    sd |= {f"vae.{k}": v for k, v in policy.vae.state_dict().items()}
    sd |= {f"controlnet.{k}": v for k, v in policy.controlnet.state_dict().items()}
    sd["prompt_embeds"] = policy.prompt_embeds
    return sd


# ------------------------------------------------------------------------------------ tiny build
def test_tiny_build_is_bit_identical_and_leaves_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    a, b = build_tiny_policy(RES, seed=3), build_tiny_policy(RES, seed=3)
    assert torch.equal(rng_before, torch.random.get_rng_state())
    sa, sb = _model_state(a), _model_state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "two builds with one seed differ"
    c = build_tiny_policy(RES, seed=4)
    assert not torch.equal(_model_state(c)["prompt_embeds"], sa["prompt_embeds"])
    assert isinstance(a, Policy)


def test_shapes_and_image_round_trip(tiny_policy):
    p = tiny_policy
    assert p.latent_shape(RES) == (4, 16, 16) and p.vae_scale_factor == 2
    x, t, c = _inputs(batch=3)
    with torch.no_grad():
        assert p.predict(x, t, c).shape == (3, 4, 16, 16)
        assert p.predict(x, 500, c).shape == (3, 4, 16, 16)  # an int timestep broadcasts
        images = torch.randint(0, 256, (3, RES, RES, 3), dtype=torch.uint8)
        z = p.encode_images(images)
        assert z.shape == (3, 4, 16, 16) and z.dtype == torch.float32
        assert torch.equal(z, p.encode_images(images.numpy()))  # posterior mean: deterministic
        assert torch.equal(z, p.encode_images(images_to_tensor(images)))  # uint8 HWC == float CHW
        g = torch.Generator().manual_seed(0)
        assert not torch.equal(z, p.encode_images(images, generator=g))  # sampled
        out = p.decode_latents(z)
    assert out.shape == (3, 3, RES, RES) and 0.0 <= out.min() and out.max() <= 1.0
    assert images_to_uint8(out).shape == (3, RES, RES, 3)
    assert torch.equal(images_to_uint8(images_to_tensor(images)), images)


def test_bad_inputs_name_what_was_expected(tiny_policy):
    x, t, c = _inputs()
    with pytest.raises(ShapeError, match=r"control: expected float \[2, 3, 32, 32\]"):
        tiny_policy.predict(x, t, c[:, :, :16])
    with pytest.raises(ShapeError, match="sample: expected"):
        tiny_policy.predict(x[:, :3], t, c)
    with pytest.raises(ShapeError, match="timestep"):
        tiny_policy.predict(x, torch.tensor([1, 2, 3]), c)
    with pytest.raises(ShapeError, match="float tensor"):
        tiny_policy.predict(x, t, (c * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="resolution: got 30; expected a multiple of 4"):
        tiny_policy.latent_shape(30)
    with pytest.raises(ValueError, match="lora_target_modules: 'to_qq'"):
        build_tiny_policy(RES, lora_target_modules=["to_q", "to_qq"])


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_only_adapters_train(tiny_policy):
    p = tiny_policy
    names = set(p.trainable_state_dict())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not any(q.requires_grad for q in p.unet.parameters())
    assert not any(q.requires_grad for q in p.vae.parameters())
    # Every targeted module type got an adapter (attention projections and ResNet convs).
    for target in ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"):
        assert any(f".{target}.lora_A." in n for n in names), target
    x, t, c = _inputs()
    p.train()
    p.predict(x, t, c).square().mean().backward()
    assert all(q.grad is None for q in p.unet.parameters())
    grads = {n: q.grad for n, q in p.controlnet.named_parameters() if q.grad is not None}
    assert set(grads) <= names
    # B = 0 at init, so only B receives gradient on the first step.
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".lora_B." in n)


def test_reference_is_the_initial_policy(tiny_policy):
    p = tiny_policy
    init = _predict(p)
    assert torch.equal(_predict(p, reference=True), init)  # LoRA B = 0: exactly the base model
    _perturb_lora(p)
    adapted = _predict(p)
    assert not torch.allclose(adapted, init, atol=1e-4)
    assert torch.equal(_predict(p, reference=True), init)
    with p.reference(), p.reference():  # re-entrant; adapters come back afterwards
        pass
    assert torch.equal(_predict(p), adapted)
    assert len(p.trainable_parameters()) == len(p.trainable_state_dict())


def test_trainable_state_dict_round_trip(tiny_policy):
    p = tiny_policy
    _perturb_lora(p, seed=5)
    saved, before = p.trainable_state_dict(), _predict(p)
    _perturb_lora(p, seed=6)
    assert not torch.equal(_predict(p), before)
    p.load_trainable_state_dict(saved)
    assert torch.equal(_predict(p), before)
    with pytest.raises(KeyError, match="missing 1"):
        p.load_trainable_state_dict(dict(list(saved.items())[1:]))
    name = next(iter(saved))
    with pytest.raises(ShapeError, match=name):
        p.load_trainable_state_dict(saved | {name: torch.zeros(1)})


def test_full_controlnet_finetune_keeps_a_frozen_reference():
    p = build_tiny_policy(RES, finetune="controlnet_full")
    n_cn = sum(1 for _ in p.controlnet.parameters())
    assert len(p.trainable_parameters()) == n_cn
    init = _predict(p)
    _perturb_lora(p, scale=0.01)
    assert not torch.allclose(_predict(p), init, atol=1e-5)
    assert torch.equal(_predict(p, reference=True), init)


# ------------------------------------------------------------------------- checkpoints (plain libs)
def test_lora_checkpoint_loads_with_plain_peft_and_back(tmp_path):
    from diffusers import ControlNetModel
    from peft import PeftModel

    p = build_tiny_policy(RES, seed=1)
    p.save_pretrained(tmp_path / "model")  # at init: the base ControlNet
    _perturb_lora(p)
    p.save_trainable(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()

    # Without this project: diffusers base + peft adapter reproduce the ControlNet residuals.
    base = ControlNetModel.from_pretrained(tmp_path / "model" / "controlnet")
    plain = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    x, t, c = _inputs()
    emb = p.prompt_embeds.expand(2, -1, -1)
    with torch.no_grad():
        want = p.controlnet(x, t, encoder_hidden_states=emb, controlnet_cond=c, return_dict=False)
        got = plain(x, t, encoder_hidden_states=emb, controlnet_cond=c, return_dict=False)
    for w, g in zip([*want[0], want[1]], [*got[0], got[1]]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)

    # And back into a fresh policy (resume).
    q = build_tiny_policy(RES, seed=1)
    q.load_trainable(tmp_path / "lora")
    torch.testing.assert_close(_predict(q), _predict(p), rtol=0, atol=1e-6)
    r = build_tiny_policy(RES, seed=1, lora_rank=8)
    with pytest.raises(PolicyLoadError, match="adapter r is 4; this policy expects 8"):
        r.load_trainable(tmp_path / "lora")


def test_full_checkpoint_loads_with_plain_diffusers(tmp_path):
    from diffusers import ControlNetModel

    p = build_tiny_policy(RES, finetune="controlnet_full")
    _perturb_lora(p, scale=0.01)
    p.save_trainable(tmp_path / "cn")
    plain = ControlNetModel.from_pretrained(tmp_path / "cn")
    ours = p.controlnet.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in plain.state_dict().items())
    q = build_tiny_policy(RES, finetune="controlnet_full")
    q.load_trainable(tmp_path / "cn")
    assert torch.equal(_predict(q), _predict(p))


def test_full_finetune_trains_unet_and_controlnet_against_frozen_copies():
    p = build_tiny_policy(RES, finetune="full")
    names = set(p.trainable_state_dict())
    n_unet = sum(1 for _ in p.unet.parameters())
    n_cn = sum(1 for _ in p.controlnet.parameters())
    assert len(names) == len(p.trainable_parameters()) == n_unet + n_cn
    assert sum(n.startswith("unet.") for n in names) == n_unet
    assert sum(n.startswith("controlnet.") for n in names) == n_cn
    assert not any(q.requires_grad for q in p.vae.parameters())
    x, t, c = _inputs()
    p.train()
    assert p.unet.training and p.controlnet.training and not p.vae.training
    p.predict(x, t, c).square().mean().backward()
    assert all(q.grad is not None for q in p.unet.parameters())
    p.eval()

    init = _predict(p)
    _perturb_lora(p, scale=0.01)  # every trainable tensor: UNet and ControlNet
    assert not torch.allclose(_predict(p), init, atol=1e-5)
    assert torch.equal(_predict(p, reference=True), init)
    # The reference is a copy: perturbing only the UNet changes the policy, not the reference.
    q = build_tiny_policy(RES, finetune="full")
    with torch.no_grad():
        for w in q.unet.parameters():
            w.add_(0.01)
    assert not torch.allclose(_predict(q), init, atol=1e-5)
    assert torch.equal(_predict(q, reference=True), init)


def test_full_checkpoint_round_trip_and_init_checkpoint(tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    p = build_tiny_policy(RES, seed=3, finetune="full")
    _perturb_lora(p, scale=0.01)
    p.save_trainable(tmp_path / "full")
    # Loadable without this project: two plain diffusers folders.
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "full" / "unet")
    cn = ControlNetModel.from_pretrained(tmp_path / "full" / "controlnet")
    assert all(torch.equal(v, p.unet.state_dict()[k]) for k, v in unet.state_dict().items())
    assert all(torch.equal(v, p.controlnet.state_dict()[k]) for k, v in cn.state_dict().items())

    # Resume: into a fresh full policy (state dict and folder).
    q = build_tiny_policy(RES, seed=3, finetune="full")
    q.load_trainable(tmp_path / "full")
    assert torch.equal(_predict(q), _predict(p))
    r = build_tiny_policy(RES, seed=3, finetune="full")
    r.load_trainable_state_dict(p.trainable_state_dict())
    assert torch.equal(_predict(r), _predict(p))
    with pytest.raises(PolicyLoadError, match="expected unet/ and controlnet/"):
        r.load_trainable(tmp_path / "full" / "unet")

    # RL after full SFT: both models load, fresh LoRA adapters on the ControlNet start at zero,
    # and the reference is the SFT policy.
    rl = build_tiny_policy(RES, seed=3, finetune="lora", init_checkpoint=tmp_path / "full")
    want = _predict(p)
    torch.testing.assert_close(_predict(rl), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(_predict(rl, reference=True), want, rtol=0, atol=1e-6)
    assert all(".lora_" in n for n in rl.trainable_state_dict())
    assert not any(q.requires_grad for q in rl.unet.parameters())
    # A full checkpoint of another UNet shape is refused, naming the folder.
    with pytest.raises(PolicyLoadError, match="UNet weights do not fit"):
        build_tiny_policy(RES, block_out_channels=(32, 32), init_checkpoint=tmp_path / "full")


def test_init_checkpoint_lora_becomes_the_reference(tmp_path):
    a = build_tiny_policy(RES, seed=2)
    _perturb_lora(a)
    a.save_trainable(tmp_path / "sft")
    b = build_tiny_policy(RES, seed=2, init_checkpoint=tmp_path / "sft")
    want = _predict(a)
    torch.testing.assert_close(
        _predict(b), want, rtol=0, atol=1e-5
    )  # merged weights: float rounding
    torch.testing.assert_close(_predict(b, reference=True), want, rtol=0, atol=1e-5)
    with pytest.raises(PolicyLoadError, match="expected adapter_config.json"):
        build_tiny_policy(RES, init_checkpoint=tmp_path)


# ------------------------------------------------------------------------------ pretrained layout
def _write_tiny_text_encoder(root: Path, hidden: int) -> None:
    """A tiny CLIP text encoder + a character-level BPE tokenizer in SD layout."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)
    tok.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(cfg).save_pretrained(root / "text_encoder")


@pytest.fixture(scope="module")
def sd_layout(tmp_path_factory) -> Path:
    """A tiny policy saved as unet/ vae/ scheduler/ controlnet/ text_encoder/ tokenizer/."""
    root = tmp_path_factory.mktemp("sd")
    build_tiny_policy(RES, seed=7).save_pretrained(root)
    _write_tiny_text_encoder(root, hidden=32)
    return root


def test_pretrained_layout_round_trip(sd_layout, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModel

    original = build_tiny_policy(RES, seed=7)
    loaded = load_pretrained_policy(sd_layout, prompt=PROMPT, seed=7)
    want_embeds = encode_prompt(
        CLIPTextModel.from_pretrained(sd_layout / "text_encoder"),
        AutoTokenizer.from_pretrained(sd_layout / "tokenizer"),
        PROMPT,
    )
    assert loaded.prompt_embeds.shape == (1, 8, 32)
    assert torch.equal(loaded.prompt_embeds, want_embeds)
    original.prompt_embeds = loaded.prompt_embeds.clone()
    assert torch.equal(_predict(loaded), _predict(original))

    # Without a text encoder the saved prompt_embeds.safetensors is the fixed embedding.
    bare = tmp_path / "bare"
    shutil.copytree(sd_layout, bare, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    again = load_pretrained_policy(bare, seed=7)
    assert torch.equal(_predict(again), _predict(build_tiny_policy(RES, seed=7)))

    cfg = ModelConfig(kind="pretrained", pretrained_dir=bare)
    assert torch.equal(_predict(build_policy(cfg, RES)), _predict(again))
    with pytest.raises(
        PolicyLoadError,
        match="prediction_type is 'epsilon'; the model config expects 'v_prediction'",
    ):
        build_policy(cfg.model_copy(update={"prediction_type": "v_prediction"}), RES)


def _break(root: Path, what: str) -> str:
    """Damage a copy of the layout; returns the path fragment the error must name."""
    if what == "unet_weights":
        (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        return "unet: no weights file"
    if what == "vae_folder":
        shutil.rmtree(root / "vae")
        return "vae: missing folder"
    if what == "scheduler_config":
        (root / "scheduler" / "scheduler_config.json").unlink()
        return "scheduler_config.json: missing file"
    if what == "tokenizer":
        shutil.rmtree(root / "tokenizer")
        return "tokenizer: missing folder"
    if what == "text_encoder_config":
        (root / "text_encoder" / "config.json").unlink()
        return "text_encoder/config.json: missing file"
    if what == "corrupt_unet_config":
        (root / "unet" / "config.json").write_text("{not json")
        return "unet: could not load the UNet"
    raise AssertionError(what)


@pytest.mark.parametrize(
    "what",
    [
        "unet_weights",
        "vae_folder",
        "scheduler_config",
        "tokenizer",
        "text_encoder_config",
        "corrupt_unet_config",
    ],
)
def test_pretrained_missing_files_are_named(sd_layout, tmp_path, what):
    root = tmp_path / "m"
    shutil.copytree(sd_layout, root)
    fragment = _break(root, what)
    with pytest.raises(PolicyLoadError) as err:
        load_pretrained_policy(root, prompt=PROMPT)
    assert str(root) in str(err.value) and fragment in str(err.value), str(err.value)


def test_pretrained_mismatched_parts_are_named(sd_layout, tmp_path):
    # A ControlNet built for another UNet (cross_attention_dim 16 vs 32).
    other = tmp_path / "other"
    build_tiny_policy(RES, cross_attention_dim=16).save_pretrained(other)
    with pytest.raises(
        PolicyLoadError, match=r"controlnet cross_attention_dim is 16; expected the UNet's \(32\)"
    ) as err:
        load_pretrained_policy(sd_layout, controlnet_dir=other / "controlnet", prompt=PROMPT)
    assert str(other / "controlnet") in str(err.value)
    # A VAE whose latent has 8 channels under a 4-channel UNet.
    root = tmp_path / "vae8"
    shutil.copytree(sd_layout, root)
    shutil.rmtree(root / "vae")
    build_tiny_policy(RES, latent_channels=8).vae.save_pretrained(root / "vae")
    with pytest.raises(
        PolicyLoadError,
        match=r"unet in/out_channels are 4/4; expected the VAE's latent_channels \(8\)",
    ):
        load_pretrained_policy(root, prompt=PROMPT)
    with pytest.raises(PolicyLoadError, match="controlnet_dir is not a folder"):
        load_pretrained_policy(sd_layout, controlnet_dir=tmp_path / "nope", prompt=PROMPT)


def test_fresh_controlnet_trains_its_zero_convolutions(sd_layout, tmp_path):
    """No controlnet/: ControlNet copied from the UNet. Its zero convolutions would block every
    gradient to LoRA adapters inside it, so they (and the condition embedding) train in full."""
    from diffusers import ControlNetModel
    from peft import PeftModel

    root = tmp_path / "nocn"
    shutil.copytree(sd_layout, root, ignore=shutil.ignore_patterns("controlnet"))
    p = load_pretrained_policy(root, prompt=PROMPT)
    names = set(p.trainable_state_dict())
    assert any("controlnet_mid_block.modules_to_save" in n for n in names)
    assert any("controlnet_cond_embedding.modules_to_save" in n for n in names)
    x, t, c = _inputs()
    p.predict(x, t, c).square().mean().backward()
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in p.trainable_parameters())
    init = _predict(p)
    _perturb_lora(p, scale=0.01)
    assert not torch.allclose(_predict(p), init, atol=1e-6)
    assert torch.equal(_predict(p, reference=True), init)
    # The fully trained parts travel in the peft checkpoint too.
    p.save_trainable(tmp_path / "lora")
    q = load_pretrained_policy(root, prompt=PROMPT)
    q.load_trainable(tmp_path / "lora")
    assert torch.equal(_predict(q), _predict(p))
    base = q.base_controlnet
    with q.reference():
        pass
    assert isinstance(
        PeftModel.from_pretrained(ControlNetModel.from_config(base.config), tmp_path / "lora"),
        PeftModel,
    )


def test_bfloat16_frozen_parts():
    p = build_tiny_policy(RES, dtype="bfloat16")
    assert p.unet.dtype == torch.bfloat16 and p.vae.dtype == torch.bfloat16
    x, t, c = _inputs()
    out = p.predict(x, t, c)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.detach(), _predict(build_tiny_policy(RES)), rtol=0, atol=0.1)
    out.square().mean().backward()
    assert all(q.dtype == torch.float32 for q in p.trainable_parameters())
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in p.trainable_parameters())
