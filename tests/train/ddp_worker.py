"""Run under torchrun by test_ddp.py; settings come from CELLMI_* variables.

    torchrun --standalone --nproc-per-node 2 tests/train/ddp_worker.py OUT_DIR

1. Gradient check: one DDP backward with negatives gathered across ranks must give the gradient of
   the mean of the ranks' losses, computed here again without any collective in the graph.
2. Training: run_training, then whether every rank holds the same parameters.
Each rank writes OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import copy
import json
import sys

import torch

from cellmi.losses import content_loss, local_mi_loss
from cellmi.settings import Settings
from cellmi.store import STORE_NAME, join, open_store
from cellmi.train.data import CropLoader
from cellmi.train.distributed import all_gather_tensor, init_distributed, teardown
from cellmi.train.loop import run_training
from cellmi.train.state import build_trainer, wrap_distributed
from cellmi.train.step import _mi_terms, step_inputs


def gradient_error(settings: Settings, dist) -> float:
    """Largest |DDP gradient - reference gradient| over the encoder and critic parameters."""
    store = open_store(join(settings.workdir, STORE_NAME))
    trainer = build_trainer(settings, len(store.meta.channels), dist.device)
    reference = copy.deepcopy(trainer.net)
    wrap_distributed(trainer, dist)
    loader = CropLoader(store, settings.train, settings.model.crop, dist.rank, dist.world)
    batch = loader.batch(0)
    float32 = settings.train.model_copy(update={"amp": False})  # both forwards below run without autocast
    inputs = step_inputs(batch, trainer.encoder.pool_mask, float32, dist.device)
    x, ids, valid, share, content = inputs.x, inputs.ids, inputs.valid, inputs.share, inputs.content
    loader.close()
    out = trainer.train_net(x, valid, share)
    local, _ = _mi_terms(out, ids, valid, settings.train, gather=True)
    (local + settings.train.content * content_loss(out["content"], content)).backward()
    got = torch.cat([p.grad.flatten() for p in trainer.net.parameters()])

    world = dist.world
    xs, all_ids = all_gather_tensor(x).chunk(world), all_gather_tensor(ids)
    all_valid = all_gather_tensor(valid.to(torch.uint8)).bool()
    shares = all_gather_tensor(share).chunk(world)
    contents = all_gather_tensor(content).chunk(world)
    outs = [  # batch-norm statistics per rank, as DDP has them
        reference(chunk, v, s) for chunk, v, s in zip(xs, all_valid.chunk(world), shares, strict=True)
    ]
    local_emb = torch.cat([o["local_emb"] for o in outs])
    crops = torch.arange(len(all_ids))
    cfg = settings.train
    losses = [
        local_mi_loss(local_emb, o["global_emb"], all_ids, i, all_valid, cfg.estimator)
        + cfg.crop_pairs * local_mi_loss(local_emb, o["global_emb"], crops, c, all_valid, cfg.estimator)
        + cfg.content * content_loss(o["content"], t)
        for o, i, c, t in zip(outs, all_ids.chunk(world), crops.chunk(world), contents, strict=True)
    ]
    (sum(losses) / world).backward()
    want = torch.cat([p.grad.flatten() for p in reference.parameters()])
    return float((got - want).abs().max() / want.abs().max())


def main(out_dir: str) -> None:
    settings = Settings()
    dist = init_distributed("cpu", timeout_s=60)
    try:
        grad_error = gradient_error(settings, dist)
        result = run_training(settings, dist)
        # parameters only: DDP re-syncs buffers (batch-norm statistics) from rank 0 at each forward
        modules = (result.trainer.net, result.trainer.prior)
        flat = torch.cat([p.detach().flatten() for m in modules for p in m.parameters()])
        everyone = all_gather_tensor(flat[None])
        report = {
            "rank": dist.rank,
            "world": dist.world,
            "step": result.step,
            "numel": flat.numel(),
            "max_diff": float((everyone - everyone[0]).abs().max()),
            "grad_error": grad_error,
        }
        with open(f"{out_dir}/rank{dist.rank}.json", "w") as handle:
            json.dump(report, handle)
    finally:
        teardown()


if __name__ == "__main__":
    main(sys.argv[1])
