"""Export trained adapters for other tools: `peft`, `mova`, `comfyui` and `merged` (issue #6).

Input: a run dir (its latest checkpoint), a checkpoint dir holding `adapter/`, an `adapter/` folder or an
adapters .safetensors file; or, with `from_zero=True`, a checkpoint that only has a DeepSpeed ZeRO state.
Every written file is deterministic (sorted keys, no timestamps) and its metadata names the training config,
the base checkpoint identity and the step.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mova_train import run_layout as layout
from mova_train.checkpoint_io import CheckpointError, read_component_header, read_json
from mova_train.identity import base_identity
from mova_train.lora.adapters import (
    ADAPTER_WEIGHTS,
    META_BASE_IDENTITY,
    META_STEP,
    META_TRAINING_CONFIG,
    AdapterFormatError,
    adapter_metadata,
    check_adapter_state,
    load_adapters,
    save_adapters,
    targets_from_state,
)
from mova_train.lora.config import LoraConfig, LoraError, lora_config_from_dict
from mova_train.lora.inject import extract_lora_state, parse_canonical_key
from mova_train.lora.safetensors_io import read_safetensors, write_json, write_safetensors
from mova_train.names import WEIGHTS_NAME, adapter_key

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("peft", "mova", "comfyui", "merged")
EXPORT_RECORD = "mova_train_export.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(LoraError):
    """Export input/output problem (the message names the path or option)."""


@dataclass
class AdapterSource:
    """A trained adapter, wherever it came from, with the metadata every export carries."""

    state: dict[str, torch.Tensor]  # canonical keys
    cfg: LoraConfig
    metadata: dict[str, str]  # includes step, base_identity, training_config
    origin: str

    @property
    def targets(self) -> dict[str, list[str]]:
        return targets_from_state(self.state)


# ----------------------------------------------------------------------------------------------- input


def _latest_checkpoint(run_dir: Path) -> Path:
    latest = layout.latest_checkpoint(run_dir)
    if latest is None:
        raise ExportError(
            f"run dir {run_dir} has no complete checkpoint ({layout.CHECKPOINTS_DIR}/step-*/ with {layout.STATE_FILE})"
        )
    return latest


def _find_zero_dir(ckpt_dir: Path) -> Path | None:
    """The DeepSpeed tag folder (holding *_model_states.pt) under a checkpoint dir, if any."""
    hits = sorted({p.parent for p in ckpt_dir.rglob("*_model_states.pt")})
    if len(hits) > 1:
        raise ExportError(f"{ckpt_dir} holds several DeepSpeed checkpoints: {[str(h) for h in hits]}")
    return hits[0] if hits else None


def _run_files(ckpt_dir: Path | None) -> tuple[dict, str | None]:
    """(trainer_state.json of the checkpoint, text of the run's config.yaml) when they exist."""
    if ckpt_dir is None:
        return {}, None
    state_file = ckpt_dir / layout.STATE_FILE
    trainer_state = read_json(state_file) if state_file.is_file() else {}
    config_file = layout.run_dir_of(ckpt_dir) / layout.CONFIG_FILE
    config_text = config_file.read_text(encoding="utf-8") if config_file.is_file() else None
    return trainer_state, config_text


def _fill_metadata(metadata: dict[str, str], ckpt_dir: Path | None) -> dict[str, str]:
    """Complete step / base identity / training config from the run's own files where the adapter lacks them."""
    meta = dict(metadata)
    trainer_state, config_text = _run_files(ckpt_dir)
    if not meta.get(META_STEP):
        if "step" in trainer_state:
            meta[META_STEP] = str(trainer_state["step"])
        elif ckpt_dir is not None and layout.checkpoint_step(ckpt_dir) is not None:
            meta[META_STEP] = str(layout.checkpoint_step(ckpt_dir))
    if not meta.get(META_BASE_IDENTITY) and trainer_state.get("base_identity"):
        meta[META_BASE_IDENTITY] = str(trainer_state["base_identity"])
    if not meta.get(META_TRAINING_CONFIG) and config_text is not None:
        meta[META_TRAINING_CONFIG] = config_text
    for key in (META_STEP, META_BASE_IDENTITY, META_TRAINING_CONFIG):
        if not meta.get(key):
            log.warning("the adapter records no %r; the exported files say 'unknown'", key)
            meta[key] = "unknown"
    return meta


def _load_zero(ckpt_dir: Path, zero_dir: Path) -> AdapterSource:
    trainer_state, config_text = _run_files(ckpt_dir)
    lora_node = trainer_state.get("lora")
    where = f"{ckpt_dir / layout.STATE_FILE} (lora)"
    if lora_node is None and config_text is not None:
        from omegaconf import OmegaConf

        node = OmegaConf.create(config_text)
        lora_node = node.get("lora")
        where = f"{layout.run_dir_of(ckpt_dir) / layout.CONFIG_FILE} (lora)"
    if lora_node is None:
        raise ExportError(
            f"{ckpt_dir} has only a DeepSpeed checkpoint and no LoRA config was found in trainer_state.json "
            f"or the run's config.yaml; cannot tell alpha/rank"
        )
    cfg = lora_config_from_dict(lora_node, where=where)
    # DeepSpeed's own consolidation; it unpickles the *.pt files, hence the explicit from_zero opt-in.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(
        str(zero_dir.parent), tag=zero_dir.name, exclude_frozen_parameters=True
    )
    state = extract_lora_state(full)
    if not state:
        raise ExportError(f"the DeepSpeed checkpoint {zero_dir} holds no LoRA parameters")
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    check_adapter_state(state, cfg, source=str(zero_dir))
    return AdapterSource(state, cfg, _fill_metadata({}, ckpt_dir), f"DeepSpeed checkpoint {zero_dir}")


def load_adapter_source(path: str | os.PathLike, *, from_zero: bool = False) -> AdapterSource:
    """Find and load the adapter of a run dir / checkpoint dir / adapter folder / adapter file."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p} does not exist")
    ckpt_dir: Path | None = None
    if layout.is_run_dir(p):
        p = _latest_checkpoint(p)
        log.info("exporting the latest checkpoint %s", p)
    if p.is_file() or (p / ADAPTER_WEIGHTS).is_file():
        adapter = p
        if p.is_dir() and p.name == layout.ADAPTER_DIR:
            ckpt_dir = p.parent
    elif (layout.adapter_dir(p) / ADAPTER_WEIGHTS).is_file():
        adapter, ckpt_dir = layout.adapter_dir(p), p
    else:
        zero_dir = _find_zero_dir(p) if p.is_dir() else None
        if zero_dir is None:
            raise ExportError(
                f"{p} holds no adapter: expected {ADAPTER_WEIGHTS}, adapter/{ADAPTER_WEIGHTS}, "
                "checkpoints/step-*/ (a run dir) or a DeepSpeed ZeRO checkpoint"
            )
        if not from_zero:
            raise ExportError(
                f"{p} has no adapter/ folder, only the DeepSpeed ZeRO checkpoint {zero_dir}; consolidating it "
                "unpickles DeepSpeed's .pt files, so pass --from-zero if you trust them (e.g. your own run)"
            )
        return _load_zero(p, zero_dir)
    state, cfg, metadata = load_adapters(adapter)
    return AdapterSource(state, cfg, _fill_metadata(metadata, ckpt_dir), str(adapter))


# ---------------------------------------------------------------------------------------------- output


def _scaling(cfg: LoraConfig) -> float:
    return cfg.alpha / math.sqrt(cfg.rank) if cfg.use_rslora else cfg.alpha / cfg.rank


def _component_state(source: AdapterSource, component: str) -> dict[str, tuple[str, str, torch.Tensor]]:
    """canonical key -> (path, part, tensor) for one component."""
    out = {}
    for key, value in source.state.items():
        c, path, part = parse_canonical_key(key)
        if c == component:
            out[key] = (path, part, value)
    return out


def _file_metadata(source: AdapterSource, fmt: str, extra: dict[str, str]) -> dict[str, str]:
    meta = adapter_metadata(source.cfg, source.targets, source.metadata)
    # `format: pt` is what transformers/ComfyUI-style loaders expect of a torch safetensors file.
    meta.update({"format": "pt", "mova_train_format": fmt, **extra})
    return meta


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return state if dtype is None else {k: v.to(dtype) for k, v in state.items()}


def export_mova(source: AdapterSource, out: Path, *, dtype: torch.dtype | None = None) -> list[Path]:
    """out/adapters.safetensors (canonical keys, full metadata) + out/adapter_config.json."""
    save_adapters(out, None, source.cfg, metadata=source.metadata, state_dict=_cast(source.state, dtype))
    return [out / ADAPTER_WEIGHTS, out / "adapter_config.json"]


def peft_adapter_config(cfg: LoraConfig, paths: list[str]) -> dict:
    """The adapter_config.json PEFT writes for this component (sets as sorted lists)."""
    from mova_train.lora.inject import build_peft_config

    peft_cfg = build_peft_config(cfg, paths)
    peft_cfg.inference_mode = True
    d = peft_cfg.to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


def export_peft(source: AdapterSource, out: Path, *, dtype: torch.dtype | None = None) -> list[Path]:
    """One PEFT folder per component: adapter_config.json + adapter_model.safetensors (PeftModel naming)."""
    written = []
    for component, paths in source.targets.items():
        tensors = {}
        for _key, (path, part, value) in _component_state(source, component).items():
            # PEFT's on-disk names: base_model.model.<path>.lora_A.weight; DoRA magnitude without ".weight".
            suffix = "lora_magnitude_vector" if part == "lora_magnitude_vector" else f"{part}.weight"
            tensors[f"base_model.model.{path}.{suffix}"] = value
        folder = out / component
        meta = _file_metadata(source, "peft", {"component": component})
        write_safetensors(folder / "adapter_model.safetensors", _cast(tensors, dtype), meta)
        write_json(folder / "adapter_config.json", peft_adapter_config(source.cfg, paths))
        written += [folder / "adapter_model.safetensors", folder / "adapter_config.json"]
    return written


def export_comfyui(source: AdapterSource, out: Path, *, dtype: torch.dtype | None = None) -> list[Path]:
    """out/<component>.safetensors with `diffusion_model.<path>.lora_A/.lora_B.weight` and `.alpha` per module."""
    if source.cfg.use_dora:
        raise ExportError(
            "DoRA adapters cannot be exported for ComfyUI faithfully (its dora_scale normalises differently "
            "from PEFT); export --format merged instead"
        )
    # ComfyUI scales by alpha / rank; rsLoRA's alpha/sqrt(rank) is expressed through an adjusted alpha.
    alpha = source.cfg.alpha * math.sqrt(source.cfg.rank) if source.cfg.use_rslora else source.cfg.alpha
    written = []
    for component in source.targets:
        tensors = {}
        for _key, (path, part, value) in _component_state(source, component).items():
            tensors[f"diffusion_model.{path}.{part}.weight"] = value
            tensors[f"diffusion_model.{path}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        meta = _file_metadata(source, "comfyui", {"component": component})
        alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
        file = out / f"{component}.safetensors"
        write_safetensors(file, {**_cast(tensors, dtype), **alphas}, meta)
        written.append(file)
    return written


def _merge_weight(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """W + scale*B@A in fp32 (DoRA: rescaled row-wise to the magnitude), cast back to W's dtype."""
    w = weight.float()
    merged = w + scale * (b.float() @ a.float())
    if magnitude is not None:
        norm = merged.norm(p=2, dim=1)
        merged = merged * (magnitude.float() / norm).unsqueeze(1)
    return merged.to(weight.dtype)


def export_merged(
    source: AdapterSource,
    out: Path,
    *,
    checkpoint: str | os.PathLike,
    scale: float = 1.0,
    allow_base_mismatch: bool = False,
) -> list[Path]:
    """A full checkpoint folder with the adapters merged into the base weights, in the released layout.

    Components without adapters (and everything else in the base folder) are copied byte for byte; merged
    components keep the base's file names, shard assignment, index and per-tensor dtypes.
    """
    base = Path(checkpoint)
    if not base.is_dir():
        raise ExportError(f"--checkpoint {base} is not a folder")
    if out.resolve() == base.resolve():
        raise ExportError("--out must differ from --checkpoint (the base is never modified)")
    recorded = source.metadata.get(META_BASE_IDENTITY, "unknown")
    identity = base_identity(base)
    if recorded not in ("", "unknown") and recorded != identity:
        message = (
            f"the adapter ({source.origin}) was trained on another base checkpoint: it records base identity "
            f"{recorded}, {base} is {identity}"
        )
        if not allow_base_mismatch:
            raise ExportError(
                message + " (pass --allow-base-mismatch to merge anyway; shapes are still checked)"
            )
        log.warning(message)
    factor = scale * _scaling(source.cfg)
    targets = source.targets
    meta = _file_metadata(source, "merged", {"merged_scale": repr(float(scale)), "merged_into": identity})
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in sorted(base.iterdir()):
        dest = out / entry.name
        if entry.name in targets:
            written += _merge_component(entry, dest, source, targets[entry.name], factor, meta)
        elif entry.is_dir():
            shutil.copytree(entry, dest, dirs_exist_ok=True)
        else:
            shutil.copyfile(entry, dest)
    record = {k: v for k, v in meta.items() if k != "format"}
    write_json(out / EXPORT_RECORD, record)
    return written + [out / EXPORT_RECORD]


def _merge_component(
    folder: Path, dest: Path, source: AdapterSource, paths: list[str], factor: float, meta: dict[str, str]
) -> list[Path]:
    component = folder.name
    try:
        header = read_component_header(folder, weights_name=WEIGHTS_NAME)
    except CheckpointError as e:
        raise ExportError(f"base component {component}: {e}") from e
    state = source.state
    by_weight = {f"{p}.weight": p for p in paths}
    for key, path in by_weight.items():
        if key not in header:
            raise ExportError(
                f"the adapter targets {component}.{path}, but {folder} has no {key} (adapter for another base?)"
            )
        shape = tuple(header[key][0])
        a = state[adapter_key(component, path, "lora_A")]
        b = state[adapter_key(component, path, "lora_B")]
        if shape != (b.shape[0], a.shape[1]):
            raise ExportError(
                f"{component}.{path}: base weight {list(shape)} does not fit lora_B {list(b.shape)} @ lora_A "
                f"{list(a.shape)} — the adapter was trained on another base"
            )
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix != ".safetensors":
            shutil.copyfile(entry, dest / entry.name)  # config.json and the index (same keys, files, sizes)
            continue
        tensors, file_meta = read_safetensors(entry)
        for key in sorted(set(tensors) & set(by_weight)):
            path = by_weight[key]
            magnitude = state.get(adapter_key(component, path, "lora_magnitude_vector"))
            tensors[key] = _merge_weight(
                tensors[key],
                state[adapter_key(component, path, "lora_A")],
                state[adapter_key(component, path, "lora_B")],
                magnitude,
                factor,
            )
        write_safetensors(dest / entry.name, tensors, {**file_meta, **meta})
        written.append(dest / entry.name)
    return written


def export_adapter(
    source_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    fmt: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    scale: float = 1.0,
    dtype: str | None = None,
    from_zero: bool = False,
    allow_base_mismatch: bool = False,
) -> list[Path]:
    """Export the adapter found at `source_path` to `out_dir` in `fmt`; returns the files written."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    if dtype is not None and dtype not in _DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
    if fmt == "merged":
        if checkpoint is None:
            raise ExportError(
                "--format merged needs --checkpoint BASE_DIR (the base checkpoint to merge into)"
            )
        if dtype is not None:
            raise ExportError(
                "--dtype does not apply to --format merged (merged weights keep the base's dtypes)"
            )
    elif scale != 1.0:
        raise ExportError(
            "--scale only applies to --format merged (other formats keep alpha; scale at load time)"
        )
    if not math.isfinite(scale):
        raise ExportError(f"--scale must be finite, got {scale}")
    source = load_adapter_source(source_path, from_zero=from_zero)
    out = Path(out_dir)
    torch_dtype = _DTYPES[dtype] if dtype else None
    if fmt == "mova":
        return export_mova(source, out, dtype=torch_dtype)
    if fmt == "peft":
        return export_peft(source, out, dtype=torch_dtype)
    if fmt == "comfyui":
        return export_comfyui(source, out, dtype=torch_dtype)
    return export_merged(
        source, out, checkpoint=checkpoint, scale=scale, allow_base_mismatch=allow_base_mismatch
    )


__all__ = [
    "EXPORT_FORMATS",
    "AdapterFormatError",
    "AdapterSource",
    "ExportError",
    "export_adapter",
    "export_comfyui",
    "export_merged",
    "export_mova",
    "export_peft",
    "load_adapter_source",
    "peft_adapter_config",
]
