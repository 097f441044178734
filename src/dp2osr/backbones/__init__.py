"""Backbones: the model-specific half of dp2osr behind one interface (see `base.Backbone`)."""

from dp2osr.backbones.base import Backbone, Cond, cast, load_release_state, save_release
from dp2osr.backbones.loading import DTYPES, NAMES, load_backbone

__all__ = ["DTYPES", "NAMES", "Backbone", "Cond", "load_backbone", "load_release_state", "save_release"]
