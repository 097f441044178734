"""Backbones: the model-specific half of dp2osr behind one interface (see `base.Backbone`) and a registry of
them by name (`loading.REGISTRY`). Nothing outside this package tests a model name."""

from dp2osr.backbones.base import Backbone, Cond, cast, load_release_state, save_release
from dp2osr.backbones.loading import (
    DTYPES,
    NAMES,
    auto_dtype,
    backbone_class,
    default_model_note,
    load_backbone,
    size_traits,
    trait_defaults,
)

__all__ = [
    "DTYPES",
    "NAMES",
    "Backbone",
    "Cond",
    "auto_dtype",
    "backbone_class",
    "cast",
    "default_model_note",
    "load_backbone",
    "load_release_state",
    "save_release",
    "size_traits",
    "trait_defaults",
]
