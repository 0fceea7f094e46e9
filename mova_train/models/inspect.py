"""Parameter names, shapes and counts of a MOVA checkpoint folder or a named config (built on `meta`).

The command line is `python -m mova_train.cli.inspect` (--config NAME | --checkpoint DIR, --json, --lora NAME).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint_io import CheckpointError, read_component_header
from ..codecs import build_codec_modules
from ..names import CODEC_COMPONENTS, COMPONENTS, EXPERTS, INDEX_SUFFIX, SHARED_COMPONENTS
from .checkpoint import read_mova_config
from .mova import MovaModel, build_mova

# Names that hold one tensor twice (tied); counted once.
TIED_KEYS = {"text_encoder": (("encoder.embed_tokens.weight", "shared.weight"),)}


@dataclass
class Inspection:
    """What `inspect` found. `model` holds the diffusion components on `meta` so that extensions (e.g. LoRA target
    listing) can resolve module paths without loading weights."""

    source: str
    shapes: dict[str, dict[str, list[int]]]  # component -> {param name: shape}
    model: MovaModel | None = None
    notes: list[str] = field(default_factory=list)

    def num_params(self, component: str) -> int:
        shapes = self.shapes.get(component, {})
        total = sum(math.prod(s) for s in shapes.values())
        for alias, source in TIED_KEYS.get(component, ()):
            if alias in shapes and source in shapes:
                total -= math.prod(shapes[alias])
        return total


def inspect_config(name: str) -> Inspection:
    """Shapes of every component of a named config, all built on `meta` (nothing allocated)."""
    model = build_mova(name, device="meta")
    shapes = {c: _module_shapes(getattr(model, c)) for c in COMPONENTS}
    notes: list[str] = []
    for c, module in build_codec_modules(name, device="meta").items():
        shapes[c] = _module_shapes(module)
    return Inspection(source=f"config {name}", shapes=shapes, model=model, notes=notes)


def _module_shapes(module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _weights_name(folder: Path) -> str | None:
    """`model` / `diffusion_pytorch_model` / ...: the stem of the index file or the single safetensors file."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        return indexes[0].name[: -len(INDEX_SUFFIX)]
    singles = sorted(p for p in folder.glob("*.safetensors") if "-of-" not in p.name)
    if singles:
        return singles[0].name[: -len(".safetensors")]
    return None


def inspect_checkpoint(path: str | Path) -> Inspection:
    """Shapes of every component folder present, read from the safetensors headers only (no tensor data)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    shapes: dict[str, dict[str, list[int]]] = {}
    notes: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        weights = _weights_name(folder)
        if weights is None:
            continue
        header = read_component_header(folder, weights_name=weights)
        shapes[folder.name] = {k: list(v[0]) for k, v in sorted(header.items())}
    if not shapes:
        raise CheckpointError(f"{root}: no component folder with safetensors weights")
    present = [c for c in COMPONENTS if c in shapes]
    model = None
    if present:
        # The shapes above come from the files alone; building from the configs is extra and may fail on its own.
        try:
            model = build_mova(read_mova_config(root), components=present, device="meta")
        except ValueError as e:
            notes.append(f"diffusion components not built from their configs: {e}")
    return Inspection(source=f"checkpoint {root}", shapes=shapes, model=model, notes=notes)


def format_counts(insp: Inspection) -> str:
    lines = [f"MOVA parameters ({insp.source})", f"{'component':<22}{'tensors':>9}{'parameters':>20}"]
    for c, shapes in insp.shapes.items():
        lines.append(f"{c:<22}{len(shapes):>9}{insp.num_params(c):>20,}")
    have = [c for c in COMPONENTS if c in insp.shapes]
    if have:
        total = sum(insp.num_params(c) for c in have)
        experts = [insp.num_params(c) for c in EXPERTS if c in insp.shapes]
        active = (max(experts) if experts else 0) + sum(
            insp.num_params(c) for c in SHARED_COMPONENTS if c in insp.shapes
        )
        lines.append(f"{'total diffusion':<31}{total:>20,}   ({', '.join(have)})")
        lines.append(f"{'active per step':<31}{active:>20,}   (one expert + audio_dit + dual_tower_bridge)")
    codecs = [c for c in CODEC_COMPONENTS if c in insp.shapes]
    if codecs:
        total = sum(insp.num_params(c) for c in codecs)
        lines.append(f"{'codecs':<31}{total:>20,}   ({', '.join(codecs)})")
    lines.extend(f"note: {n}" for n in insp.notes)
    return "\n".join(lines)


def shapes_json(shapes: dict[str, dict[str, list[int]]]) -> str:
    """JSON with one parameter per line (json.dumps(indent=...) would put every dimension on its own line)."""
    blocks = []
    for c, params in shapes.items():
        body = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in params.items())
        blocks.append(f"  {json.dumps(c)}: {{\n{body}\n  }}")
    return "{\n" + ",\n".join(blocks) + "\n}"
