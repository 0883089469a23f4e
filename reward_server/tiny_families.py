"""Tiny seeded VLMs of the Qwen-family IQA architectures, saved so vLLM and transformers load them.

:mod:`reward_server.tiny_vlm` builds the tiny LLaVA; this module builds one tiny random model per
architecture that real IQA checkpoints use, so each scorer preset is tested on its own family:

* ``qwen2_5_vl`` — ``Qwen2_5_VLForConditionalGeneration`` (VisualQuality-R1, Q-Insight);
* ``llava_onevision`` — ``LlavaOnevisionForConditionalGeneration`` (Q-SiT);
* ``qwen3_5`` — ``Qwen3_5ForConditionalGeneration`` (Q-ReAlign Mini / Lite / Pro).

    path = build_tiny_family("/tmp/tiny-qwen25vl", "qwen2_5_vl", seed=0)  # cached like the LLaVA

Every model: text hidden 64 (2 heads of 32 — vLLM's CPU attention needs a head size of at least
32), 2 layers, a 2-layer vision tower of width 64, 8 px patches and images of at most 64x64 px
(Qwen: one token per 16x16 px after the 2x2 merger; OneVision: 2x2 tiles of 32 px), random
weights with std 1/sqrt(fan_in) (:func:`reward_server.tiny_vlm._init_weights`, so the level
distribution depends on the image), and a byte-level BPE tokenizer like Qwen's
(" excellent" -> "Ġexcellent"), trained on the spot over the presets' prompts so that the level
words are single tokens. Qwen3.5 has three adjustments, each explained where it is made: its
DeltaNet head size is the real 128 (vLLM's CPU kernel takes no other), its ``1 + w`` norms start
at 0, and its DeltaNet decay and attention output are set so that the image reaches the answer.
The scores mean nothing about quality; the code path is a real checkpoint's.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from reward_server.tiny_vlm import TINY_VLM_STAMP, _corpus, _init_weights, publish_stamped

__all__ = ["FAMILIES", "build_tiny_family"]

# Bump when an architecture, the initialisation or the tokenizer corpus changes.
_BUILDER_VERSION = 6

#: family -> the class transformers builds it with (also the ``architectures`` vLLM dispatches on).
FAMILIES: dict[str, str] = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
}

TEXT_HIDDEN = 64
TEXT_HEADS = 2  # head_dim 32
TEXT_LAYERS = 2
VISION_HIDDEN = 64
VISION_LAYERS = 2
PATCH = 8  # px
MERGE = 2  # Qwen's 2x2 patch merger: one image token per 16x16 px
MAX_SIDE = 64  # px; Qwen processors resize so that the pixel count is at most MAX_SIDE**2
VOCAB_TARGET = 1024  # 256 byte symbols + specials + merges
MAX_POSITIONS = 1024

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_ONEVISION_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

#: A minimal Qwen chat template (system line, images as the family's placeholder).
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_tokenizer(specials: list[str], image_token: str, video_token: str, chat_template: str):
    """A Qwen-like byte-level BPE tokenizer (GPT-2 regex pre-split, no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": image_token, "video_token": video_token},
        chat_template=chat_template,
        model_max_length=MAX_POSITIONS,
    )


def _qwen_image_processor(patch: int, mean: list[float], std: list[float]):
    from transformers import Qwen2VLImageProcessor

    factor = patch * MERGE
    return Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=MERGE,
        temporal_patch_size=2,
        min_pixels=factor * factor,  # at least one image token
        max_pixels=MAX_SIDE * MAX_SIDE,
        image_mean=mean,
        image_std=std,
    )


def _build_qwen2_5_vl(seed: int) -> tuple[Any, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
    )

    template = _QWEN_CHAT_TEMPLATE.replace(
        "IMAGE_PLACEHOLDER", "<|vision_start|><|image_pad|><|vision_end|>"
    )
    tok = _train_tokenizer(_QWEN_SPECIALS, "<|image_pad|>", "<|video_pad|>", template)
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": VISION_LAYERS,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_heads": 2,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "window_size": 2 * PATCH * MERGE,  # windows of 2x2 merged tokens
            "fullatt_block_indexes": [VISION_LAYERS - 1],
            "out_hidden_size": TEXT_HIDDEN,
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": 1,
            "max_position_embeddings": MAX_POSITIONS,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],  # sums to head_dim / 2 (t, h, w)
            },
            "bos_token_id": None,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "tie_word_embeddings": False,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = _seeded(Qwen2_5_VLForConditionalGeneration, config, seed)
    clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    processor = Qwen2_5_VLProcessor(
        image_processor=_qwen_image_processor(PATCH, clip_mean, clip_std),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(
            patch_size=PATCH,
            merge_size=MERGE,
            temporal_patch_size=2,
            min_pixels=(PATCH * MERGE) ** 2,
            max_pixels=MAX_SIDE * MAX_SIDE,
        ),
        chat_template=template,
    )
    return model, processor


def _build_llava_onevision(seed: int) -> tuple[Any, Any]:
    """LLaVA-OneVision: SigLIP tower (32 px base image, 8 px patches: 16 tokens a tile), 2-layer
    MLP projector, Qwen2 LM; "anyres" tiling over a 2x2 grid of 32 px tiles, as the real model
    tiles 384 px ones."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    template = _QWEN_CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<image>\n")
    tok = _train_tokenizer(_ONEVISION_SPECIALS, "<image>", "<video>", template)
    ids = tok.convert_tokens_to_ids
    tile = MAX_SIDE // 2
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_hidden_layers": VISION_LAYERS,
            "num_attention_heads": 2,
            "image_size": tile,
            "patch_size": PATCH,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tok),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": 1,
            "max_position_embeddings": MAX_POSITIONS,
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "tie_word_embeddings": False,
        },
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    model = _seeded(LlavaOnevisionForConditionalGeneration, config, seed)
    half = [0.5, 0.5, 0.5]  # SigLIP normalisation
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": tile, "width": tile},
            image_grid_pinpoints=pinpoints,
            image_mean=half,
            image_std=half,
        ),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(
            size={"height": tile, "width": tile}, image_mean=half, image_std=half
        ),
        num_image_tokens=(tile // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=template,
        vision_aspect_ratio="anyres_max_9",
    )
    return model, processor


def _build_qwen3_5(seed: int) -> tuple[Any, Any]:
    """Qwen3.5-VL: a ViT with learned position embeddings and a 2x2 patch merger; the text tower
    alternates a Gated DeltaNet (linear attention) layer and a gated full-attention layer."""
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    template = _QWEN_CHAT_TEMPLATE.replace(
        "IMAGE_PLACEHOLDER", "<|vision_start|><|image_pad|><|vision_end|>"
    )
    tok = _train_tokenizer(_QWEN_SPECIALS, "<|image_pad|>", "<|video_pad|>", template)
    ids = tok.convert_tokens_to_ids
    head_dim = TEXT_HIDDEN // TEXT_HEADS
    config = Qwen3_5Config(
        vision_config={
            "depth": VISION_LAYERS,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_heads": 2,
            "patch_size": PATCH,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "num_position_embeddings": (MAX_SIDE // PATCH) ** 2,
        },
        text_config={
            "vocab_size": len(tok),
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": 2 * TEXT_HIDDEN,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "linear_conv_kernel_dim": 4,
            # vLLM's CPU Gated DeltaNet kernel (chunk_gated_delta_rule_cpu) takes only the real
            # models' head size, 128 ("Unexpected head dim size, 32" otherwise).
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_num_key_heads": 1,
            "linear_num_value_heads": 2,
            "layer_types": ["linear_attention", "full_attention"],
            "max_position_embeddings": MAX_POSITIONS,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,  # rotary dim 16
                "mrope_section": [4, 2, 2],  # sums to rotary dim / 2
                "mrope_interleaved": True,
            },
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
            "tie_word_embeddings": False,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = _seeded(Qwen3_5ForConditionalGeneration, config, seed)
    _zero_offset_norms(model)
    _slow_deltanet_decay(model)
    _louder_gated_attention(model)
    half = [0.5, 0.5, 0.5]
    processor = Qwen3VLProcessor(
        image_processor=_qwen_image_processor(PATCH, half, half),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(
            patch_size=PATCH,
            merge_size=MERGE,
            temporal_patch_size=2,
            size={"shortest_edge": (PATCH * MERGE) ** 2, "longest_edge": MAX_SIDE * MAX_SIDE * 2},
            image_mean=half,
            image_std=half,
        ),
        chat_template=template,
    )
    return model, processor


def _rewrite_siglip_hub_layout(weights_file: Path) -> None:
    """``[model.]vision_tower.X`` -> ``[model.]vision_tower.vision_model.X``: the hub layout of
    llava-hf checkpoints, which vLLM's LLaVA-OneVision loader expects (transformers 5 saves the
    SigLIP tower without ``vision_model.`` and loads both layouts), as for the tiny LLaVA."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights_file))
    renamed = {}
    for key, value in state.items():
        for prefix in ("model.vision_tower.", "vision_tower."):
            if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
                key = prefix + "vision_model." + key[len(prefix) :]
                break
        renamed[key] = value
    save_file(renamed, str(weights_file), metadata={"format": "pt"})


def _zero_offset_norms(model: Any) -> None:
    """Qwen3.5's RMSNorm scales by ``1 + weight`` (Gemma style; its init is zeros): set those
    weights back to 0 after :func:`_init_weights` filled every norm weight with 1, or every layer
    would double the residual stream and the level distribution collapses onto one word."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "Qwen3_5RMSNorm":
                module.weight.zero_()


def _slow_deltanet_decay(model: Any) -> None:
    """Gated DeltaNet decays its state by exp(-exp(A_log) * softplus(.)) a token; with A_log ~ 0
    the state halves every token and the last position forgets the image 30 tokens back (scores
    spread 0.01 over five photos). A_log = -8 keeps the image in the state (spread 0.15)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.fill_(-8.0)


def _louder_gated_attention(model: Any) -> None:
    """Qwen3.5's full attention multiplies its output by sigmoid(gate) ~ 0.5; o_proj x 3 lets the
    one attention layer carry enough of the image that five photos' scores spread 0.17 (0.02
    without), so the cross-engine test compares scores that really differ."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "self_attn.o_proj" in name:
                p.mul_(3.0)


def _seeded(cls: Any, config: Any, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)  # the constructor's own init draws from the global RNG
    model = cls(config).eval()
    _init_weights(model, seed)
    return model


_BUILDERS = {
    "qwen2_5_vl": _build_qwen2_5_vl,
    "llava_onevision": _build_llava_onevision,
    "qwen3_5": _build_qwen3_5,
}


def _is_complete(folder: Path, family: str, seed: int) -> bool:
    stamp = folder / TINY_VLM_STAMP
    try:
        meta = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        meta.get("builder_version") == _BUILDER_VERSION
        and meta.get("family") == family
        and meta.get("seed") == seed
        and all((folder / f).is_file() for f in meta.get("files", []))
    )


def build_tiny_family(out_dir: str | os.PathLike, family: str, seed: int = 0) -> Path:
    """Build (or reuse) the tiny seeded model of ``family`` (a key of :data:`FAMILIES`) in
    ``out_dir``; returns the folder. Reuse and locking as :func:`reward_server.tiny_vlm.
    build_tiny_llava`: a folder with a matching stamp is reused, a foreign non-empty folder is
    never overwritten."""
    if family not in _BUILDERS:
        raise ValueError(f"family: got {family!r}; expected one of {sorted(_BUILDERS)}")
    out = Path(out_dir)
    if _is_complete(out, family, seed):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(out, family, seed):
            return out
        if out.exists() and any(out.iterdir()) and not (out / TINY_VLM_STAMP).exists():
            raise FileExistsError(
                f"build_tiny_family: {out} exists, is not empty and is not a tiny-VLM folder "
                f"(no {TINY_VLM_STAMP}); refusing to overwrite it"
            )
        model, processor = _BUILDERS[family](seed)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            if family == "llava_onevision":
                _rewrite_siglip_hub_layout(tmp / "model.safetensors")

        publish_stamped(out, write, {"builder": "reward_server.tiny_families.build_tiny_family",
                                     "builder_version": _BUILDER_VERSION, "family": family,
                                     "architecture": FAMILIES[family], "seed": seed})
    return out
