"""The step's layout of a batch (``step_inputs``): made on the loader's thread, it moves no value; a
step on it equals a step on the plain batch."""

from __future__ import annotations

import threading

import torch

from cellmi.store import STORE_NAME, join, open_store
from cellmi.train.data import CropLoader
from cellmi.train.distributed import DistInfo
from cellmi.train.state import build_trainer
from cellmi.train.step import StepInputs, batch_layout, step_inputs, train_step

from .conftest import tiny_settings

CPU = torch.device("cpu")
DIST = DistInfo(0, 1, 0, 1, CPU)


def loader_and_settings(store_dir: str):
    settings = tiny_settings(store_dir)
    return CropLoader(open_store(join(store_dir, STORE_NAME)), settings.train, settings.model.crop), settings


def test_the_layout_is_made_on_the_loader_thread_and_moves_no_value(store_dir, native):
    loader, settings = loader_and_settings(store_dir)
    encoder = build_trainer(settings, 3, CPU).encoder
    threads = []

    def finish(batch):
        threads.append(threading.current_thread().name)
        return step_inputs(batch, encoder.pool_mask, settings.train, CPU)

    try:
        inputs, batch = next(loader.batches(2, finish)), loader.batch(2)
    finally:
        loader.close()
    assert isinstance(inputs, StepInputs) and threads and all(t.startswith("cellmi-crops") for t in threads)
    flat = batch.images.flatten(0, 1)
    assert inputs.x.dtype == (torch.bfloat16 if native else torch.float32)
    assert inputs.x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(inputs.x, flat.to(inputs.x.dtype))  # the rounding autocast does at the first conv
    share = encoder.pool_mask(batch.masks.flatten(0, 1))
    assert torch.equal(inputs.share, share) and torch.equal(inputs.valid, share >= settings.train.local_foreground)
    assert inputs.ids.tolist() == batch.samples.repeat_interleave(2).tolist()
    assert torch.equal(inputs.content, batch.content.flatten(0, 1))


def test_a_step_on_the_layout_equals_a_step_on_the_batch(store_dir, native):
    loader, settings = loader_and_settings(store_dir)
    layout = batch_layout(build_trainer(settings, 3, CPU).encoder, settings.train, CPU)
    try:
        batches = [loader.batch(step) for step in range(3)]
    finally:
        loader.close()
    laid_out, plain = build_trainer(settings, 3, CPU), build_trainer(settings, 3, CPU)
    for batch in batches:
        a = train_step(laid_out, layout(batch), settings.train, DIST)
        b = train_step(plain, batch, settings.train, DIST)
        assert torch.equal(a, b)
    for p, q in zip(laid_out.net.parameters(), plain.net.parameters(), strict=True):
        assert torch.equal(p, q)
