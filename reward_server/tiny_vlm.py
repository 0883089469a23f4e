"""A tiny seeded LLaVA-style VLM saved to a folder that both vLLM and transformers load.

Tests and the CPU demo cannot download an IQA model, so they score with this one: same
architecture family as LLaVA-1.5 (CLIP vision tower -> 2-layer MLP projector -> Llama), random
seeded weights, a BPE tokenizer trained on the spot over the scoring prompts. Its scores mean
nothing about image quality; they exercise exactly the code path a real checkpoint takes.

    path = build_tiny_llava("/tmp/tiny-llava", seed=0)   # cached: a second call reuses the folder

Sizes: CLIP vision 2 layers, hidden 64, 64x64 px images with 8 px patches (64 image tokens, CLS
dropped); Llama 2 layers, hidden 128, 4 heads; a ~500-token vocabulary in which every prompt word
and the level words of every preset ("excellent" ... "bad", "Excellent" ... "Bad") are single
tokens, plus the special tokens ``<s> </s> <unk> <pad> <image>``.

Weight layout: transformers 5 saves the vision tower as ``vision_tower.*``; vLLM's LLaVA loader
expects the hub layout of llava-hf checkpoints, ``vision_tower.vision_model.*`` (its
``hf_to_vllm_mapper`` does not add ``vision_model.``). The file is rewritten in the hub layout,
which transformers also loads (its conversion mapping for ``llava`` handles both).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TINY_LLAVA_CHAT_TEMPLATE", "TINY_VLM_STAMP", "build_tiny_llava", "publish_stamped"]

#: Written last into a finished folder; its contents decide whether a folder can be reused.
TINY_VLM_STAMP = "restore_rl_tiny_vlm.json"
# Bump when the architecture, the initialisation or the tokenizer corpus changes: stale cached
# folders are then rebuilt instead of silently reused.
_BUILDER_VERSION = 1

#: Shapes of the tiny VLM. ``test``: the random model of the scorer's unit tests (only one CLIP
#: layer feeds the projector: vision_feature_layer -2 of 2). ``iqa``: the base the IQA reward is
#: trained from (:mod:`reward_server.iqa_train`): the same sizes, but the last CLIP layer feeds the
#: projector, so both vision layers learn. (A 4-layer, 128-wide tower was 1.5× slower per step and
#: did not rate held-out photos better in the 5-minute CPU budget.)
SIZES: dict[str, dict[str, int]] = {
    "test": {"vision_hidden": 64, "vision_layers": 2, "vision_feature_layer": -2, "text_hidden": 128, "text_layers": 2},
    "iqa": {"vision_hidden": 64, "vision_layers": 2, "vision_feature_layer": -1, "text_hidden": 128, "text_layers": 2},
}

IMAGE_SIZE = 64  # px (square); the CLIP processor resizes + center-crops to this
PATCH_SIZE = 8  # px -> (64 / 8)^2 = 64 image tokens per image
VOCAB_TARGET = 512  # BPE stops merging earlier when the corpus runs out of pairs
MAX_POSITIONS = 512  # tokens

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

#: LLaVA-1.5 conversation format (the llava-hf chat template, without the system line).
#: Rendered with add_generation_prompt it gives "USER: <image>\n{text} ASSISTANT:".
TINY_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


#: The presets whose prompts the tokenizers are trained on. Fixed, so that adding a preset that
#: reuses these words (``qwen3_5``) does not change the BPE merges of every tiny model; a preset
#: with new words goes here, with ``_BUILDER_VERSION`` bumped.
_CORPUS_PRESETS = ("llava", "llava_onevision", "qwen2_vl", "text_number")


def _corpus() -> list[str]:
    """Text the BPE tokenizer is trained on: every preset's prompt and answer, and sentences with
    each level word, repeated so that each word merges into one token."""
    # Imported here: presets imports nothing heavy, but keep this module importable on its own.
    from reward_server.presets import PRESETS

    lines: list[str] = []
    for preset in (PRESETS[name] for name in _CORPUS_PRESETS):
        lines.append(preset.question)
        lines.append(preset.answer_prefix)
        for word in preset.level_words:
            lines.append(f"{preset.answer_prefix.rstrip()} {word}.")
            lines.append(f"{word} {word.lower()} {word.capitalize()}")
    lines += [
        "USER: ASSISTANT: the image photo picture quality rating score is very high low sharp blurry",
        "noise noisy dark bright clear detail details color colour contrast",
        "0 1 2 3 4 5 6 7 8 9 0.5 1.5 2.5 3.5 4.5 . , : ? ! <think> </think> <answer> </answer>",
    ]
    return lines * 20


def _train_tokenizer():
    """A Llama-like BPE tokenizer: Metaspace pre-tokenizer ("▁word"), BOS prepended."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # prepend_scheme="first": like SentencePiece, "excellent" encodes as "▁excellent" on its own.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        # Every printable character is in the vocabulary, so any text encodes without <unk>.
        initial_alphabet=sorted(set(string.printable) | {"▁"}),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=TINY_LLAVA_CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def _init_weights(model, seed: int) -> None:
    """Seeded, variance-preserving random weights (not transformers' std-0.02 init).

    With std 0.02 everywhere the residual stream barely depends on the image and the level
    probabilities are ~uniform for every input (every score ~0.5): a cross-engine equivalence
    test would then pass trivially. Here every matrix has std 1/sqrt(fan_in), so each layer keeps
    activations O(1), the 64 image tokens dominate the prompt, and the level logits differ by O(1).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # Linear [out, in], Conv2d [out, in, k, k], Embedding [V, D]
                fan_in = p[0].numel()
                std = 1.0 / fan_in**0.5
                if name.endswith("lm_head.weight"):
                    std *= 3.0  # sharper level distributions: scores spread over [0, 1]
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("class_embedding"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:  # biases
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _rewrite_hub_layout(weights_file: Path) -> None:
    """Rename ``vision_tower.X`` -> ``vision_tower.vision_model.X`` (see module docstring)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights_file))
    renamed = {}
    for key, value in state.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower.") :]
        renamed[key] = value
    save_file(renamed, str(weights_file), metadata={"format": "pt"})


def _is_complete(folder: Path, seed: int, size: str = "test") -> bool:
    stamp = folder / TINY_VLM_STAMP
    if not stamp.is_file():
        return False
    try:
        meta = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        meta.get("builder_version") == _BUILDER_VERSION
        and meta.get("seed") == seed
        and meta.get("size", "test") == size
        and all((folder / f).is_file() for f in meta.get("files", []))
    )


def build_tiny_llava(out_dir: str | os.PathLike, seed: int = 0, size: str = "test") -> Path:
    """Build (or reuse) the tiny seeded LLaVA in ``out_dir``; returns the folder.

    ``size``: a key of :data:`SIZES` (``test``: the scorer tests' random model; ``iqa``: the base
    of the trained IQA reward).

    Reuse: a folder holding this builder's stamp with the same seed and builder version, and all
    the files the stamp lists, is returned as is. A folder with a stamp that does not match is
    rebuilt; an existing non-empty folder without a stamp is never overwritten (error).
    """
    if size not in SIZES:
        raise ValueError(f"size: got {size!r}; expected one of {sorted(SIZES)}")
    out = Path(out_dir)
    if _is_complete(out, seed, size):
        return out
    # Several processes (Serve replicas, test workers) may build the same folder at once: one
    # builds, the others wait on the lock and then reuse its result.
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(out, seed, size):
            return out
        if out.exists() and any(out.iterdir()) and not (out / TINY_VLM_STAMP).exists():
            raise FileExistsError(
                f"build_tiny_llava: {out} exists, is not empty and is not a tiny-VLM folder "
                f"(no {TINY_VLM_STAMP}); refusing to overwrite it"
            )
        _build(out, seed, size)
    return out


def _build(out: Path, seed: int, size: str = "test") -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _train_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    shape = SIZES[size]
    vision = CLIPVisionConfig(
        hidden_size=shape["vision_hidden"],
        intermediate_size=2 * shape["vision_hidden"],
        num_hidden_layers=shape["vision_layers"],
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    text = LlamaConfig(
        hidden_size=shape["text_hidden"],
        intermediate_size=2 * shape["text_hidden"],
        num_hidden_layers=shape["text_layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    num_image_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped ("default" strategy)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens,
        vision_feature_layer=shape["vision_feature_layer"],
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)  # the constructor's own init draws from the global RNG
    model = LlavaForConditionalGeneration(config).eval()
    _init_weights(model, seed)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=TINY_LLAVA_CHAT_TEMPLATE,
    )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _rewrite_hub_layout(tmp / "model.safetensors")

    publish_stamped(out, write, {"builder": "reward_server.tiny_vlm.build_tiny_llava",
                                 "builder_version": _BUILDER_VERSION, "seed": seed, "size": size})


def publish_stamped(out: Path, write: Callable[[Path], None], meta: dict[str, Any]) -> None:
    """Write a model folder with ``write(tmp)`` beside ``out``, stamp it (``meta`` + its file
    list in :data:`TINY_VLM_STAMP`), make it readable by others, then move it into place: an
    interrupted build never looks complete. The caller holds the folder's lock."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        (tmp / TINY_VLM_STAMP).write_text(json.dumps({**meta, "files": files}, indent=2) + "\n")
        # mkdtemp and safetensors create owner-only entries; a shared cache must be readable.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in files + [TINY_VLM_STAMP]:
            os.chmod(tmp / f, 0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
