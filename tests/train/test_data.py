"""Crop batches: shapes, determinism, rank partition, foreground crops, no per-crop normalisation,
batched crop statistics and blur against their per-crop references, fields of several shapes, shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cellmi.errors import UserError
from cellmi.store import STORE_NAME, StoreMeta, StoreWriter, join, open_store
from cellmi.train.crops import (
    content_numpy,
    content_size,
    content_tensor,
    crop_content,
    cut_numpy,
    cut_tensor,
    dihedral,
    focus_ramps,
    gaussian_blur,
)
from cellmi.train.data import CropLoader, batch_sample_ids
from cellmi.train.fields import plan_shards, prepare_shard

from .conftest import blob_field, make_store, tiny_settings


def loader_for(workdir: str, rank: int = 0, world: int = 1, threads: int = 1, **train) -> CropLoader:
    settings = tiny_settings(workdir, **train)
    store = open_store(join(workdir, STORE_NAME))
    return CropLoader(store, settings.train, settings.model.crop, rank, world, threads)


def test_batches_have_the_documented_shape_and_are_a_function_of_the_step(store_dir):
    a, b = loader_for(store_dir), loader_for(store_dir)
    try:
        batch = a.batch(3)
        assert batch.images.shape == (4, 2, 3, 48, 48) and batch.images.dtype.is_floating_point
        assert batch.masks.shape == (4, 2, 48, 48) and batch.masks.dtype == torch.bool
        assert sorted(batch.samples.tolist()) == [0, 1, 2, 3]
        assert batch.content.shape == (4, 2, content_size(3)) and batch.content.dtype == torch.float32
        again = b.batch(3)
        assert (batch.images == again.images).all() and (batch.masks == again.masks).all()
        assert not (a.batch(4).images == batch.images).all()
        streamed = next(a.batches(3))
        assert (streamed.images == batch.images).all()
    finally:
        a.close()
        b.close()


def test_several_loader_threads_make_the_same_stream(store_dir):
    one, four = loader_for(store_dir), loader_for(store_dir, threads=4)
    try:
        for a, b, _ in zip(one.batches(5), four.batches(5), range(12), strict=False):
            assert (a.images == b.images).all() and (a.masks == b.masks).all()
            assert (a.samples == b.samples).all()
    finally:
        one.close()
        four.close()


def test_samples_are_partitioned_across_ranks_each_epoch():
    def epoch(first_step: int) -> list[int]:
        return [
            i
            for step in (first_step, first_step + 1)
            for rank in range(2)
            for i in batch_sample_ids(8, 2, 2, rank, step, seed=5).tolist()
        ]

    one, two = epoch(0), epoch(2)
    assert sorted(one) == sorted(two) == list(range(8))  # each epoch: every sample once, over both ranks
    assert one != two  # and a new shuffle per epoch
    assert batch_sample_ids(8, 2, 2, 1, 0, seed=5).tolist() == one[2:4]


def test_crops_sit_on_foreground_and_are_not_renormalised(store_dir):
    loader = loader_for(store_dir, augment=False, min_foreground=0.05)
    store = loader.store
    try:
        batch = loader.batch(0)
        assert batch.masks.float().mean(dim=(2, 3)).min() > 0
        fields = [store.normalise(store.read_image(s, f), store.read_mask(s, f)) for s, f in store.meta.images("train")]
        for crop in batch.images.flatten(0, 1).numpy():
            # the crop is a verbatim window of a normalised field (data-set statistics, no per-crop scaling)
            assert any(_contains(field, crop) for field in fields)
    finally:
        loader.close()


def _contains(field: np.ndarray, crop: np.ndarray) -> bool:
    size = crop.shape[-1]
    hits = np.argwhere(np.isclose(field[0], crop[0, 0, 0]))
    return any(
        y + size <= field.shape[1]
        and x + size <= field.shape[2]
        and np.array_equal(field[:, y : y + size, x : x + size], crop)
        for y, x in hits
    )


def numpy_content(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The per-crop reference: (C, H, W), (H, W) -> per channel foreground mean, std, 95th percentile, share."""
    values = pixels[:, mask] if mask.any() else pixels.reshape(len(pixels), -1)
    stats = [values.mean(axis=1), values.std(axis=1), np.percentile(values, 95, axis=1)]
    return np.concatenate([*stats, [mask.mean()]]).astype(np.float32)


@pytest.mark.parametrize("nuisances", [dict(aug_blur=1.0, aug_gain=0.3), dict(aug_blur=0.0, aug_tilt=1.0)])
def test_nuisance_augmentation_changes_intensity_but_not_the_mask_or_the_content(store_dir, nuisances):
    plain = loader_for(store_dir, augment=False)
    jitter = loader_for(store_dir, augment=True, **nuisances)
    try:
        a, b = plain.batch(0), jitter.batch(0)
        assert not np.allclose(a.images.numpy(), b.images.numpy())
        assert a.masks.float().mean() == pytest.approx(b.masks.float().mean().item())  # flips/rotations only
        # same crops, content of the clean pixels (turned and mirrored: the same sums in another order)
        torch.testing.assert_close(a.content, b.content, rtol=1e-6, atol=1e-6)
        for crop, mask, content in zip(a.images.flatten(0, 1), a.masks.flatten(0, 1), a.content.flatten(0, 1),
                                       strict=True):
            np.testing.assert_allclose(content.numpy(), numpy_content(crop.numpy(), mask.numpy()),
                                       rtol=1e-5, atol=1e-6)
    finally:
        plain.close()
        jitter.close()


def test_crop_content_by_hand():
    pixels = np.zeros((2, 4, 4), np.float32)
    pixels[0, :2, :2] = [[1, 2], [3, 4]]  # the foreground of channel 0; channel 1 stays 0
    pixels[0, 3, 3] = 100.0  # background: left out
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    crops = torch.from_numpy(np.stack([pixels, pixels]))
    got = crop_content(crops, torch.from_numpy(np.stack([mask, np.zeros_like(mask)])))
    want = [2.5, 0, np.std([1, 2, 3, 4]), 0, np.percentile([1, 2, 3, 4], 95), 0, 4 / 16]
    assert got.shape == (2, content_size(2)) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-6)
    # no foreground at all: every pixel counts, the share is 0
    np.testing.assert_allclose(got[1, [0, 6]].numpy(), [110 / 16, 0], rtol=1e-6)


@pytest.mark.parametrize("content", [content_numpy, content_tensor])
def test_batched_crop_content_matches_the_per_crop_statistics_and_ignores_rotation(content):
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(6, 3, 20, 20)).astype(np.float32)
    masks = rng.random((6, 20, 20)) < np.array([0.5, 0.1, 0.9, 0.02, 0.0, 1.0])[:, None, None]
    got = content(torch.from_numpy(pixels), torch.from_numpy(masks)).numpy()
    want = np.stack([numpy_content(p, m) for p, m in zip(pixels, masks, strict=True)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    turned = content(torch.from_numpy(np.rot90(pixels, 1, (2, 3)).copy()),
                     torch.from_numpy(np.rot90(masks, 1, (1, 2)).copy())).numpy()
    np.testing.assert_allclose(turned, got, rtol=1e-6, atol=1e-6)  # the same pixels in another order


def test_cpu_and_device_paths_cut_and_select_the_same(store_dir):
    """The numpy paths taken on a CPU (crops cut as turned views, percentiles by partition) give exactly what
    the tensor paths taken on a GPU give."""
    store = open_store(join(store_dir, STORE_NAME))
    (group,) = prepare_shard(store, store.meta.samples_in("train"), [0, 1, 2], 24, torch.device("cpu")).groups
    rng = np.random.default_rng(3)
    rows, turns, flips = rng.integers(0, 6, 16), rng.integers(0, 4, 16), rng.integers(0, 2, 16)
    y, x = torch.from_numpy(rng.integers(0, 41, 16)), torch.from_numpy(rng.integers(0, 41, 16))
    a, b = cut_numpy(group, rows, y, x, 24, turns, flips), cut_tensor(group, rows, y, x, 24, turns, flips)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    values = torch.from_numpy(rng.integers(0, 5, (16, 3, 7, 7)).astype(np.float32))  # many ties
    masks = torch.from_numpy(rng.random((16, 7, 7)) < np.linspace(0, 1, 16)[:, None, None])  # none to all
    a, b = content_numpy(values, masks), content_tensor(values, masks)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(a[:, 6:9], b[:, 6:9])  # the percentiles: the same two values, the same interpolation


def test_batched_blur_is_scipys_gaussian_filter_per_crop():
    rng = np.random.default_rng(1)
    images = rng.gamma(2.0, 100.0, size=(4, 2, 40, 40)).astype(np.float32)
    sigmas = np.array([0.5, 0.9, 1.6, 3.7])  # radii 2, 4, 6 and 15 pixels: a kernel length each
    got = gaussian_blur(torch.from_numpy(images), sigmas).numpy()
    for image, sigma, out in zip(images, sigmas, got, strict=True):
        want = gaussian_filter(image, sigma=(0, sigma, sigma), mode="reflect")
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-3)
    assert not np.allclose(got[0], images[0], rtol=0.05)
    wide = gaussian_blur(torch.from_numpy(images[:1, :, :20, :20]), np.array([12.0])).numpy()  # radius 48 > 20 px
    np.testing.assert_allclose(wide[0], gaussian_filter(images[0, :, :20, :20], (0, 12, 12), mode="reflect"),
                               rtol=1e-5, atol=1e-3)


def test_focus_ramps_rise_from_one_edge_or_corner_to_the_opposite():
    ramps = focus_ramps(np.array([0.0, np.pi / 2, np.pi, np.pi / 4]), 5, torch.device("cpu")).numpy()[:, 0]
    np.testing.assert_allclose(ramps[0], np.tile(np.linspace(0, 1, 5), (5, 1)), atol=1e-6)  # along x
    np.testing.assert_allclose(ramps[1], ramps[0].T, atol=1e-6)  # along y
    np.testing.assert_allclose(ramps[2], ramps[0][:, ::-1], atol=1e-6)  # the other way
    assert ramps[3][0, 0] == pytest.approx(0, abs=1e-6) and ramps[3][-1, -1] == pytest.approx(1)  # corner to corner
    assert ramps[3][0, -1] == pytest.approx(0.5) and ramps.min() >= -1e-6 and ramps.max() <= 1 + 1e-6


def test_focus_gradient_leaves_one_edge_sharp_and_blurs_the_other(store_dir):
    plain = loader_for(store_dir, augment=True, aug_blur=0.0)
    tilted = loader_for(store_dir, augment=True, aug_blur=0.0, aug_tilt=1.0, aug_blur_sigma=3.0)
    try:
        a, b = plain.batch(3).images.flatten(0, 1).numpy(), tilted.batch(3).images.flatten(0, 1).numpy()
        change = np.abs(a - b).mean(axis=1)  # (M, H, W)
        corners = np.stack([change[:, 0, 0], change[:, 0, -1], change[:, -1, 0], change[:, -1, -1]], axis=1)
        assert (corners.min(axis=1) < 1e-4).all()  # each crop keeps a sharp corner (or edge)...
        assert (change.reshape(len(change), -1).max(axis=1) > 1e-2).all()  # ...and is blurred elsewhere
    finally:
        plain.close()
        tilted.close()


def test_dihedral_turns_and_mirrors_like_numpy():
    rng = np.random.default_rng(2)
    image, mask = rng.normal(size=(2, 5, 5)).astype(np.float32), rng.random((5, 5)) < 0.5
    turns, flips = np.repeat(np.arange(4), 2), np.tile([0, 1], 4)  # all eight transforms
    images, masks = torch.from_numpy(np.stack([image] * 8)), torch.from_numpy(np.stack([mask] * 8))
    dihedral(images, masks, turns, flips)
    for got, got_mask, turn, flip in zip(images.numpy(), masks.numpy(), turns, flips, strict=True):
        want, want_mask = np.rot90(image, turn, (1, 2)), np.rot90(mask, turn)
        if flip:
            want, want_mask = want[:, :, ::-1], want_mask[:, ::-1]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_mask, want_mask)
    assert len({g.tobytes() for g in images.numpy()}) == 8


def test_prepared_fields_count_the_foreground_of_every_crop(store_dir):
    store = open_store(join(store_dir, STORE_NAME))
    samples = store.meta.samples_in("train")
    shard = prepare_shard(store, samples, [0, 1], crop=20, device=torch.device("cpu"))
    (group,) = shard.groups
    assert group.pixels.shape == (4, 3, 64, 64) and group.counts.shape == (4, 45, 45)
    for i, (sample, field) in enumerate([(s, f) for s in samples[:2] for f in store.meta.fields[s]]):
        g, row = shard.where[i // 2][0][i % 2], shard.where[i // 2][1][i % 2]
        assert (g, row) == (0, i)
        mask = store.read_mask(sample, field)
        windows = np.lib.stride_tricks.sliding_window_view(mask, (20, 20)).sum(axis=(2, 3))
        np.testing.assert_array_equal(group.counts[row].numpy(), windows)
        run = group.foreground[group.starts[row] : group.starts[row] + group.sizes[row]].numpy()
        np.testing.assert_array_equal(run, np.flatnonzero(mask))
        np.testing.assert_array_equal(group.pixels[row].numpy(), store.normalise(store.read_image(sample, field), mask))


def test_bad_batch_or_crop_settings_are_user_errors(store_dir):
    with pytest.raises(UserError, match="BATCH_SAMPLES=5 exceeds the 4 training samples"):
        loader_for(store_dir, batch_samples=5)
    settings = tiny_settings(store_dir)
    with pytest.raises(UserError, match=r"CROP=128 is larger than field 0000/1 of .* [(]64x64;"):
        CropLoader(open_store(join(store_dir, STORE_NAME)), settings.train, 128)


def test_batches_read_from_s3(s3_env):
    make_store(join(s3_env, "run", STORE_NAME), samples=3, fields=1)
    loader = loader_for(join(s3_env, "run"), batch_samples=3, fields_per_sample=2)
    try:
        batch = loader.batch(0)
        assert batch.images.shape == (3, 2, 3, 48, 48)
        assert np.isfinite(batch.images.numpy()).all()
    finally:
        loader.close()


def write_mixed_store(url: str) -> None:
    """Two channels, four samples, fields of two non-square shapes (even within a sample); sample 1 has a
    single field, without foreground."""
    shapes = {"0": [(64, 80), (72, 64)], "1": [(72, 64)], "2": [(64, 80), (64, 80)], "3": [(72, 64), (64, 80)]}
    meta = StoreMeta(
        channels=["DNA", "actin"],
        fields={s: [str(i + 1) for i in range(len(v))] for s, v in shapes.items()},
        split=dict.fromkeys(shapes, "train"),
        shape=(64, 64),
        stats={"mean": [5.0, 6.0], "std": [1.0, 1.5]},
    )
    writer = StoreWriter(url, meta, chunk=64)
    for s, fields in shapes.items():
        for i, (h, w) in enumerate(fields):
            pixels, mask = blob_field(int(s), 10 * int(s) + i, 80)
            writer.write_image(s, str(i + 1), pixels[:2, :h, :w], mask[:h, :w] & (s != "1"))
    writer.finish()


def test_fields_of_several_shapes_and_two_channels(tmp_path):
    workdir = str(tmp_path)
    write_mixed_store(join(workdir, STORE_NAME))
    loader = loader_for(workdir, augment=False, min_foreground=0.0, fields_per_sample=3)
    store = loader.store
    try:
        shard = loader.resident.get(0)
        assert sorted(g.shape for g in shard.groups) == [(64, 80), (72, 64)]
        fields = [store.normalise(store.read_image(s, f), store.read_mask(s, f)) for s, f in store.meta.images()]
        for step in range(3):
            batch = loader.batch(step)
            assert batch.images.shape == (4, 3, 2, 48, 48) and batch.content.shape == (4, 3, content_size(2))
            for crop in batch.images.flatten(0, 1).numpy():
                assert any(_contains(field, crop) for field in fields)
            empty = batch.samples == 1  # crops anywhere in a field without foreground, measured over all pixels
            assert not batch.masks[empty].any() and (batch.content[empty][..., -1] == 0).all()
            assert batch.masks[~empty].any(dim=(-2, -1)).all()
    finally:
        loader.close()


def test_plan_shards_keeps_whole_samples_in_store_order_within_half_the_budget():
    sizes = [10, 30, 10, 20, 20, 10, 40, 10]
    assert plan_shards(sizes, 150, batch=2) == [range(8)]  # everything fits: one shard
    shards = plan_shards(sizes, 100, batch=2)
    assert [i for s in shards for i in s] == list(range(8))  # consecutive runs covering every sample once
    assert len(shards) > 2 and all(sum(sizes[i] for i in s) <= 50 and len(s) >= 2 for s in shards)
    with pytest.raises(UserError, match=r"CELLMI_TRAIN__MEMORY_GB=.*BATCH_SAMPLES"):
        plan_shards(sizes, 100, batch=4)


def test_sharded_batches_come_from_the_resident_shard_and_visit_every_sample(tmp_path):
    workdir = str(tmp_path)
    make_store(join(workdir, STORE_NAME), samples=8, fields=1)
    settings = dict(batch_samples=2, memory_gb=0.0003, shard_epochs=2, threads=1)
    loader = loader_for(workdir, **settings)
    fresh = loader_for(workdir, **settings)
    try:
        shards = loader.plan.shards
        assert len(shards) == 4 and all(len(s) == 2 for s in shards)
        steps = 2 * sum(loader.plan.steps)  # two rounds
        seen = []
        for step, batch in zip(range(steps), loader.batches(0), strict=False):
            shard = shards[loader.plan.visit(step).shard]
            assert set(batch.samples.tolist()) <= set(shard)
            assert len(loader.resident) <= 2
            assert loader.resident.get(loader.plan.visit(step).shard).nbytes <= 0.0003 * 2**30 / 2  # half the budget
            seen += batch.samples.tolist()
        assert sorted(set(seen)) == list(range(8))
        visits = {loader.plan.visit(s).number: loader.plan.visit(s).shard for s in range(steps)}
        assert list(visits) == list(range(8))  # two rounds of four visits, each round every shard once
        assert sorted(visits[v] for v in range(4)) == sorted(visits[v] for v in range(4, 8)) == [0, 1, 2, 3]
        for step in (steps - 1, 3, 0):  # a fresh loader, out of order: the same batches
            again, first = fresh.batch(step), loader.batch(step)
            assert (again.images == first.images).all() and (again.samples == first.samples).all()
    finally:
        loader.close()
        fresh.close()
