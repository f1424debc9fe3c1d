"""Checkpoints: one torch file of plain tensors and containers per step, plus a JSON sidecar.

    {dir}/step_000200.pt     dict with explicit keys (see ``CHECKPOINT_KEYS``)
    {dir}/step_000200.json   step, arch, settings, channels, data statistics, size and sha256 of the .pt

The .pt is written first (temp + rename locally, a single PUT on S3), then the sidecar; a
checkpoint counts as complete only when its sidecar exists and the .pt matches its size and hash.
Loading uses ``torch.load(weights_only=True)``: a file holding pickled code is refused unrun.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from typing import Any

import fsspec
import torch

from cellmi import __version__
from cellmi.errors import UserError, is_infrastructure
from cellmi.log import log
from cellmi.model.encoder import Encoder, build_encoder
from cellmi.store import filesystem, join, read_bytes, write_bytes_atomic
from cellmi.watchdog import waiting

__all__ = [
    "CHECKPOINT_KEYS",
    "build_encoder",
    "checkpoint_steps",
    "latest_checkpoint",
    "load_checkpoint",
    "load_encoder",
    "save_checkpoint",
]

FORMAT = 1
CHECKPOINT_KEYS = (
    "format",
    "arch",
    "encoder",
    "critics",
    "prior",
    "optim",
    "prior_optim",
    "step",
    "rng",
    "settings",
    "stop_reason",
    "data_stats",
    "channels",
    "train_seconds",
)
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")
_ARCH_KEYS = ("in_channels", "width", "local_dim", "global_dim", "crop")
_ARCH_OPTIONAL = ("pool",)  # absent in checkpoints written before it existed (then: plain mean)


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}.pt"


def sidecar_url(url: str) -> str:
    return url[: -len(".pt")] + ".json"


def _listing(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[int, str]]:
    """(step, file name) of every ``step_*.pt`` under ``path``, newest first."""
    if not fs.exists(path):
        return []
    found = []
    for name in fs.ls(path, detail=False):
        match = _STEP_FILE.search(name.rsplit("/", 1)[-1])
        if match:
            found.append((int(match.group(1)), match.group(0)))
    return sorted(found, reverse=True)


def checkpoint_steps(url_dir: str) -> list[tuple[int, str]]:
    """(step, url) of every ``step_*.pt`` in a folder, newest first; complete or not."""
    fs, path = filesystem(url_dir)
    with waiting(url_dir):
        return [(step, join(url_dir, name)) for step, name in _listing(fs, path)]


def save_checkpoint(url_dir: str, state: dict[str, Any], step: int, keep: int) -> str:
    """Write ``state`` as checkpoint ``step`` atomically, then its sidecar; keep the newest ``keep``.

    Returns the checkpoint's URL (local path or s3://).
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    url = join(url_dir, checkpoint_name(step))
    write_bytes_atomic(url, data)
    sidecar = {
        "format": FORMAT,
        "step": step,
        "file": checkpoint_name(step),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "arch": state["arch"],
        "settings": state["settings"],
        "stop_reason": state["stop_reason"],
        "channels": state["channels"],
        "data_stats": state["data_stats"],
        "cellmi_version": __version__,
    }
    write_bytes_atomic(sidecar_url(url), json.dumps(sidecar, indent=2).encode())
    _prune(url_dir, keep, step)
    return url


def _prune(url_dir: str, keep: int, newest: int) -> None:
    """Delete all but the newest ``keep`` checkpoints up to ``newest`` (never anything newer)."""
    fs, path = filesystem(url_dir)
    with waiting(url_dir):
        older = [name for step, name in _listing(fs, path) if step <= newest]
        for name in older[keep:]:
            for target in (f"{path}/{sidecar_url(name)}", f"{path}/{name}"):
                if fs.exists(target):
                    fs.rm(target)


def _is_complete(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether the sidecar exists and the .pt at ``path`` has its recorded size and sha256."""
    try:
        meta = json.loads(fs.cat_file(sidecar_url(path)))
        data = fs.cat_file(path)
    except (ValueError, OSError) as err:  # FileNotFoundError is an OSError
        if is_infrastructure(err):  # unanswered is not incomplete: skipping it would lose the checkpoint
            raise
        return False
    return len(data) == meta.get("bytes") and hashlib.sha256(data).hexdigest() == meta.get("sha256")


def latest_checkpoint(url_dir: str) -> str | None:
    """URL of the newest complete checkpoint in a folder; incomplete or corrupt ones are logged, skipped."""
    fs, path = filesystem(url_dir)
    with waiting(url_dir):
        for step, name in _listing(fs, path):
            if _is_complete(fs, f"{path}/{name}"):
                return join(url_dir, name)
            log.warning("checkpoint %s (step %d) is incomplete or corrupt, skipped", join(url_dir, name), step)
    return None


def load_checkpoint(url: str) -> dict[str, Any]:
    """The checkpoint dict of one file; only tensors and plain containers are unpickled."""
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise UserError(f"{url}: checkpoint not found") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else "disallowed content"
        raise UserError(
            f"{url}: refused to load: the file holds pickled objects other than tensors and "
            f"plain containers (nothing in it was run): {reason}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or ["unreadable"])[0][:200]
        raise UserError(f"{url}: not a readable checkpoint ({first})") from None
    if not isinstance(state, dict) or "arch" not in state or "encoder" not in state:
        raise UserError(f"{url}: not a cellmi checkpoint (no 'arch'/'encoder' entries)")
    if state.get("format") != FORMAT:
        raise UserError(
            f"{url}: checkpoint format {state.get('format')!r}, this cellmi reads format {FORMAT}"
        )
    return state


def encoder_from_state(state: dict[str, Any], url: str, average: bool = False) -> Encoder:
    """Rebuild the encoder of a checkpoint dict, with its moving average of the weights when ``average``
    and it holds one (else its last weights); an architecture this code cannot build is a UserError."""
    arch = state["arch"]
    if not isinstance(arch, dict) or sorted(set(arch) - set(_ARCH_OPTIONAL)) != sorted(_ARCH_KEYS):
        raise UserError(f"{url}: incompatible architecture {arch!r}: expected the keys {list(_ARCH_KEYS)}")
    try:
        encoder = build_encoder(arch, seed=0)
        encoder.load_state_dict(weights_of(state, average)[1], strict=True)
    except (RuntimeError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or ["?"])[0][:200]
        raise UserError(
            f"{url}: checkpoint weights do not fit the encoder architecture {arch}: {first}"
        ) from None
    return encoder.eval()


def resolve_checkpoint(url: str) -> str:
    """A checkpoint file URL, or the newest complete checkpoint of a folder."""
    if url.endswith(".pt"):
        return url
    fs, path = filesystem(url)
    with waiting(url):
        found, folder = fs.exists(path), fs.isdir(path)
    if not found:
        raise UserError(f"{url}: no such checkpoint file or folder")
    if not folder:
        return url  # a file of another name (model.pth, a download): load it, checked like any other
    found = latest_checkpoint(url)
    if found is None:
        raise UserError(f"{url}: no complete checkpoint in this folder (run `cellmi train` first)")
    return found


def weights_of(state: dict[str, Any], average: bool) -> tuple[str, dict[str, Any]]:
    """("average", the averaged encoder's weights) when asked for and saved, else ("last", the last)."""
    if average and isinstance(state.get("ema"), dict) and "encoder" in state["ema"]:
        return "average", state["ema"]["encoder"]
    return "last", state["encoder"]


def load_encoder(
    url: str, device: str | torch.device = "cpu", average: bool = True
) -> tuple[Encoder, dict[str, Any]]:
    """The trained encoder (eval mode, on ``device``) and its facts from a checkpoint file or folder:
    with ``average``, the moving average of its weights when the checkpoint holds one.

    The facts: url, step, arch, settings, channels, data_stats, stop_reason, weights ("average" or
    "last").
    """
    url = resolve_checkpoint(url)
    state = load_checkpoint(url)
    encoder = encoder_from_state(state, url, average).to(device)
    info = {
        "url": url,
        **{k: state.get(k) for k in ("step", "arch", "settings", "channels", "data_stats", "stop_reason")},
        "weights": weights_of(state, average)[0],
    }
    return encoder, info
