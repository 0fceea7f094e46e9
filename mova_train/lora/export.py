"""Export trained adapters for other tools: `peft`, `mova`, `mova-official`, `diffsynth`, `comfyui`, `merged`.

Input: a run dir (its latest checkpoint), a checkpoint dir holding `adapter/`, an adapter in any format this module
writes (folder or file); or, with `from_zero=True`, a checkpoint that only has a DeepSpeed ZeRO state.
Every written file is deterministic (sorted keys, no timestamps) and its metadata names the training config (local
absolute paths reduced to their last component), the base checkpoint identity and the step. Key layouts and what
each tool does with them: `mova_train.lora.formats`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mova_train import run_layout as layout
from mova_train.checkpoint_io import (
    SAFETENSORS_TO_TORCH,
    CheckpointError,
    read_component_header,
    read_json,
    read_safetensors_header,
    write_safetensors_streaming,
)
from mova_train.identity import base_identity
from mova_train.lora.adapters import (
    ADAPTER_WEIGHTS,
    META_BASE_IDENTITY,
    META_STEP,
    META_TRAINING_CONFIG,
    AdapterFormatError,
    adapter_metadata,
    check_adapter_state,
    save_adapters,
    targets_from_state,
)
from mova_train.lora.config import INIT_OPTIONS, LoraConfig, LoraError, lora_config_from_dict
from mova_train.lora.formats import (
    DIFFSYNTH_COMPONENTS,
    DIFFSYNTH_FILE,
    MERGED_RECORD,
    META_BAKED_SCALE,
    META_FORMAT,
    META_OFFICIAL_SHA256,
    OFFICIAL_CONFIG,
    OFFICIAL_LAYER_NAMES,
    OFFICIAL_WEIGHTS,
    PEFT_CONFIG,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    alpha_for_plain_scaling,
    comfyui_prefix,
    has_adapter,
    lora_scaling,
    official_unsupported,
    read_any_adapter,
)
from mova_train.lora.inject import extract_lora_state, parse_canonical_key
from mova_train.lora.safetensors_io import write_bytes_atomic, write_json, write_safetensors
from mova_train.names import WEIGHTS_NAME, adapter_key
from mova_train.progress import Progress

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("peft", "mova", "mova-official", "diffsynth", "comfyui", "merged")
EXPORT_RECORD = MERGED_RECORD
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
    recorded_checkpoint: str | None = None  # the run's model.checkpoint, when the source is inside a run dir

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


_ABS_PATH = re.compile(r"""(?<=[\s:'"\[,])/(?:[^\s'",\]}/]+/)*([^\s'",\]}/]+)""")


def strip_local_paths(text: str) -> str:
    """`text` (a training config) with every absolute path reduced to its last component: exported files name the
    base and the data by name, never by a path on the machine that trained them."""
    return _ABS_PATH.sub(r"\1", text)


def _recorded_checkpoint(ckpt_dir: Path | None) -> str | None:
    """`model.checkpoint` of the run's config.yaml, if the source is inside a run dir."""
    _, config_text = _run_files(ckpt_dir)
    if config_text is None:
        return None
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(OmegaConf.create(config_text), "model.checkpoint")
    except Exception:  # a config.yaml we cannot parse records nothing usable
        return None
    return str(value) if value else None


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
    meta[META_TRAINING_CONFIG] = strip_local_paths(meta[META_TRAINING_CONFIG])
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
    return AdapterSource(
        state,
        cfg,
        _fill_metadata({}, ckpt_dir),
        f"DeepSpeed checkpoint {zero_dir}",
        _recorded_checkpoint(ckpt_dir),
    )


def load_adapter_source(path: str | os.PathLike, *, from_zero: bool = False) -> AdapterSource:
    """Find and load the adapter of a run dir / checkpoint dir / adapter in any exported format (folder or file)."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p} does not exist")
    ckpt_dir: Path | None = None
    if layout.is_run_dir(p):
        p = _latest_checkpoint(p)
        log.info("exporting the latest checkpoint %s", p)
    if p.is_dir() and (layout.adapter_dir(p) / ADAPTER_WEIGHTS).is_file():
        adapter, ckpt_dir = layout.adapter_dir(p), p
    else:
        adapter = p
        folder = p if p.is_dir() else p.parent
        if folder.name == layout.ADAPTER_DIR and (folder.parent / layout.STATE_FILE).is_file():
            ckpt_dir = folder.parent
        zero_dir = _find_zero_dir(p) if p.is_dir() and not has_adapter(p) else None
        if zero_dir is not None:
            if not from_zero:
                raise ExportError(
                    f"{p} has no adapter/ folder, only the DeepSpeed ZeRO checkpoint {zero_dir}; consolidating it "
                    "unpickles DeepSpeed's .pt files, so pass --from-zero if you trust them (e.g. your own run)"
                )
            return _load_zero(p, zero_dir)
    if adapter.is_dir() and not has_adapter(adapter) and not (adapter / EXPORT_RECORD).is_file():
        raise ExportError(
            f"{adapter} holds no adapter: expected a run dir (checkpoints/step-*/), a checkpoint with adapter/, an "
            f"adapter in any exported format ({', '.join(EXPORT_FORMATS[:-1])}) or a DeepSpeed ZeRO checkpoint"
        )
    try:
        read = read_any_adapter(adapter)
    except LoraError as e:
        raise ExportError(str(e)) from None
    return AdapterSource(
        read.state,
        read.cfg,
        _fill_metadata(read.metadata, ckpt_dir),
        str(adapter),
        _recorded_checkpoint(ckpt_dir),
    )


# ---------------------------------------------------------------------------------------------- output


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
    meta.update({"format": "pt", META_FORMAT: fmt, **extra})
    return meta


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return state if dtype is None else {k: v.to(dtype) for k, v in state.items()}


def export_mova(source: AdapterSource, out: Path, *, dtype: torch.dtype | None = None) -> list[Path]:
    """out/adapters.safetensors (canonical keys, full metadata) + out/adapter_config.json."""
    save_adapters(out, None, source.cfg, metadata=source.metadata, state_dict=_cast(source.state, dtype))
    return [out / ADAPTER_WEIGHTS, out / "adapter_config.json"]


def peft_adapter_config(cfg: LoraConfig, paths: list[str]) -> dict:
    """The adapter_config.json of one component, with only fields every PEFT the project allows (>= 0.13) knows.

    PEFT before 0.14 refuses a config with a field it does not know, so writing the installed PEFT's whole config
    breaks older ones; these fields say everything our adapters use (unset fields take PEFT's defaults).
    """
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(paths),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": INIT_OPTIONS[cfg.init],
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def export_peft(source: AdapterSource, out: Path, *, dtype: torch.dtype | None = None) -> list[Path]:
    """One PEFT folder per component: adapter_config.json + adapter_model.safetensors (PeftModel naming)."""
    written = []
    for component, paths in source.targets.items():
        tensors = {}
        for _key, (path, part, value) in _component_state(source, component).items():
            # PEFT's on-disk names: base_model.model.<path>.lora_A.weight; DoRA magnitude without ".weight".
            suffix = "lora_magnitude_vector" if part == "lora_magnitude_vector" else f"{part}.weight"
            tensors[f"{PEFT_PREFIX}{path}.{suffix}"] = value
        folder = out / component
        meta = _file_metadata(source, "peft", {"component": component})
        write_safetensors(folder / PEFT_WEIGHTS, _cast(tensors, dtype), meta)
        write_json(folder / PEFT_CONFIG, peft_adapter_config(source.cfg, paths))
        written += [folder / PEFT_WEIGHTS, folder / PEFT_CONFIG]
    return written


def _refuse_dora(source: AdapterSource, fmt: str, why: str) -> None:
    if source.cfg.use_dora:
        raise ExportError(
            f"DoRA adapters cannot be exported as {fmt} faithfully ({why}); export --format merged"
        )


def export_comfyui(source: AdapterSource, out: Path, *, dtype: torch.dtype | None = None) -> list[Path]:
    """out/<component>.safetensors with `<prefix><path>.lora_A/.lora_B.weight` and `.alpha` per module.

    The video experts' prefix is `diffusion_model.` (ComfyUI, DiffSynth and diffusers load them as Wan 2.1 LoRAs);
    the audio tower's and the bridge's keys keep their component name, so no Wan loader maps them onto video blocks
    (no ComfyUI loader supports them: they are written for completeness and for our own sampler).
    """
    _refuse_dora(source, "comfyui", "its dora_scale normalises differently from PEFT")
    # ComfyUI scales by alpha / rank; rsLoRA's alpha/sqrt(rank) is expressed through an adjusted alpha.
    alpha = alpha_for_plain_scaling(source.cfg)
    written = []
    for component in source.targets:
        prefix = comfyui_prefix(component)
        tensors = {}
        for _key, (path, part, value) in _component_state(source, component).items():
            tensors[f"{prefix}{path}.{part}.weight"] = value
            tensors[f"{prefix}{path}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        meta = _file_metadata(source, "comfyui", {"component": component})
        alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
        file = out / f"{component}.safetensors"
        write_safetensors(file, {**_cast(tensors, dtype), **alphas}, meta)
        written.append(file)
    return written


def _torch_save_bytes(obj: object) -> bytes:
    """torch.save into memory: the same object gives the same bytes (the archive is named `archive`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def export_mova_official(source: AdapterSource, out: Path, *, dtype: torch.dtype | None = None) -> list[Path]:
    """What the official `MOVALoRA.load_lora(out)` reads: `lora_weights.pt` (canonical keys, plain tensors) and
    `lora_config.pt` (`rank`, `alpha`, `target_modules` = the components), both loadable with
    `torch.load(..., weights_only=True)`; plus `adapters.safetensors`, the same tensors, which this project reads
    (it never unpickles) after checking `lora_weights.pt`'s sha256 against it."""
    _refuse_dora(source, "mova-official", "the official LoRA layers have no magnitude vector")
    unsupported = official_unsupported(source.targets)
    if unsupported:
        raise ExportError(
            f"the official MOVA loader wraps only layers named {', '.join(OFFICIAL_LAYER_NAMES)}; this adapter also "
            f"trains {len(unsupported)} other module(s) ({', '.join(unsupported[:3])}"
            f"{', ...' if len(unsupported) > 3 else ''}), which it would leave out without a word. Export "
            "--format merged (the official pipeline loads it as a base checkpoint), or train attention-only presets"
        )
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in _cast(source.state, dtype).items()}
    weights = _torch_save_bytes({k: state[k] for k in sorted(state)})
    config = {
        "rank": int(source.cfg.rank),
        "alpha": float(alpha_for_plain_scaling(source.cfg)),
        "target_modules": sorted(source.targets),
    }
    write_bytes_atomic(out / OFFICIAL_WEIGHTS, weights)
    write_bytes_atomic(out / OFFICIAL_CONFIG, _torch_save_bytes(config))
    twin_meta = {
        **source.metadata,
        META_FORMAT: "mova-official",
        META_OFFICIAL_SHA256: hashlib.sha256(weights).hexdigest(),
    }
    save_adapters(out, None, source.cfg, metadata=twin_meta, state_dict=state)
    return [out / OFFICIAL_WEIGHTS, out / OFFICIAL_CONFIG, out / ADAPTER_WEIGHTS, out / "adapter_config.json"]


def export_diffsynth(source: AdapterSource, out: Path, *, dtype: torch.dtype | None = None) -> list[Path]:
    """out/diffsynth_lora.safetensors for DiffSynth-Studio's MOVA pipeline: keys `<its component name>.<path>.
    lora_A/.lora_B.weight` (the second expert is `video_dit2`), no alpha (its loader applies B@A at scale 1), so
    alpha/rank is baked into lora_B. Load: `pipe.load_lora(pipe, "OUT/diffsynth_lora.safetensors")`."""
    _refuse_dora(source, "diffsynth", "its LoRA loader has no magnitude vector")
    scale = lora_scaling(source.cfg)
    tensors = {}
    for key, value in source.state.items():
        component, path, part = parse_canonical_key(key)
        out_dtype = dtype or value.dtype
        if part == "lora_B":
            value = (value.double() * scale).to(out_dtype)
        tensors[f"{DIFFSYNTH_COMPONENTS[component]}.{path}.{part}.weight"] = value.to(out_dtype)
    meta = _file_metadata(source, "diffsynth", {META_BAKED_SCALE: repr(float(scale))})
    write_safetensors(out / DIFFSYNTH_FILE, tensors, meta)
    return [out / DIFFSYNTH_FILE]


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


def _base_for_merge(source: AdapterSource, checkpoint: str | os.PathLike | None) -> Path:
    """--checkpoint, or else the base the run recorded (`model.checkpoint` of its config.yaml)."""
    if checkpoint is not None:
        base = Path(checkpoint)
        if not base.is_dir():
            raise ExportError(f"--checkpoint {base} is not a folder")
        return base
    if source.recorded_checkpoint is None:
        raise ExportError(
            f"--format merged needs the base checkpoint: {source.origin} is not inside a run dir that records "
            "model.checkpoint, so pass --checkpoint BASE_DIR"
        )
    base = Path(source.recorded_checkpoint)
    if not base.is_dir():
        raise ExportError(
            f"the run was trained on model.checkpoint={source.recorded_checkpoint}, which is not a folder here; "
            "pass --checkpoint BASE_DIR"
        )
    log.info("merging into the run's base checkpoint %s", base)
    return base


def export_merged(
    source: AdapterSource,
    out: Path,
    *,
    checkpoint: str | os.PathLike | None = None,
    scale: float = 1.0,
    allow_base_mismatch: bool = False,
) -> list[Path]:
    """A full checkpoint folder with the adapters merged into the base weights, in the released layout.

    The base is `checkpoint`, or the one the run recorded. Components without adapters (and everything else in the
    base folder) are copied byte for byte; merged components keep the base's file names, shard assignment, index
    and per-tensor dtypes, and are written tensor by tensor (peak memory about one tensor, not one shard).
    """
    base = _base_for_merge(source, checkpoint)
    if out.resolve() == base.resolve():
        raise ExportError("--out must differ from the base checkpoint (the base is never modified)")
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
    factor = scale * lora_scaling(source.cfg)
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
        written.append(_merge_file(entry, dest / entry.name, component, by_weight, state, factor, meta))
    return written


def _merge_file(
    src: Path,
    dst: Path,
    component: str,
    by_weight: dict[str, str],
    state: dict[str, torch.Tensor],
    factor: float,
    meta: dict[str, str],
) -> Path:
    """Stream one base file to `dst`, merging the targeted weights, one tensor in memory at a time."""
    try:
        header = read_safetensors_header(src)
    except CheckpointError as e:
        raise ExportError(f"base component {component}: {e}") from e
    file_meta = header.entries.get("__metadata__") or {}
    specs = {}
    for key, entry in header.entries.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_TO_TORCH.get(entry["dtype"])
        if dtype is None:
            raise ExportError(f"{src}: tensor {key} has dtype {entry['dtype']}, which the merge cannot write")
        specs[key] = (dtype, list(entry["shape"]))
    progress = Progress(total=len(specs), desc=f"merge {component}/{src.name}", unit="tensor")
    with open(src, "rb") as f, progress:

        def tensor_for(key: str) -> torch.Tensor:
            progress.update(1)
            # read into fresh memory (not an mmap view): a written tensor is freed, so memory stays one tensor
            begin, end = header.entries[key]["data_offsets"]
            f.seek(header.data_start + begin)
            data = bytearray(end - begin)
            if f.readinto(data) != len(data):
                raise ExportError(f"{src} is truncated at tensor {key} (re-download the base)")
            dtype, shape = specs[key]
            tensor = (
                torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)
                if data
                else torch.empty(shape, dtype=dtype)
            )
            path = by_weight.get(key)
            if path is None:
                return tensor
            return _merge_weight(
                tensor,
                state[adapter_key(component, path, "lora_A")],
                state[adapter_key(component, path, "lora_B")],
                state.get(adapter_key(component, path, "lora_magnitude_vector")),
                factor,
            )

        write_safetensors_streaming(dst, specs, tensor_for, {**file_meta, **meta})
    return dst


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
    if fmt == "mova-official":
        return export_mova_official(source, out, dtype=torch_dtype)
    if fmt == "diffsynth":
        return export_diffsynth(source, out, dtype=torch_dtype)
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
    "export_diffsynth",
    "export_merged",
    "export_mova",
    "export_mova_official",
    "export_peft",
    "load_adapter_source",
    "peft_adapter_config",
]
