"""Deep InfoMax objectives as pure tensor functions.

Pairs are defined by sample, not by crop: a global vector and a local feature form a positive
pair when their crops come from the same sample (any field), and a negative pair otherwise.
Local positions whose pooled foreground mask is background are left out through ``valid``.

Shapes: ``Mg`` anchors (global vectors), ``Ml`` crops whose local maps are scored, ``P = h * w``
local positions per crop, ``D`` the critic embedding size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ESTIMATORS",
    "JSD_CHANCE",
    "content_loss",
    "dv_loss",
    "global_mi_loss",
    "infonce_loss",
    "jsd_loss",
    "local_mi_loss",
    "pair_scores",
    "positive_pairs",
    "prior_discriminator_loss",
    "prior_generator_loss",
    "prior_weight",
]

# Value of the JSD loss when the critic scores every pair alike (it cannot tell pairs apart).
JSD_CHANCE = 2 * math.log(2)
# Finite stand-in for -inf: masked_fill then gives exactly zero gradient and no NaN when all is masked.
_MASKED = -1e9


def pair_scores(local_emb: Tensor, global_emb: Tensor) -> Tensor:
    """Dot-product scores of every (global, local position) pair, divided by sqrt(D).

    local_emb (Ml, D, h, w) or (Ml, D, P), global_emb (Mg, D) -> (Mg, Ml, P) float32. The scaling
    keeps initial scores near zero whatever D is, so training starts at, not far above, chance.
    """
    local = local_emb.flatten(2).float()
    return torch.einsum("gd,ldp->glp", global_emb.float(), local) / math.sqrt(local.shape[1])


def positive_pairs(global_ids: Tensor, local_ids: Tensor) -> Tensor:
    """(Mg,) and (Ml,) sample ids -> (Mg, Ml) bool, True where both crops come from one sample."""
    return global_ids[:, None] == local_ids[None, :]


def _pair_weights(positive: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """(Mg, Ml) positive, (Ml, P) valid -> (Mg, Ml, P) float weights of positive and negative pairs."""
    valid = valid[None, :, :]
    pos = (positive[:, :, None] & valid).float()
    neg = (~positive[:, :, None] & valid).float()
    return pos, neg


def _masked_mean(values: Tensor, weight: Tensor) -> Tensor:
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def jsd_loss(scores: Tensor, positive: Tensor, valid: Tensor) -> Tensor:
    """Jensen-Shannon MI estimator, as a loss: E_pos[softplus(-s)] + E_neg[softplus(s)].

    scores (Mg, Ml, P), positive (Mg, Ml) bool, valid (Ml, P) bool -> scalar. Equals
    ``JSD_CHANCE`` (2 ln 2) when all scores are zero; lower is better.
    """
    pos, neg = _pair_weights(positive, valid)
    return _masked_mean(F.softplus(-scores), pos) + _masked_mean(F.softplus(scores), neg)


def infonce_loss(scores: Tensor, positive: Tensor, valid: Tensor) -> Tensor:
    """infoNCE: each positive pair classified against all negative pairs of its anchor.

    scores (Mg, Ml, P), positive (Mg, Ml) bool, valid (Ml, P) bool -> scalar; for each valid
    positive (g, l, p): ``-log(e^s / (e^s + sum_neg(g) e^s'))``, averaged.
    """
    pos, neg = _pair_weights(positive, valid)
    negatives = scores.masked_fill(neg == 0, _MASKED).flatten(1).logsumexp(dim=1)  # (Mg,)
    return _masked_mean(F.softplus(negatives[:, None, None] - scores), pos)


def dv_loss(scores: Tensor, positive: Tensor, valid: Tensor) -> Tensor:
    """Donsker-Varadhan bound, as a loss: -(E_pos[s] - log E_neg[e^s]).

    scores (Mg, Ml, P), positive (Mg, Ml) bool, valid (Ml, P) bool -> scalar.
    """
    pos, neg = _pair_weights(positive, valid)
    log_mean_exp = scores.masked_fill(neg == 0, _MASKED).flatten().logsumexp(0) - neg.sum().clamp(min=1).log()
    return log_mean_exp - _masked_mean(scores, pos)


ESTIMATORS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "jsd": jsd_loss,
    "infonce": infonce_loss,
    "dv": dv_loss,
}


def local_mi_loss(
    local_emb: Tensor,
    global_emb: Tensor,
    local_ids: Tensor,
    global_ids: Tensor,
    valid: Tensor,
    estimator: str = "jsd",
) -> Tensor:
    """Local DIM term with sample-level pairs.

    local_emb (Ml, D, h, w), global_emb (Mg, D), local_ids (Ml,), global_ids (Mg,) sample ids,
    valid (Ml, h, w) bool (False = background position, left out) -> scalar.
    """
    scores = pair_scores(local_emb, global_emb)
    return ESTIMATORS[estimator](scores, positive_pairs(global_ids, local_ids), valid.flatten(1))


def global_mi_loss(
    summary_emb: Tensor, global_emb: Tensor, summary_ids: Tensor, global_ids: Tensor, estimator: str = "jsd"
) -> Tensor:
    """Global DIM term: global vectors against crop summaries, sample-level pairs.

    summary_emb (Ms, D), global_emb (Mg, D), summary_ids (Ms,), global_ids (Mg,) -> scalar.
    """
    scores = pair_scores(summary_emb[:, :, None], global_emb)
    valid = torch.ones(scores.shape[1:], dtype=torch.bool, device=scores.device)
    return ESTIMATORS[estimator](scores, positive_pairs(global_ids, summary_ids), valid)


def content_loss(predicted: Tensor, content: Tensor) -> Tensor:
    """Huber loss of (M, K) predicted against (M, K) measured crop content (``crop_content``).

    The targets are in standardised log-intensity units; Huber keeps the rare very bright crops
    (mitoses in pH3) from dominating.
    """
    return F.smooth_l1_loss(predicted.float(), content.float())


def prior_generator_loss(fake_logits: Tensor) -> Tensor:
    """Encoder side of prior matching: (N,) discriminator logits of sigmoid(global) -> scalar.

    Non-saturating form ``-log D(fake)``: the encoder is rewarded when its codes pass as prior samples.
    """
    return F.softplus(-fake_logits.float()).mean()


def prior_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator side: (N,) logits of prior samples and (M,) of (detached) codes -> scalar BCE."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def prior_weight(gamma: float, step: int, ramp_steps: int) -> float:
    """gamma ramped linearly from 0 over the first ``ramp_steps`` steps (the prior otherwise swamps
    the MI terms before they start to learn)."""
    if ramp_steps <= 0:
        return gamma
    return gamma * min(1.0, step / ramp_steps)
