"""Morphology discovery: UMAP + Gaussian mixture over window representations, metrics, figures, report."""

from cellmi.analyze.metrics import (
    average_precision,
    cluster_scores,
    confusion,
    mean_average_precision,
    nn_accuracy,
    probe_accuracy,
    purity,
)
from cellmi.analyze.mixture import assign, fit_mixture, select_by_bic, vote
from cellmi.analyze.profiles import ProfileModel, assign_profiles, field_profiles, fit_profiles
from cellmi.analyze.reduce import Reducer, embed, fit_reducer

__all__ = [
    "ProfileModel",
    "Reducer",
    "assign",
    "assign_profiles",
    "average_precision",
    "cluster_scores",
    "confusion",
    "embed",
    "field_profiles",
    "fit_mixture",
    "fit_profiles",
    "fit_reducer",
    "mean_average_precision",
    "nn_accuracy",
    "probe_accuracy",
    "purity",
    "select_by_bic",
    "vote",
]
