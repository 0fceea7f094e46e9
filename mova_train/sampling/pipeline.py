"""The sampling pipeline: base model + codecs + scheduler + LoRA adapters, with optional expert offloading.

With `offload_experts=True` only one 14B video expert is resident at a time: the high-noise expert is loaded for
its steps, freed, then the low-noise expert is loaded (adapters are merged into each expert as it loads).
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mova_train.checkpoint_io import CheckpointError
from mova_train.models import FlowMatchScheduler
from mova_train.names import COMPONENTS, EXPERTS, SHARED_COMPONENTS
from mova_train.sampling.inputs import LoraSpec, SamplingError, parse_lora_spec

log = logging.getLogger(__name__)


@dataclass
class LoadedAdapter:
    """An adapter read from disk, to be merged with `scale` into the components it targets."""

    path: str
    scale: float
    state: dict[str, torch.Tensor]
    config: object  # mova_train.lora.LoraConfig (imported lazily: peft is slow to import)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return sorted(self.config.targets)


def load_adapter(spec: LoraSpec | str, *, base_identity: str | None = None) -> LoadedAdapter:
    """Read and validate one adapter: an adapter folder or `.safetensors` file (save_adapters / export --format
    mova), a training checkpoint folder (its `adapter/`), or a run folder (its latest checkpoint).

    With `base_identity` (mova_train.lora.base_identity of the checkpoint), an adapter that records another base
    is refused; rank/shape mismatches against the model surface when it is merged.
    """
    from mova_train.lora import LoraError, check_base_identity
    from mova_train.lora.export import load_adapter_source

    if isinstance(spec, str):
        spec = parse_lora_spec(spec)
    if not Path(spec.path).exists():
        raise SamplingError(f"--lora {spec.path}: no such adapter file or folder")
    try:
        source = load_adapter_source(spec.path)
        check_base_identity(source.metadata, base_identity, source=source.origin)
    except (LoraError, CheckpointError) as exc:
        raise SamplingError(f"--lora {spec.path}: {exc}") from exc
    return LoadedAdapter(source.origin, float(spec.scale), source.state, source.cfg, dict(source.metadata))


def merge_adapters(model, adapters: Sequence[LoadedAdapter], components: Sequence[str]) -> None:
    """Merge each adapter with its scale into `components` of `model` (W += scale · B A with the LoRA scaling).

    One adapter at a time: inject, load, scale, merge, unwrap; so several adapters add up and the model is left
    without PEFT wrappers (no per-step LoRA cost while sampling).
    """
    from mova_train.lora import LoraError, apply_adapters, merge_lora

    for number, adapter in enumerate(adapters):
        wanted = {c for c in adapter.components if c in components and getattr(model, c, None) is not None}
        # canonical keys are "<component>.<module path>.lora_A.weight"
        state = {k: v for k, v in adapter.state.items() if k.partition(".")[0] in wanted}
        if not state:
            continue
        try:
            apply_adapters(
                model,
                (state, adapter.config, adapter.metadata),
                adapter_name=f"sample{number}",
                scale=adapter.scale,
            )
            merge_lora(model, sorted(wanted))
        except LoraError as exc:
            raise SamplingError(f"--lora {adapter.path}: {exc}") from exc


class MovaPipeline:
    """What the sampler needs: model, codecs, scheduler, the MoE boundary, and where to load experts from."""

    def __init__(
        self,
        model,
        codecs,
        scheduler: FlowMatchScheduler,
        *,
        boundary_ratio: float,
        checkpoint_dir: str | os.PathLike | None = None,
        offload_experts: bool = False,
        adapters: Sequence[LoadedAdapter] = (),
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if offload_experts and checkpoint_dir is None:
            raise SamplingError("offload_experts needs the checkpoint folder to reload experts from")
        self.model = model
        self.codecs = codecs
        self.scheduler = scheduler
        self.boundary_ratio = float(boundary_ratio)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.offload_experts = bool(offload_experts)
        self.adapters = list(adapters)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else _module_device(model)
        self.num_expert_loads = (
            0  # how often an expert was (re)loaded from disk; the offload bench reports it
        )

    @classmethod
    def from_model(cls, model, codecs, *, scheduler: FlowMatchScheduler | None = None) -> MovaPipeline:
        """Wrap an in-memory model (e.g. the one being trained, adapters attached) for sampling.

        DDP / DeepSpeed engine wrappers are looked through (`.module`). Adapters stay as they are (live PEFT
        layers, never merged: under ZeRO-3 the weights are partitioned, and each module's forward gathers them, so
        every rank must run the same forwards).
        """
        while not hasattr(model, "config") and hasattr(model, "module"):
            model = model.module
        for expert in EXPERTS:
            if getattr(model, expert, None) is None:
                raise SamplingError(
                    f"the model has no {expert} loaded; sampling needs both experts (or use load_pipeline with "
                    "offload_experts=True)"
                )
        return cls(
            model,
            codecs,
            scheduler if scheduler is not None else FlowMatchScheduler.from_config(model.config.scheduler),
            boundary_ratio=model.config.boundary_ratio,
            dtype=_module_dtype(model),
        )

    @property
    def boundary(self) -> float:
        """The MoE boundary timestep (900 for the release's ratio 0.9)."""
        return float(self.scheduler.boundary_timestep(self.boundary_ratio))

    def resident_experts(self) -> list[str]:
        return [e for e in EXPERTS if getattr(self.model, e, None) is not None]

    def ensure_expert(self, expert: str) -> None:
        """Make `expert` resident; with offloading, free the other expert first."""
        if expert not in EXPERTS:
            raise SamplingError(f"unknown expert {expert!r}; experts: {', '.join(EXPERTS)}")
        if self.offload_experts:
            for other in EXPERTS:
                if other != expert and getattr(self.model, other, None) is not None:
                    setattr(self.model, other, None)
                    gc.collect()
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
        if getattr(self.model, expert, None) is not None:
            return
        if self.checkpoint_dir is None:
            raise SamplingError(f"the model has no {expert} loaded and no checkpoint folder to load it from")
        from mova_train.models import load_mova

        log.info("loading %s from %s", expert, self.checkpoint_dir)
        loaded = load_mova(self.checkpoint_dir, components=(expert,), dtype=self.dtype, device=self.device)
        setattr(self.model, expert, getattr(loaded, expert))
        self.num_expert_loads += 1
        merge_adapters(self.model, self.adapters, (expert,))
        self.model.eval()

    def compute_dtype(self, expert: str) -> torch.dtype:
        module = getattr(self.model, expert, None)
        if module is None:
            raise SamplingError(f"expert {expert} is not resident")
        return _module_dtype(module)


def _module_device(module) -> torch.device:
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def _module_dtype(module) -> torch.dtype:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def load_pipeline(
    checkpoint_dir: str | os.PathLike,
    *,
    loras: Sequence[LoraSpec | str] = (),
    offload_experts: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    codecs=None,
) -> MovaPipeline:
    """Load base checkpoint + adapters for sampling. Adapters are read and checked before any large weight loads.

    Codecs are loaded from the checkpoint on `device` (the audio VAE in fp32, as the spec recommends) unless given.
    """
    from mova_train.codecs import load_codecs
    from mova_train.models import load_mova

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise SamplingError(f"--checkpoint {checkpoint_dir}: no such folder")
    identity = None
    if loras:
        from mova_train.lora import base_identity

        identity = base_identity(checkpoint_dir)
    adapters = [load_adapter(spec, base_identity=identity) for spec in loras]
    components = SHARED_COMPONENTS if offload_experts else COMPONENTS
    # the model config carries the checkpoint's scheduler_config.json and model_index.json boundary_ratio
    model = load_mova(checkpoint_dir, components=components, dtype=dtype, device=device)
    merge_adapters(model, adapters, components)
    model.eval()
    if codecs is None:
        codecs = load_codecs(checkpoint_dir, device=device, dtype=dtype)
    return MovaPipeline(
        model,
        codecs,
        FlowMatchScheduler.from_config(model.config.scheduler),
        boundary_ratio=model.config.boundary_ratio,
        checkpoint_dir=checkpoint_dir,
        offload_experts=offload_experts,
        adapters=adapters,
        device=device,
        dtype=dtype,
    )
