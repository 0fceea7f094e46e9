"""MOVA diffusion model: configs, the video/audio towers and bridge, the dual-tower step, scheduler and loading."""

from ..names import COMPONENTS, EXPERTS
from .checkpoint import load_mova, read_mova_config, save_mova
from .config import (
    CONFIG_PRESETS,
    AudioDiTConfig,
    BridgeConfig,
    ConfigError,
    MovaConfig,
    SchedulerConfig,
    VideoDiTConfig,
    get_model_config,
)
from .layers import set_attention_backend
from .mova import MovaModel, build_i2v_condition, build_mova, set_activation_checkpointing
from .scheduler import FlowMatchScheduler, expert_for_timestep

__all__ = [
    "COMPONENTS",
    "CONFIG_PRESETS",
    "EXPERTS",
    "AudioDiTConfig",
    "BridgeConfig",
    "ConfigError",
    "FlowMatchScheduler",
    "MovaConfig",
    "MovaModel",
    "SchedulerConfig",
    "VideoDiTConfig",
    "build_i2v_condition",
    "build_mova",
    "expert_for_timestep",
    "get_model_config",
    "load_mova",
    "read_mova_config",
    "save_mova",
    "set_activation_checkpointing",
    "set_attention_backend",
]
