"""Which loss terms each ``algorithm.mode`` switches on, and the paper's Table 6 rows as configs.

The learner's loss (DESIGN.md §2.6, paper §4.2.4 eq. 10):

    L = (1/m) Σ_i [ a_i·L_diff,i + b_i·L_rl,i ] + β_KL·L_KL

A mode fixes the per-sample SFT weight a_i and RL weight b_i as functions of the difficulty
weight w_i (§2.5), and whether the KL term is on:

=============  =================  ============  =====  ========================================
mode           a_i (SFT)          b_i (RL)      KL     paper
=============  =================  ============  =====  ========================================
adaptive       1 − w_i            w_i           on     "Original"
no_weights     1                  1             on     "w/o w_i" (Table 6)
sft_only       w_i                —             off    "+Diff.SFT" (Tables 1–6)
rl_only        —                  1             on     (not in the paper: RL + KL alone)
sft            1                  —             off    plain SFT pre-training, no rollout
=============  =================  ============  =====  ========================================

``sft_only`` implements DESIGN.md §2.5 literally: Σ w_i·L_diff — the hard samples get the SFT
weight (the paper's "fine-tuning specifically on hard samples using the proposed weighting"). Note
that this is the *opposite* weighting to the SFT half of ``adaptive`` (1 − w_i). Its KL is off: the
KL stabilises RL, and "+Diff.SFT" is a supervised baseline. It still needs a rollout (w_i needs
the model's restored output y_i) but no reward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

__all__ = [
    "MODES",
    "TABLE6_NOT_CONFIGURABLE",
    "TABLE6_ROWS",
    "LossTerms",
    "Mode",
    "WeightFn",
    "loss_terms",
    "table6_overrides",
]

Mode = Literal["adaptive", "no_weights", "sft_only", "rl_only", "sft"]
MODES: tuple[str, ...] = ("adaptive", "no_weights", "sft_only", "rl_only", "sft")

#: Per-sample loss weight from the difficulty weights: w [B] → weight [B].
WeightFn = Callable[[torch.Tensor], torch.Tensor]


# Named (not lambdas) so that a LossTerms prints readably in logs and test failures.
def difficulty(w: torch.Tensor) -> torch.Tensor:
    """b_i = w_i: hard samples (far from the ground truth) lean on RL (paper eq. 10)."""
    return w


def one_minus_difficulty(w: torch.Tensor) -> torch.Tensor:
    """a_i = 1 − w_i: easy samples lean on SFT (paper eq. 10)."""
    return 1.0 - w


def uniform(w: torch.Tensor) -> torch.Tensor:
    """Weight 1 for every sample; the values of w are not used."""
    return torch.ones_like(w)


class LossTerms(NamedTuple):
    """The terms of the loss that one mode switches on.

    Attributes:
        rl_weight_fn: w [B] → b [B], the per-sample weight of L_rl; None: no RL term.
        sft_weight_fn: w [B] → a [B], the per-sample weight of L_diff; None: no SFT term.
        use_kl: the β_KL·L_KL term is on.
        needs_rollout: the mode samples trajectories (False only for plain ``sft``).
        needs_weights: the weight functions read w, so the learner must compute the difficulty
            weights (§2.5) from the rollout's final images.
    """

    rl_weight_fn: WeightFn | None
    sft_weight_fn: WeightFn | None
    use_kl: bool
    needs_rollout: bool
    needs_weights: bool

    @property
    def uses_rl(self) -> bool:
        """An RL term is on (matches ``AlgorithmConfig.uses_rl``)."""
        return self.rl_weight_fn is not None

    @property
    def uses_sft(self) -> bool:
        return self.sft_weight_fn is not None

    @property
    def needs_reward(self) -> bool:
        """Only the RL term reads rewards: ``sft_only`` rolls out but never calls the scorer."""
        return self.uses_rl


_TERMS: dict[str, LossTerms] = {
    "adaptive": LossTerms(difficulty, one_minus_difficulty, True, True, True),
    "no_weights": LossTerms(uniform, uniform, True, True, False),
    "sft_only": LossTerms(None, difficulty, False, True, True),
    "rl_only": LossTerms(uniform, None, True, True, False),
    "sft": LossTerms(None, uniform, False, False, False),
}


def loss_terms(mode: str) -> LossTerms:
    """The :class:`LossTerms` of ``algorithm.mode``; a ValueError names the valid modes."""
    try:
        return _TERMS[mode]
    except KeyError:
        raise ValueError(f"algorithm.mode: expected one of {MODES}, got {mode!r}") from None


# ----------------------------------------------------------------------------- Table 6 rows
#: The algorithm settings of the paper's "Original" (its full method, §4.2). Spelled out rather
#: than left to the config defaults, so a row still means the paper's row if a default changes.
_ORIGINAL: dict[str, str] = {
    "algorithm.mode": "adaptive",
    "algorithm.reward": "iqa",
    "algorithm.reward_steps": "all",
    "algorithm.policy_target": "enhanced",
    "algorithm.advantage_norm": "track+batch",
}

#: Paper Table 6 (§6.2) row name → ``--set`` overrides (dotted config keys → values) that
#: reproduce it. Each ablation row is "Original" with exactly one setting changed.
#: ``"Base"`` is the starting checkpoint, evaluated without training: None.
TABLE6_ROWS: dict[str, dict[str, str] | None] = {
    "Base": None,
    "Base +Diff.SFT": {**_ORIGINAL, "algorithm.mode": "sft_only"},  # §6.1: difficulty-aware SFT
    "with Rec.": {**_ORIGINAL, "algorithm.reward": "reconstruction"},  # §6.2.1
    "w/o w_i": {**_ORIGINAL, "algorithm.mode": "no_weights"},  # §6.2.2
    "with x_{t-1}": {**_ORIGINAL, "algorithm.policy_target": "standard"},  # §6.2.3
    "Reward x0": {**_ORIGINAL, "algorithm.reward_steps": "last"},  # §6.2.4
    "Norm. from track": {**_ORIGINAL, "algorithm.advantage_norm": "track"},  # §6.2.5
    "Original": dict(_ORIGINAL),
    # §6.2.7: the IQA model is fine-tuned on the policy's outputs every 10 iterations and the
    # reward app rolled over to it (needs reward.model_kind=trained; see reward.iqa_train).
    "with Iter. RL": {**_ORIGINAL, "reward.iqa_train.refresh_every": "10"},
}

#: Table 6 rows that are not an ``algorithm`` setting, and why.
TABLE6_NOT_CONFIGURABLE: dict[str, str] = {
    "with Q-align": "a different IQA model: point reward.model_path (and reward.preset) at it "
    "(§6.2.6)",
    "with CLIP-IQA": "a different IQA model: reward.backend=pyiqa, reward.pyiqa_metric=clipiqa "
    "(§6.2.6)",
}


def table6_overrides(row: str) -> list[str]:
    """``["algorithm.mode=no_weights", ...]`` for ``--set`` / ``common.config.apply_overrides``.

    ``"Base"`` gives ``[]`` (nothing to train); unknown rows are a ValueError naming the rows.
    """
    if row not in TABLE6_ROWS:
        hint = TABLE6_NOT_CONFIGURABLE.get(row)
        if hint is not None:
            raise ValueError(f"Table 6 row {row!r} is not an algorithm setting: {hint}")
        raise ValueError(f"Table 6 row: expected one of {list(TABLE6_ROWS)}, got {row!r}")
    overrides = TABLE6_ROWS[row] or {}
    return [f"{key}={value}" for key, value in overrides.items()]
