"""DIM losses: finite, chance values, right sign, masked positions inert, decrease under optimisation."""

from __future__ import annotations

import math

import pytest
import torch

from cellmi.losses import (
    ESTIMATORS,
    JSD_CHANCE,
    global_mi_loss,
    local_mi_loss,
    pair_scores,
    positive_pairs,
    prior_discriminator_loss,
    prior_generator_loss,
    prior_weight,
)

torch.set_num_threads(1)
NAMES = sorted(ESTIMATORS)


def matched_embeddings(samples: int = 4, fields: int = 2, dim: int = 16, positions: int = 9, seed: int = 0):
    """Local and global embeddings where every crop of sample b points along one direction e_b."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(samples, dim, generator=gen), dim=1) * 6
    ids = torch.arange(samples).repeat_interleave(fields)
    global_emb = directions[ids] + 0.1 * torch.randn(len(ids), dim, generator=gen)
    local = directions[ids][:, :, None] + 0.1 * torch.randn(len(ids), dim, positions, generator=gen)
    return local.view(len(ids), dim, 3, 3), global_emb, ids


def test_zero_scores_give_the_chance_values():
    scores = torch.zeros(4, 4, 9)
    positive = positive_pairs(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    valid = torch.ones(4, 9, dtype=torch.bool)
    assert ESTIMATORS["jsd"](scores, positive, valid).item() == pytest.approx(JSD_CHANCE)
    # each positive competes with the 2 crops x 9 positions of the other sample
    assert ESTIMATORS["infonce"](scores, positive, valid).item() == pytest.approx(math.log(1 + 18))
    assert ESTIMATORS["dv"](scores, positive, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_pair_scores_shape_and_sample_level_positives():
    local, global_emb, ids = matched_embeddings()
    scores = pair_scores(local, global_emb)
    assert scores.shape == (8, 8, 9)
    positive = positive_pairs(ids, ids)
    # fields 0 and 1 of sample 0 pair positively across fields, not with sample 1
    assert positive[0, 1] and positive[1, 0] and not positive[0, 2]
    assert scores[positive].mean() > scores[~positive].mean()


@pytest.mark.parametrize("name", NAMES)
def test_matched_pairs_score_better_than_shuffled(name):
    local, global_emb, ids = matched_embeddings()
    valid = torch.ones(8, 3, 3, dtype=torch.bool)
    matched = local_mi_loss(local, global_emb, ids, ids, valid, name)
    shuffled_ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))]
    shuffled = local_mi_loss(local, global_emb, shuffled_ids, ids, valid, name)
    assert torch.isfinite(matched) and torch.isfinite(shuffled)
    assert matched < shuffled - 0.5


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_get_exactly_zero_gradient(name):
    local, global_emb, ids = matched_embeddings()
    local = local.clone().requires_grad_(True)
    valid = torch.ones(8, 3, 3, dtype=torch.bool)
    valid[:, 0, :] = False  # top row of every crop is background
    valid[5] = False  # one crop entirely background
    local_mi_loss(local, global_emb, ids, ids, valid, name).backward()
    grad = local.grad.abs().sum(dim=1)  # (M, h, w)
    assert torch.all(grad[~valid] == 0)
    assert torch.all(grad[valid] > 0)


@pytest.mark.parametrize("name", NAMES)
def test_masked_positions_do_not_change_the_value(name):
    local, global_emb, ids = matched_embeddings()
    valid = torch.ones(8, 3, 3, dtype=torch.bool)
    valid[:, :, 2] = False
    before = local_mi_loss(local, global_emb, ids, ids, valid, name)
    garbage = local.clone()
    garbage[:, :, :, 2] = 1e3 * torch.randn_like(garbage[:, :, :, 2])
    after = local_mi_loss(garbage, global_emb, ids, ids, valid, name)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_all_background_is_finite(name):
    local, global_emb, ids = matched_embeddings()
    local = local.clone().requires_grad_(True)
    loss = local_mi_loss(local, global_emb, ids, ids, torch.zeros(8, 3, 3, dtype=torch.bool), name)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(local.grad == 0)


@pytest.mark.parametrize("name", NAMES)
def test_loss_decreases_under_a_few_steps(name):
    gen = torch.Generator().manual_seed(0)
    local = torch.randn(8, 8, 3, 3, generator=gen, requires_grad=True)
    global_emb = torch.randn(8, 8, generator=gen, requires_grad=True)
    ids = torch.arange(4).repeat_interleave(2)
    valid = torch.ones(8, 3, 3, dtype=torch.bool)
    optim = torch.optim.Adam([local, global_emb], lr=0.05)
    losses = []
    for _ in range(30):
        loss = local_mi_loss(local, global_emb, ids, ids, valid, name)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2


@pytest.mark.parametrize("name", NAMES)
def test_global_term_prefers_same_sample_summaries(name):
    _, global_emb, ids = matched_embeddings()
    summary = global_emb + 0.1
    matched = global_mi_loss(summary, global_emb, ids, ids, name)
    shuffled = global_mi_loss(summary, global_emb, ids.flip(0).roll(1), ids, name)
    assert torch.isfinite(matched) and matched < shuffled


def test_prior_losses_have_the_right_sign_and_train():
    confident = prior_generator_loss(torch.full((16,), 5.0))
    caught = prior_generator_loss(torch.full((16,), -5.0))
    assert confident < 0.01 < 4.0 < caught
    assert prior_discriminator_loss(torch.full((4,), 5.0), torch.full((4,), -5.0)) < 0.02
    # a linear discriminator learns to tell uniform samples from codes squeezed near 0.5
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    disc = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optim = torch.optim.Adam(disc.parameters(), lr=2e-2)
    losses = []
    for _ in range(150):
        real = torch.rand(64, 4, generator=gen)
        fake = 0.5 + 0.02 * torch.randn(64, 4, generator=gen)
        loss = prior_discriminator_loss(disc(real).squeeze(1), disc(fake).squeeze(1))
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[0] > 1.0 and sum(losses[-10:]) / 10 < 0.7 * losses[0]


def test_prior_weight_ramps_in():
    assert prior_weight(0.1, 0, 300) == 0.0
    assert prior_weight(0.1, 150, 300) == pytest.approx(0.05)
    assert prior_weight(0.1, 900, 300) == pytest.approx(0.1)
    assert prior_weight(0.1, 0, 0) == pytest.approx(0.1)
