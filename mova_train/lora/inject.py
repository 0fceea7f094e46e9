"""PEFT LoRA injection per MOVA component, adapter state in canonical keys, scaling and merging.

Each component (`video_dit`, `video_dit_2`, `audio_dit`, `dual_tower_bridge`) gets its own PEFT injection with
`target_modules` = the exact resolved paths, so each expert has its own adapter. Canonical adapter keys are
`<component>.<module path>.lora_A.weight` ([r, in]), `.lora_B.weight` ([out, r]) and, with DoRA,
`.lora_magnitude_vector.weight` ([out]).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from mova_train.lora.config import INIT_OPTIONS, LoraConfig, LoraError, as_lora_config
from mova_train.lora.precision import install_input_cast_hooks
from mova_train.lora.presets import get_component, resolve_targets
from mova_train.names import ADAPTER_KEY_RE, COMPONENTS, LORA_PARTS, PEFT_KEY_RE, adapter_key

DEFAULT_ADAPTER = "default"


def parse_canonical_key(key: str) -> tuple[str, str, str]:
    """(component, module path, part) of a canonical adapter key; LoraError if it is not one."""
    m = ADAPTER_KEY_RE.fullmatch(key)
    if m is None:
        raise LoraError(
            f"{key!r} is not a canonical adapter key '<component>.<module path>.(lora_A|lora_B|"
            f"lora_magnitude_vector).weight' with component one of {', '.join(COMPONENTS)}"
        )
    return m["component"], m["path"], m["part"]


def build_peft_config(cfg: LoraConfig, paths: Iterable[str]) -> PeftLoraConfig:
    """The PEFT LoraConfig for one component: our hyper-parameters, `target_modules` = exact paths."""
    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=INIT_OPTIONS[cfg.init],
        target_modules=sorted(paths),
        bias="none",
    )


def iter_lora_layers(
    model: nn.Module, components: Iterable[str] | None = None
) -> Iterable[tuple[str, str, LoraLayer]]:
    """(component, module path, PEFT LoRA layer) for every wrapped module of the loaded components."""
    for component in COMPONENTS if components is None else components:
        module = getattr(model, component, None)
        if module is None:
            continue
        for path, sub in module.named_modules():
            if isinstance(sub, LoraLayer):
                yield component, path, sub


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in the model, sorted."""
    names: set[str] = set()
    for _, _, layer in iter_lora_layers(model):
        names.update(layer.lora_A.keys())
    return sorted(names)


def apply_lora(
    model: nn.Module,
    cfg: LoraConfig,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    targets: dict[str, list[str]] | None = None,
    adapter_dtype: torch.dtype | None = torch.float32,
) -> dict[str, list[str]]:
    """Inject LoRA into each targeted component, freeze every base parameter, return component -> paths.

    `targets` (exact paths, e.g. read from an adapter file) overrides the preset resolution of `cfg.targets`.
    Adapter weights are kept in `adapter_dtype` (fp32 by default, also under a bf16 base; None = base dtype);
    under autocast the wrapped layers take their input uncast (lean, see `mova_train.lora.precision`).
    On a meta-device model the adapter weights stay on meta (no memory), for inspection at full size.
    """
    cfg = as_lora_config(cfg)
    if not adapter_name or "." in adapter_name:
        raise LoraError(f"adapter_name must be a non-empty name without dots, got {adapter_name!r}")
    if adapter_name in adapter_names(model):
        raise LoraError(f"the model already has an adapter named {adapter_name!r}")
    if targets is None:
        targets = resolve_targets(model, cfg)
    else:
        targets = {c: sorted(p) for c, p in sorted(targets.items())}
        _check_paths_exist(model, targets)
    for component, paths in targets.items():
        module = get_component(model, component)
        on_meta = any(p.device.type == "meta" for p in module.parameters())
        with warnings.catch_warnings():
            # PEFT warns when a second adapter goes into the same component; several named adapters are intended.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(
                build_peft_config(cfg, paths), module, adapter_name=adapter_name, low_cpu_mem_usage=on_meta
            )
        # PEFT also matches target names as suffixes; our paths are exact, so nothing else may be wrapped.
        injected = {
            p
            for p, sub in module.named_modules()
            if isinstance(sub, LoraLayer) and adapter_name in sub.lora_A
        }
        if injected != set(paths):
            raise AssertionError(
                f"{component}: PEFT wrapped {sorted(injected ^ set(paths))[:5]} unexpectedly"
            )
        if adapter_dtype is not None:
            for _, _, layer in iter_lora_layers(model, [component]):
                for part in LORA_PARTS:
                    container = getattr(layer, part, None)
                    if container is not None and adapter_name in container:
                        container[adapter_name].to(adapter_dtype)
        install_input_cast_hooks(module)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model, adapter_name=adapter_name):
        p.requires_grad_(True)
    return targets


def _check_paths_exist(model: nn.Module, targets: dict[str, list[str]]) -> None:
    for component, paths in targets.items():
        module = get_component(model, component)
        names = dict(module.named_modules())
        for path in paths:
            sub = names.get(path)
            if sub is None:
                raise LoraError(
                    f"the adapter targets {component}.{path}, which does not exist in this model "
                    "(adapter for another base or another layer count?)"
                )
            base = sub.get_base_layer() if isinstance(sub, LoraLayer) else sub
            if not isinstance(base, nn.Linear):
                raise LoraError(
                    f"the adapter targets {component}.{path}, a {type(base).__name__}, not a Linear"
                )


def lora_parameters(model: nn.Module, *, adapter_name: str | None = DEFAULT_ADAPTER) -> list[nn.Parameter]:
    """The LoRA parameters of `adapter_name` (None = all adapters) in a stable order."""
    params = []
    for _, _, layer in iter_lora_layers(model):
        for part in LORA_PARTS:
            container = getattr(layer, part, None)
            if container is None:
                continue
            for name in sorted(container.keys()):
                if adapter_name is None or name == adapter_name:
                    params.extend(container[name].parameters())
    return params


def lora_state_dict(model: nn.Module, *, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """Canonical adapter state of `adapter_name` (detached tensors, model dtype/device).

    Under DeepSpeed ZeRO-3 the parameters are partitioned: gather them first, or pass the consolidated
    full-model state dict to `extract_lora_state` instead.
    """
    out: dict[str, torch.Tensor] = {}
    for component, path, layer in iter_lora_layers(model):
        for part in LORA_PARTS:
            container = getattr(layer, part, None)
            if container is not None and adapter_name in container:
                out[adapter_key(component, path, part)] = container[adapter_name].weight.detach()
    return dict(sorted(out.items()))


def extract_lora_state(
    full_state_dict: dict[str, torch.Tensor], *, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, torch.Tensor]:
    """Canonical adapter state from a full-model state dict with PEFT names and any wrapper prefix.

    E.g. `module.video_dit.blocks.0.self_attn.q.lora_A.default.weight` ->
    `video_dit.blocks.0.self_attn.q.lora_A.weight` (accelerate `get_state_dict`, zero_to_fp32 output).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in full_state_dict.items():
        m = PEFT_KEY_RE.match(key)
        if m is None or m["adapter"] != adapter_name:
            continue
        canonical = adapter_key(m["component"], m["path"], m["part"])
        if canonical in out:
            raise LoraError(f"two state-dict entries map to the adapter key {canonical!r} (second: {key!r})")
        out[canonical] = value
    return dict(sorted(out.items()))


def _describe_keys(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_lora_state_dict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    strict: bool = True,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    source: str = "adapter state",
) -> None:
    """Copy canonical adapter tensors into the model's `adapter_name` weights (exact copy, cast to their dtype).

    Raises LoraError naming the keys on missing/unexpected keys (strict), a rank mismatch, or in/out features
    that do not match the base layers (an adapter for another base).
    """
    params: dict[str, nn.Parameter] = {}
    for component, path, layer in iter_lora_layers(model):
        for part in LORA_PARTS:
            container = getattr(layer, part, None)
            if container is not None and adapter_name in container:
                params[adapter_key(component, path, part)] = container[adapter_name].weight
    if not params:
        raise LoraError(f"the model has no adapter named {adapter_name!r} to load {source} into")
    for key in state:
        parse_canonical_key(key)
    missing = set(params) - set(state)
    unexpected = set(state) - set(params)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_describe_keys(unexpected)}")
        raise LoraError(f"{source} does not match the model's adapter {adapter_name!r}: " + "; ".join(parts))
    for key in sorted(set(state) & set(params)):
        value, param = state[key], params[key]
        if tuple(value.shape) != tuple(param.shape):
            raise LoraError(_shape_mismatch_message(key, tuple(value.shape), tuple(param.shape), source))
        if param.device.type == "meta":
            raise LoraError(f"cannot load {source} into a model on the meta device ({key})")
    with torch.no_grad():
        for key in sorted(set(state) & set(params)):
            params[key].copy_(state[key].to(device=params[key].device, dtype=params[key].dtype))


def _shape_mismatch_message(key: str, found: tuple[int, ...], expected: tuple[int, ...], source: str) -> str:
    _, _, part = parse_canonical_key(key)
    if part in ("lora_A", "lora_B") and len(found) == 2 and len(expected) == 2:
        rank_axis = 0 if part == "lora_A" else 1
        feature_axis = 1 - rank_axis
        if found[feature_axis] != expected[feature_axis]:
            what = "in_features" if part == "lora_A" else "out_features"
            return (
                f"{source}: {key} has shape {list(found)} but the model expects {list(expected)}: {what} "
                f"{found[feature_axis]} != {expected[feature_axis]} — the adapter was trained on another base"
            )
        return (
            f"{source}: rank mismatch at {key}: the file has rank {found[rank_axis]}, the model's adapter "
            f"rank {expected[rank_axis]} (shape {list(found)} vs {list(expected)})"
        )
    return f"{source}: {key} has shape {list(found)} but the model expects {list(expected)} (another base?)"


def set_lora_scale(
    model: nn.Module,
    scale: float,
    components: Iterable[str] | None = None,
    *,
    adapter_name: str | None = None,
) -> None:
    """Set the adapter scale: the update becomes scale * (alpha/r or alpha/sqrt(r)) * B A.

    `adapter_name` None = every adapter. Scale 0 disables a plain LoRA exactly; for DoRA it does not
    (the magnitude vector still rescales the base weight), use `remove_lora` for that.
    """
    for _, _, layer in iter_lora_layers(model, components):
        for name in list(layer.scaling.keys()):
            if adapter_name is None or name == adapter_name:
                layer.set_scale(name, float(scale))


def set_active_adapters(model: nn.Module, names: list[str], components: Iterable[str] | None = None) -> None:
    """Make exactly `names` the active adapters (their updates are summed); the others stay loaded.

    PEFT marks the parameters of active adapters trainable; call from inference code only.
    """
    known = adapter_names(model)
    for name in names:
        if name not in known:
            raise LoraError(f"unknown adapter {name!r}; the model has {known}")
    for _, _, layer in iter_lora_layers(model, components):
        layer.set_adapter([n for n in names if n in layer.lora_A])


def _replace_with_base(model: nn.Module, component: str, path: str, layer: LoraLayer) -> None:
    module = get_component(model, component)
    parent_path, _, child = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, child, layer.get_base_layer())


def _unwrapped(model: nn.Module, components: Iterable[str] | None) -> list[str]:
    done = []
    for component in COMPONENTS if components is None else components:
        module = getattr(model, component, None)
        if module is None:
            continue
        if not any(isinstance(m, LoraLayer) for m in module.modules()) and hasattr(module, "peft_config"):
            del module.peft_config
        done.append(component)
    return done


def merge_lora(model: nn.Module, components: Iterable[str] | None = None) -> list[str]:
    """Merge the active adapters into the base weights (W += scale * B A, DoRA-aware) and remove the LoRA layers.

    Returns the merged '<component>.<path>' names. Non-finite merged weights raise (PEFT safe_merge).
    """
    merged = []
    for component, path, layer in list(iter_lora_layers(model, components)):
        active = [n for n in layer.active_adapters if n in layer.lora_A]
        if active:
            layer.merge(safe_merge=True, adapter_names=active)
        _replace_with_base(model, component, path, layer)
        merged.append(f"{component}.{path}")
    _unwrapped(model, components)
    return merged


def remove_lora(model: nn.Module, components: Iterable[str] | None = None) -> None:
    """Remove every LoRA layer without merging: the model computes the untouched base again."""
    for component, path, layer in list(iter_lora_layers(model, components)):
        if layer.merged:
            layer.unmerge()
        _replace_with_base(model, component, path, layer)
    _unwrapped(model, components)


def num_lora_params(model: nn.Module, *, adapter_name: str | None = DEFAULT_ADAPTER) -> int:
    """Number of LoRA parameters (of `adapter_name`; None = all adapters)."""
    return sum(p.numel() for p in lora_parameters(model, adapter_name=adapter_name))


def randomize_lora(
    model: nn.Module, *, seed: int, std: float = 0.1, adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Fill the adapter's A, B (and DoRA magnitude, around 1) with seeded random values: a stand-in for a
    trained adapter in tests and debugging."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, layer in iter_lora_layers(model):
            for part in LORA_PARTS:
                container = getattr(layer, part, None)
                if container is None or adapter_name not in container:
                    continue
                w = container[adapter_name].weight
                noise = torch.randn(w.shape, generator=g) * std
                w.copy_((w.float() * (1 + noise) if part == "lora_magnitude_vector" else noise).to(w.dtype))
