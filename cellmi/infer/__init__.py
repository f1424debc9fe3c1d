"""Sliding-window inference: window geometry, per-field embedding, Dask fan-out (`cellmi infer`)."""

from cellmi.infer.embed import embed_naive, embed_shared
from cellmi.infer.handcrafted import feature_names, window_features
from cellmi.infer.job import InferOutcome, Plan, assemble, compute_in_process, make_plan, run_inference
from cellmi.infer.parts import FieldResult
from cellmi.infer.task import InferJob, embed_field
from cellmi.infer.windows import MapGroup, axis_starts, foreground_fraction, map_groups, window_grid

__all__ = [
    "FieldResult",
    "InferJob",
    "InferOutcome",
    "MapGroup",
    "Plan",
    "assemble",
    "axis_starts",
    "compute_in_process",
    "embed_field",
    "embed_naive",
    "embed_shared",
    "feature_names",
    "foreground_fraction",
    "make_plan",
    "map_groups",
    "run_inference",
    "window_features",
    "window_grid",
]
