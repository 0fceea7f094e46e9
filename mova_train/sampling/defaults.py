"""Render sizes that fit the checkpoint: what the sampler and the evaluation renders use when no size is given.

Recorded per model configuration (the presets of mova_train.models.config): the released MOVA architecture renders
8 s at 360p with 50 steps, as the reference does; the tiny test model renders 9 frames at 32x64 with 4 steps
(a few seconds on a CPU). Any other architecture gets the released sizes. The 720p checkpoint shares the released
architecture, so it also defaults to 352x640: pass the size to render at 720x1280.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingDefaults:
    name: str  # the model configuration they belong to
    num_frames: int
    height: int
    width: int
    steps: int

    def describe(self) -> str:
        return f"{self.num_frames} frames at {self.height}x{self.width}, {self.steps} steps"


RELEASED_DEFAULTS = SamplingDefaults("MOVA", num_frames=193, height=352, width=640, steps=50)
TINY_DEFAULTS = SamplingDefaults("tiny", num_frames=9, height=32, width=64, steps=4)

_ARCHITECTURE_PARTS = ("video_dit", "audio_dit", "dual_tower_bridge")


def sampling_defaults(model_config) -> SamplingDefaults:
    """The defaults of a MovaConfig: the tiny preset's when it has the tiny architecture, else the released ones."""
    from mova_train.models import get_model_config

    tiny = get_model_config("tiny")
    if all(getattr(model_config, part) == getattr(tiny, part) for part in _ARCHITECTURE_PARTS):
        return TINY_DEFAULTS
    return RELEASED_DEFAULTS


def checkpoint_sampling_defaults(checkpoint_dir: str | os.PathLike) -> SamplingDefaults:
    """The defaults of a checkpoint folder, read from its config files only (no weights are loaded)."""
    from mova_train.models import read_mova_config

    return sampling_defaults(read_mova_config(checkpoint_dir))
