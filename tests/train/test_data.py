"""Crop batches: shapes, determinism, rank partition, foreground crops, no per-crop normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellmi.errors import UserError
from cellmi.store import STORE_NAME, join, open_store
from cellmi.train.data import CropLoader, FieldCache, batch_sample_ids, content_size, crop_content

from .conftest import make_store, tiny_settings


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


def test_nuisance_augmentation_changes_intensity_but_not_the_mask_or_the_content(store_dir):
    plain = loader_for(store_dir, augment=False)
    jitter = loader_for(store_dir, augment=True, aug_blur=1.0, aug_gain=0.3)
    try:
        a, b = plain.batch(0), jitter.batch(0)
        assert not np.allclose(a.images.numpy(), b.images.numpy())
        assert a.masks.float().mean() == pytest.approx(b.masks.float().mean().item())  # flips/rotations only
        torch.testing.assert_close(a.content, b.content, rtol=0, atol=0)  # same crops, content of the clean pixels
        for crop, mask, content in zip(a.images.flatten(0, 1), a.masks.flatten(0, 1), a.content.flatten(0, 1),
                                       strict=True):
            np.testing.assert_allclose(content.numpy(), crop_content(crop.numpy(), mask.numpy()), rtol=1e-6)
    finally:
        plain.close()
        jitter.close()


def test_crop_content_by_hand():
    pixels = np.zeros((2, 4, 4), np.float32)
    pixels[0, :2, :2] = [[1, 2], [3, 4]]  # the foreground of channel 0; channel 1 stays 0
    pixels[0, 3, 3] = 100.0  # background: left out
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    got = crop_content(pixels, mask)
    want = [2.5, 0, np.std([1, 2, 3, 4]), 0, np.percentile([1, 2, 3, 4], 95), 0, 4 / 16]
    assert got.shape == (content_size(2),) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # no foreground at all: every pixel counts, the share is 0
    np.testing.assert_allclose(crop_content(pixels, np.zeros((4, 4), bool))[[0, 6]], [110 / 16, 0], rtol=1e-6)


def test_field_cache_is_bounded(store_dir):
    store = open_store(join(store_dir, STORE_NAME))
    cache = FieldCache(store, capacity=2)
    for sample, field in store.meta.images("train"):
        cache.get(sample, field)
        assert len(cache) <= 2
    assert cache.get(*store.meta.images("train")[-1]).pixels.dtype == np.float32


def test_bad_batch_or_crop_settings_are_user_errors(store_dir):
    with pytest.raises(UserError, match="BATCH_SAMPLES=5 exceeds the 4 training samples"):
        loader_for(store_dir, batch_samples=5)
    settings = tiny_settings(store_dir)
    with pytest.raises(UserError, match="CROP=128 is larger than the fields"):
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
