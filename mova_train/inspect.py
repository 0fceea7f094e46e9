"""Parameter names, shapes and counts of a MOVA checkpoint folder or a named config (built on `meta`).

python -m mova_train.inspect --config mova_360p
python -m mova_train.inspect --checkpoint checkpoints/MOVA-360p --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint_io import CheckpointError, read_component_header
from .models.checkpoint import read_mova_config
from .models.config import CONFIG_PRESETS
from .models.mova import MovaModel, build_mova
from .names import CODEC_COMPONENTS, COMPONENTS, EXPERTS, INDEX_SUFFIX, SHARED_COMPONENTS

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
    try:
        from .codecs import build_codec_modules
    except ImportError as e:
        notes.append(f"codec components not listed: mova_train.codecs.build_codec_modules unavailable ({e})")
    else:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mova_train.inspect",
        description="Print per-component parameter counts (and total / active = one expert + audio + bridge) of a "
        "MOVA checkpoint folder (read from safetensors headers, no weights loaded) or of a named config (built on "
        "the meta device). With --json print {component: {param_name: shape}}.",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a MOVA checkpoint folder (released layout)")
    src.add_argument("--config", choices=CONFIG_PRESETS, help="a named architecture")
    parser.add_argument("--json", action="store_true", help="print {component: {param_name: shape}} as JSON")
    parser.add_argument(
        "--lora",
        metavar="NAME",
        help="also list the modules a LoRA setup targets and its trainable parameters per component: preset names "
        "(comma-separated, e.g. self_attn,bridge_a2v), a configs/lora bundle (voice), an experiment (voice_lora) "
        "or a YAML file",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        insp = inspect_checkpoint(args.checkpoint) if args.checkpoint else inspect_config(args.config)
    except ValueError as e:  # CheckpointError and ConfigError are ValueErrors
        print(f"inspect: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(shapes_json(insp.shapes))
    else:
        print(format_counts(insp))
    for n in insp.notes:
        if args.json:
            print(f"note: {n}", file=sys.stderr)
    if args.lora:
        from mova_train.lora.inspect import lora_config_from_name, print_lora_summary

        try:
            print()
            print_lora_summary(insp.model, lora_config_from_name(args.lora))
        except ValueError as e:  # LoraError names the preset, component or field
            print(f"inspect: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
