"""Encoder geometry: exact shared-map windows, mask pooling on the local grid, intensity kept."""

from __future__ import annotations

import pytest
import torch

from cellmi.model import Encoder, GlobalCritic, LocalCritic, PriorDiscriminator, build_encoder
from cellmi.model.encoder import Readout

torch.set_num_threads(1)


def trained_like(encoder: Encoder) -> Encoder:
    """Non-trivial batch-norm statistics, as after training, then eval mode."""
    with torch.no_grad():
        encoder.head[1].running_mean.uniform_(-1, 1)
        encoder.head[1].running_var.uniform_(0.5, 2)
    return encoder.eval()


@pytest.mark.parametrize(("crop", "stride", "grid"), [(128, 8, 9), (64, 4, 9), (48, 4, 5)])
def test_geometry_of_the_default_and_small_crops(crop, stride, grid):
    encoder = Encoder(3, 8, 32, 16, crop)
    assert encoder.stride == stride and encoder.local_size(crop) == grid
    local, global_ = encoder.eval()(torch.randn(2, 3, crop, crop))
    assert local.shape == (2, 32, grid, grid) and global_.shape == (2, 16)


@pytest.mark.parametrize("crop", [128, 64])
def test_windows_cut_from_the_full_map_equal_windows_encoded_alone(crop):
    torch.manual_seed(0)
    encoder = trained_like(Encoder(3, 8, 32, 16, crop))
    s, m = encoder.stride, encoder.local_size(crop)
    image = torch.randn(1, 3, 256, 256) * 2
    with torch.no_grad():
        full = encoder.local_map(image)
        assert full.shape[-1] == encoder.local_size(256)
        for y, x in [(0, 0), (s, 3 * s), (256 - crop, 256 - crop), (5 * s, 256 - crop)]:
            cut = encoder.global_from_local(full[:, :, y // s : y // s + m, x // s : x // s + m])
            alone = encoder(image[:, :, y : y + crop, x : x + crop])[1]
            torch.testing.assert_close(cut, alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(
                full[:, :, y // s : y // s + m, x // s : x // s + m],
                encoder.local_map(image[:, :, y : y + crop, x : x + crop]),
                rtol=0,
                atol=1e-5,
            )


def test_off_grid_windows_and_bad_crops_are_refused():
    encoder = Encoder(3, 8, 32, 16, 128)
    with pytest.raises(ValueError, match="stride"):
        encoder.local_size(100)
    with pytest.raises(ValueError, match="multiple of the stride"):
        Encoder(3, 8, 32, 16, 132)
    with pytest.raises(ValueError, match="receptive field"):
        Encoder(3, 8, 32, 16, 24)


def test_pooled_mask_is_on_the_local_grid():
    encoder = Encoder(3, 8, 32, 16, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[0] = True
    mask[1, :, :20] = True  # left strip only
    pooled = encoder.pool_mask(mask)
    assert pooled.shape == (2, 9, 9)
    assert torch.all(pooled[0] == 1)
    assert pooled[1, :, 0].min() > 0.5 and torch.all(pooled[1, :, -1] == 0)


def test_readouts_are_the_head_the_pooled_map_before_it_or_both():
    torch.manual_seed(0)
    encoder = trained_like(Encoder(3, 8, 32, 16, 64, pool="foreground"))
    image, mask = torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64)
    mask[:, 16:48, 8:40] = 1
    with torch.no_grad():
        local, head = encoder(image, mask)
        share = encoder.pool_mask(mask).unsqueeze(1) + 1e-3
        pooled = (local * share).sum(dim=(2, 3)) / share.sum(dim=(2, 3))
        torch.testing.assert_close(Readout(encoder, "head")(image, mask)[1], head)
        torch.testing.assert_close(Readout(encoder, "pooled")(image, mask)[1], pooled)
        torch.testing.assert_close(Readout(encoder, "both")(image, mask)[1], torch.cat([head, pooled], 1))
        assert not torch.allclose(pooled, local.mean(dim=(2, 3)), atol=1e-3)  # the mask did weigh
    with pytest.raises(ValueError, match="readout 'last'"):
        Readout(encoder, "last")


def test_no_normalisation_in_the_trunk_and_intensity_reaches_the_global_vector():
    torch.manual_seed(0)
    encoder = trained_like(Encoder(3, 8, 32, 16, 64))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in encoder.trunk.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        base, brighter = encoder(x)[1], encoder(x + 0.5)[1]
        # more "cells": the same patch tiled twice vs once on an empty background (mean pooling counts)
        one, two = torch.full((1, 3, 64, 64), -3.0), torch.full((1, 3, 64, 64), -3.0)
        one[:, :, 8:24, 8:24] = 2.0
        two[:, :, 8:24, 8:24] = 2.0
        two[:, :, 40:56, 40:56] = 2.0
        sparse, dense = encoder(one)[1], encoder(two)[1]
    assert (base - brighter).abs().max() > 1e-2
    assert (sparse - dense).abs().max() > 1e-2


def test_build_encoder_is_seeded_and_leaves_the_global_rng_alone():
    arch = {"in_channels": 3, "width": 8, "local_dim": 32, "global_dim": 16, "crop": 64}
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_encoder(arch, 1), build_encoder(arch, 1), build_encoder(arch, 2)
    assert torch.rand(1) == expected
    assert not a.training
    assert torch.equal(a.trunk[0].weight, b.trunk[0].weight)
    assert not torch.equal(a.trunk[0].weight, c.trunk[0].weight)
    assert a.arch == {**arch, "pool": "mean"}


def test_critic_shapes():
    local, global_ = torch.randn(6, 32, 5, 5), torch.randn(6, 16)
    l_emb, g_emb = LocalCritic(32, 16, 24)(local, global_)
    assert l_emb.shape == (6, 24, 5, 5) and g_emb.shape == (6, 24)
    valid = torch.rand(6, 5, 5) > 0.5
    s_emb, g2 = GlobalCritic(32, 16, 24)(local, global_, valid)
    assert s_emb.shape == (6, 24) and g2.shape == (6, 24)
    assert PriorDiscriminator(16)(torch.rand(6, 16)).shape == (6,)
