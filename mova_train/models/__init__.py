"""MOVA diffusion model: configs, the video/audio towers and bridge, the dual-tower step, scheduler and loading.

The names below are imported on first use (PEP 562), so `mova_train.models.config` (the architecture presets that
`inspect --help` lists) loads without torch.
"""

from __future__ import annotations

from mova_train.lazy import lazy_exports

from ..names import COMPONENTS, EXPERTS

_HOMES = {
    "load_mova": ".checkpoint",
    "read_mova_config": ".checkpoint",
    "save_mova": ".checkpoint",
    "CONFIG_PRESETS": ".config",
    "AudioDiTConfig": ".config",
    "BridgeConfig": ".config",
    "ConfigError": ".config",
    "MovaConfig": ".config",
    "SchedulerConfig": ".config",
    "VideoDiTConfig": ".config",
    "get_model_config": ".config",
    "set_attention_backend": ".layers",
    "MovaModel": ".mova",
    "build_i2v_condition": ".mova",
    "build_mova": ".mova",
    "set_activation_checkpointing": ".mova",
    "FlowMatchScheduler": ".scheduler",
    "expert_for_timestep": ".scheduler",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, globals())


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
