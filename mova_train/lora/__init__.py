"""LoRA for MOVA: target presets, PEFT injection per component/expert, adapter files, merge, inspection, export.

The names below are imported on first use (PEP 562), so `mova_train.lora.config` (the Hydra `lora` schema) loads
without PEFT and torch: `train.py --help` composes the config without importing them.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "base_identity": "mova_train.identity",
    "ADAPTER_CONFIG": ".adapters",
    "ADAPTER_WEIGHTS": ".adapters",
    "META_BASE_IDENTITY": ".adapters",
    "META_STEP": ".adapters",
    "META_TRAINING_CONFIG": ".adapters",
    "AdapterFormatError": ".adapters",
    "apply_adapters": ".adapters",
    "check_base_identity": ".adapters",
    "load_adapters": ".adapters",
    "save_adapters": ".adapters",
    "targets_from_state": ".adapters",
    "InitAdapter": ".init_from",
    "adapter_sha256": ".init_from",
    "check_init_compatible": ".init_from",
    "load_init_adapter": ".init_from",
    "read_init_adapter": ".init_from",
    "INIT_OPTIONS": ".config",
    "LoraConfig": ".config",
    "LoraError": ".config",
    "as_lora_config": ".config",
    "lora_config_from_dict": ".config",
    "lora_config_to_dict": ".config",
    "validate_lora_config": ".config",
    "DEFAULT_ADAPTER": ".inject",
    "adapter_names": ".inject",
    "apply_lora": ".inject",
    "extract_lora_state": ".inject",
    "load_lora_state_dict": ".inject",
    "lora_parameters": ".inject",
    "lora_state_dict": ".inject",
    "merge_lora": ".inject",
    "num_lora_params": ".inject",
    "randomize_lora": ".inject",
    "remove_lora": ".inject",
    "set_active_adapters": ".inject",
    "set_lora_scale": ".inject",
    "LoraRow": ".inspect",
    "describe_lora": ".inspect",
    "format_lora_table": ".inspect",
    "lora_config_from_name": ".inspect",
    "print_lora_summary": ".inspect",
    "PRESETS": ".presets",
    "Preset": ".presets",
    "presets_for_component": ".presets",
    "resolve_targets": ".presets",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(home if home.startswith("mova_train") else __name__ + home)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_ADAPTER",
    "INIT_OPTIONS",
    "META_BASE_IDENTITY",
    "META_STEP",
    "META_TRAINING_CONFIG",
    "PRESETS",
    "AdapterFormatError",
    "InitAdapter",
    "LoraConfig",
    "LoraError",
    "LoraRow",
    "Preset",
    "adapter_names",
    "adapter_sha256",
    "apply_adapters",
    "apply_lora",
    "as_lora_config",
    "base_identity",
    "check_base_identity",
    "check_init_compatible",
    "describe_lora",
    "extract_lora_state",
    "format_lora_table",
    "load_adapters",
    "load_init_adapter",
    "load_lora_state_dict",
    "lora_config_from_dict",
    "lora_config_from_name",
    "lora_config_to_dict",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "num_lora_params",
    "presets_for_component",
    "print_lora_summary",
    "randomize_lora",
    "read_init_adapter",
    "remove_lora",
    "resolve_targets",
    "save_adapters",
    "set_active_adapters",
    "set_lora_scale",
    "targets_from_state",
    "validate_lora_config",
]
