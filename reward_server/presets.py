"""Scorer presets: how to ask a VLM family for a quality score and how to read its answer.

A preset is everything model-specific about IQA scoring (DESIGN.md §3):

* the conversation format and question (with the family's image placeholder),
* ``mode="levels"`` (Q-Align / DeQA / Q-SiT style): the answer is started for the model
  ("The quality of the image is") and the next-token distribution over five level words
  (excellent, good, fair, poor, bad) is turned into a score by :func:`reward_server.scoring.
  expected_score` with weights 5..1 on the native range 1..5;
* ``mode="text_number"`` (VisualQuality-R1 style): the model writes its answer, which must contain
  a number in the native range (:func:`reward_server.scoring.parse_number_answer`);
* image preprocessing the family was trained with (Q-Align pads to a square with the image
  processor's mean colour before the processor resizes).

The conversation formats are written out here rather than taken from a checkpoint's chat
template so that a prompt never changes silently with a tokenizer file; they match the formats
each family's reference scoring code uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from common.types import LEVEL_NAMES

__all__ = ["PRESETS", "PresetError", "ScorerPreset", "expand2square", "get_preset"]


class PresetError(ValueError):
    """A preset that does not fit a model (e.g. a level word that is not one token)."""


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad to a square, image centred, with ``background`` (Q-Align/LLaVA-1.5 ``expand2square``).

    LLaVA-1.5 and Q-Align pad with the image processor's mean colour (``image_mean`` × 255), so
    the padding is ~0 after normalisation; the processor's centre crop would otherwise cut off
    the borders of a non-square image, and IQA must see all of it.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


@dataclass(frozen=True)
class ScorerPreset:
    """Prompt, answer reading and preprocessing of one VLM family.

    Attributes:
        name: key in :data:`PRESETS` (the config's ``reward.preset``).
        family: the models it is for, in words.
        template: the whole prompt, with ``{image}`` (replaced by ``image_placeholder``),
            ``{question}`` and ``{answer_prefix}``; the model continues right after it.
        image_placeholder: the text vLLM and the HF processor expand into image tokens.
        question: the user's question.
        answer_prefix: the start of the assistant's answer (levels mode), e.g. "The quality of
            the image is"; empty in text_number mode.
        mode: ``levels`` (expected score over level tokens) or ``text_number`` (parse a number).
        level_words: the five level words, best first (order of ``common.types.LEVEL_NAMES``).
        level_token_prefix: prepended to each level word before tokenising it alone: ``""`` for
            SentencePiece tokenizers (Llama: "excellent" -> "▁excellent") and for prompts that end
            in a space (Q-SiT); ``" "`` for byte-level BPE (Qwen: " excellent" -> "Ġexcellent").
        level_weights: native score of each level (Q-Align: 5, 4, 3, 2, 1).
        native_range: (lo, hi) of the native score; scores are reported as (s - lo) / (hi - lo).
        pad_to_square: apply :func:`expand2square` with the processor's mean colour first.
        max_new_tokens: tokens generated (1 for levels; room for reasoning for text_number).
        system: system prompt, for families whose format has one (documentation only: it is
            already part of ``template``).
    """

    name: str
    family: str
    template: str
    image_placeholder: str
    question: str
    answer_prefix: str = ""
    mode: Literal["levels", "text_number"] = "levels"
    level_words: tuple[str, ...] = LEVEL_NAMES
    level_token_prefix: str = ""
    level_weights: tuple[float, ...] = (5.0, 4.0, 3.0, 2.0, 1.0)
    native_range: tuple[float, float] = (1.0, 5.0)
    pad_to_square: bool = False
    max_new_tokens: int = 1
    system: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f"preset {self.name!r}"
        if self.mode not in ("levels", "text_number"):
            raise PresetError(f"{where}: mode must be 'levels' or 'text_number', got {self.mode!r}")
        for key in ("{image}", "{question}", "{answer_prefix}"):
            if key not in self.template:
                raise PresetError(f"{where}: template lacks {key}")
        lo, hi = self.native_range
        if not lo < hi:
            raise PresetError(
                f"{where}: native_range must be (lo, hi) with lo < hi, got {self.native_range}"
            )
        if len(self.level_words) != len(LEVEL_NAMES) or len(self.level_weights) != len(LEVEL_NAMES):
            raise PresetError(
                f"{where}: expected {len(LEVEL_NAMES)} level words and weights ({', '.join(LEVEL_NAMES)}), "
                f"got {len(self.level_words)} words and {len(self.level_weights)} weights"
            )
        if any(not lo <= w <= hi for w in self.level_weights):
            raise PresetError(
                f"{where}: level_weights {self.level_weights} must lie in native_range {self.native_range}"
            )
        if self.max_new_tokens < 1:
            raise PresetError(f"{where}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    # -- prompt --------------------------------------------------------------------------------
    def build_prompt(self) -> str:
        """The prompt text (one image placeholder); the model's next token is the answer."""
        return self.template.format(
            image=self.image_placeholder, question=self.question, answer_prefix=self.answer_prefix
        )

    # -- level tokens --------------------------------------------------------------------------
    def level_token_ids(self, tokenizer: Any) -> list[int]:
        """Token id of each level word (best first), each required to be exactly one token.

        ``tokenizer`` is any Hugging Face tokenizer (``encode(text, add_special_tokens=False)``).
        Raises :class:`PresetError` naming the word and its pieces when a word is several tokens,
        unknown, or when two words share an id — the level distribution would be meaningless.
        """
        if self.mode != "levels":
            raise PresetError(f"preset {self.name!r}: mode {self.mode!r} has no level tokens")
        unk = getattr(tokenizer, "unk_token_id", None)
        ids: list[int] = []
        for word in self.level_words:
            text = self.level_token_prefix + word
            pieces = tokenizer.encode(text, add_special_tokens=False)
            if len(pieces) != 1 or (unk is not None and pieces[0] == unk):
                shown = (
                    tokenizer.convert_ids_to_tokens(pieces)
                    if hasattr(tokenizer, "convert_ids_to_tokens")
                    else pieces
                )
                raise PresetError(
                    f"preset {self.name!r}: level word {text!r} must be exactly one known token in this "
                    f"tokenizer, got {len(pieces)} token(s) {shown}; this preset does not fit the model "
                    f"(check level_words / level_token_prefix)"
                )
            ids.append(int(pieces[0]))
        if len(set(ids)) != len(ids):
            raise PresetError(
                f"preset {self.name!r}: level words {self.level_words} share token ids {ids}"
            )
        return ids

    # -- images --------------------------------------------------------------------------------
    def preprocess(
        self, image: np.ndarray, background: tuple[int, int, int] | None = None
    ) -> Image.Image:
        """uint8 [H, W, 3] RGB -> the PIL image handed to the model's processor (vLLM and HF alike).

        ``background``: the pad colour for ``pad_to_square`` presets (the processor's
        ``image_mean`` × 255, rounded down as Q-Align does).
        """
        pil = Image.fromarray(image, mode="RGB") if image.ndim == 3 else Image.fromarray(image)
        if self.pad_to_square:
            if background is None:
                raise PresetError(
                    f"preset {self.name!r}: pad_to_square needs the processor's mean colour"
                )
            pil = expand2square(pil, background)
        return pil


# ------------------------------------------------------------------------------------ presets
_IQA_QUESTION = "How would you rate the quality of this image?"

_QWEN_SYSTEM = "You are a helpful assistant."
# Qwen2-VL / Qwen2.5-VL chat format (their chat template with the default system prompt).
_QWEN_VL_TEMPLATE = (
    "<|im_start|>system\n" + _QWEN_SYSTEM + "<|im_end|>\n"
    "<|im_start|>user\n{image}{question}<|im_end|>\n"
    "<|im_start|>assistant\n{answer_prefix}"
)

PRESETS: dict[str, ScorerPreset] = {
    p.name: p
    for p in (
        # LLaVA-1.5 conversation, Q-Align's answer and level reading (Q-Align/DeQA-Score use the
        # same words, weights and padding on mPLUG-Owl2, which vLLM does not serve).
        ScorerPreset(
            name="llava",
            family="LLaVA-1.5 style (Llama/Vicuna tokenizer), Q-Align/DeQA level scoring",
            template="USER: {image}\n{question} ASSISTANT: {answer_prefix}",
            image_placeholder="<image>",
            question=_IQA_QUESTION,
            answer_prefix="The quality of the image is",
            level_token_prefix="",
            pad_to_square=True,
        ),
        # Q-SiT (LLaVA-OneVision, Qwen2 LM): its eval script's question, capitalised levels and
        # an answer prefix that ends in a space, so the level tokens are the bare words.
        ScorerPreset(
            name="llava_onevision",
            family="LLaVA-OneVision (Qwen2 LM), Q-SiT",
            template="<|im_start|>user\n{image}\n{question}<|im_end|>\n<|im_start|>assistant\n{answer_prefix}",
            image_placeholder="<image>",
            question=(
                "Assume you are an image quality evaluator. \nYour rating should be chosen from the "
                "following five categories: Excellent, Good, Fair, Poor, and Bad (from high to low). "
                "\nHow would you rate the quality of this image?"
            ),
            answer_prefix="The quality of this image is ",
            level_words=("Excellent", "Good", "Fair", "Poor", "Bad"),
            level_token_prefix="",
        ),
        # Qwen2-VL / Qwen2.5-VL fine-tuned for Q-Align-style level scoring.
        ScorerPreset(
            name="qwen2_vl",
            family="Qwen2-VL / Qwen2.5-VL, Q-Align-style level scoring",
            template=_QWEN_VL_TEMPLATE,
            image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
            question=_IQA_QUESTION,
            answer_prefix="The quality of this image is",
            level_token_prefix=" ",
            system=_QWEN_SYSTEM,
        ),
        # Q-ReAlign (Qwen3.5-VL, model_type qwen3_5), as its scorer (Q-Future/Q-ReAlign,
        # qalign/scorer.py) builds the prompt: the user turn "<image>" + one of Q-Align's IQA
        # questions, Qwen3.5's chat format with thinking off (configs: template qwen3_5,
        # enable_thinking false: the empty <think></think> block), then the tokens of
        # " " + "The quality of the image is" appended; levels excellent..bad, weights
        # [1, .75, .5, .25, 0] on [0, 1] (= 5..1 on 1..5), softmax over the five level logits.
        ScorerPreset(
            name="qwen3_5",
            family="Qwen3.5-VL, Q-ReAlign level scoring",
            template=(
                "<|im_start|>user\n{image}{question}<|im_end|>\n"
                "<|im_start|>assistant\n<think>\n\n</think>\n\n{answer_prefix}"
            ),
            image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
            question=_IQA_QUESTION,
            answer_prefix=" The quality of the image is",
            level_token_prefix=" ",
        ),
        # VisualQuality-R1 / Q-Insight (Qwen2.5-VL): reasons in <think>, answers a number 1..5 in
        # <answer>; the prompt is VisualQuality-R1's.
        ScorerPreset(
            name="text_number",
            family="Qwen2.5-VL reasoning IQA (VisualQuality-R1, Q-Insight): a number in <answer>",
            template=_QWEN_VL_TEMPLATE,
            image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
            question=(
                "You are doing the image quality assessment task. Here is the question: What is your "
                "overall rating on the quality of this picture? The rating should be a float between 1 "
                "and 5, rounded to two decimal places, with 1 representing very poor quality and 5 "
                "representing excellent quality. First output the thinking process in <think> </think> "
                "tags and then output the final answer with only one score in <answer> </answer> tags."
            ),
            answer_prefix="",
            mode="text_number",
            max_new_tokens=512,
            system=_QWEN_SYSTEM,
        ),
    )
}


def get_preset(preset: str | ScorerPreset) -> ScorerPreset:
    """A preset by name (or the preset itself); unknown names list the known ones."""
    if isinstance(preset, ScorerPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise PresetError(
            f"unknown scorer preset {preset!r}; expected one of {sorted(PRESETS)}"
        ) from None
