"""`python -m mova_train.plan`: argument parsing and printing; the work is in `simulate` and `report`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  python -m mova_train.plan +experiment=voice_lora --gpus 1 --gpu-memory 141
  python -m mova_train.plan +experiment=voice_lora model=mova_720p deepspeed=zero3 --gpus 8 --sp 4 --json
  python -m mova_train.plan model=tiny --frames 9 --height 32 --width 64
"""
# Clip sizes when --frames/--height/--width are not given: what each model group trains on.
DEFAULT_CLIPS = {"tiny": (9, 32, 64), "mova_360p": (193, 352, 640), "mova_720p": (193, 720, 1280)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mova_train.plan",
        description="Per-GPU memory, FLOPs and kernel count of one training step, from a simulated micro-step of "
        "the real model at real shapes (fake tensors: no weights, no GPU).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides", nargs="*", help="train.py's Hydra overrides (+experiment=voice_lora model=... ...)"
    )
    p.add_argument(
        "--gpus", type=int, default=1, help="world size (data parallel x sequence parallel); default 1"
    )
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU to plan for; default 80")
    p.add_argument(
        "--sp",
        type=int,
        default=None,
        help="sequence-parallel size (default parallel.sequence_parallel_size)",
    )
    p.add_argument("--frames", type=int, default=None, help="pixel frames per clip (4k+1; default per model)")
    p.add_argument("--height", type=int, default=None, help="clip height in pixels (default per model)")
    p.add_argument("--width", type=int, default=None, help="clip width in pixels (default per model)")
    p.add_argument(
        "--batch", type=int, default=None, help="samples per GPU per micro-step (default data.batch_size)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--recipes",
        metavar="OUT",
        default=None,
        help="plan every memory recipe (configs/memory/gpuNN.yaml: +memory=gpuNN on top of the overrides, default "
        "+experiment=voice_lora, with --gpu-memory NN) and write their figures to OUT (JSON; doctor and the README "
        "read configs/memory/plans.json)",
    )
    return p


def compose(overrides: list[str]):
    """(TrainConfig, model group name) composed and validated like train.py's, without needing the user's files."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mova_train.config import compose_config, to_train_config, validate_config
    from mova_train.errors import ConfigValueError

    try:
        raw = compose_config(overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        cause = str(e.__cause__).strip().splitlines()[:1] if e.__cause__ else []  # "Key 'x' is not in struct"
        text = str(e).split("Config search path")[0]  # Hydra's search path: noise here
        lines = [line.strip() for line in text.splitlines() + cause if line.strip()]
        raise ConfigValueError(" ".join(lines)) from None
    group = OmegaConf.select(raw, "hydra.runtime.choices.model")
    raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"])
    for key in ("model.checkpoint", "data.shards"):  # the planner reads neither
        if OmegaConf.is_missing(raw, key) or OmegaConf.select(raw, key) in (None, ""):
            OmegaConf.update(raw, key, f"<{key} not needed by the planner>")
    cfg = to_train_config(raw)
    return validate_config(cfg, check_files=False), group


def model_config(cfg, group: str | None):
    """The checkpoint's config.json when model.checkpoint exists, else the architecture of the model group."""
    from mova_train.config import resolve_path
    from mova_train.errors import ConfigValueError
    from mova_train.models.checkpoint import read_mova_config
    from mova_train.models.config import CONFIG_PRESETS, get_model_config

    path = resolve_path(cfg.model.checkpoint, field_name="model.checkpoint", must_exist=False)
    if Path(path).is_dir():
        return read_mova_config(path), group or path.name
    if group not in CONFIG_PRESETS:
        raise ConfigValueError(
            f"model.checkpoint={cfg.model.checkpoint!r} does not exist and model={group!r} names no known "
            f"architecture ({', '.join(CONFIG_PRESETS)}): give an existing checkpoint or one of those groups"
        )
    return get_model_config(group), group


def run(argv: list[str] | None = None) -> dict:
    """Parse, simulate, report (a dict: `report.build_report`'s). Raises ConfigValueError on bad input."""
    args = build_parser().parse_args(argv)
    from mova_train.errors import ConfigValueError
    from mova_train.plan.report import build_report
    from mova_train.plan.simulate import ClipShape, resolve_execution, simulate_step
    from mova_train.sampling.defaults import sampling_defaults

    cfg, group = compose(args.overrides)
    config, name = model_config(cfg, group)
    sp = args.sp if args.sp is not None else cfg.parallel.sequence_parallel_size
    if args.gpus < 1:
        raise ConfigValueError(f"--gpus={args.gpus}: expected an integer >= 1")
    if sp < 1 or args.gpus % sp:
        raise ConfigValueError(
            f"--sp {sp} must divide --gpus {args.gpus} (world = data parallel x sequence parallel)"
        )
    if args.gpu_memory <= 0:
        raise ConfigValueError(f"--gpu-memory={args.gpu_memory}: expected GB > 0")
    defaults = sampling_defaults(config)
    frames, height, width = DEFAULT_CLIPS.get(name, (defaults.num_frames, defaults.height, defaults.width))
    shape = ClipShape(
        frames=args.frames or frames, height=args.height or height, width=args.width or width,
        batch=args.batch or cfg.data.batch_size,
    )  # fmt: skip
    shape.check()
    ex = resolve_execution(cfg, args.gpus, sp)
    start = time.perf_counter()
    fig = simulate_step(cfg, config, ex, shape)
    return build_report(
        fig, ex, cfg, shape, args.gpu_memory, seconds=time.perf_counter() - start, model_name=name
    )


def recipe_names() -> list[str]:
    """The memory recipes (configs/memory/gpuNN.yaml), largest GPU first."""
    from mova_train.config import PROJECT_ROOT

    names = [p.stem for p in (PROJECT_ROOT / "configs" / "memory").glob("gpu*.yaml")]
    return sorted(names, key=lambda n: -int(n[3:]))


def _figures(r: dict, gpu_memory_gb: int | None) -> dict:
    """What plans.json keeps of one plan: memory (rounded GB and exact bytes), FLOPs, kernels, non-matmul bytes."""
    return {
        "gpu_memory_gb": gpu_memory_gb, "total_gb": round(r["total_gb"], 2),
        "fits": r["fits"] if gpu_memory_gb else None,
        "activation_peak_gb": round(r["memory_bytes"]["activation peak"] / 1e9, 2),
        "pinned_host_gb": round(r["pinned_host_total_bytes"] / 1e9, 2),
        "memory_gb": {k: round(v / 1e9, 2) for k, v in r["memory_bytes"].items()},
        "pinned_host_parts_gb": {k: round(v / 1e9, 2) for k, v in r["pinned_host_bytes"].items()},
        "memory_bytes": r["memory_bytes"], "pinned_host_bytes": r["pinned_host_bytes"],
        "flops_per_step": r["flops_per_step"], "kernels_per_step": r["kernels_per_step"],
        "non_matmul_kernels_per_step": r["non_matmul_kernels_per_step"],
        "non_matmul_bytes_per_step": r["non_matmul_bytes_per_step"],
    }  # fmt: skip


def plan_recipes(argv: list[str]) -> dict:
    """`--recipes OUT`: the overrides (default +experiment=voice_lora) planned as they are ("base") and with every
    recipe at its own GPU size (+memory=gpuNN --gpu-memory NN); the figures doctor, the README and the tests quote."""
    args = build_parser().parse_args(argv)
    base = list(args.overrides) or ["+experiment=voice_lora"]
    options = ["--gpus", str(args.gpus)]
    for flag in ("sp", "frames", "height", "width", "batch"):
        if getattr(args, flag) is not None:
            options += [f"--{flag}", str(getattr(args, flag))]
    out: dict = {"command": " ".join(["python -m mova_train.plan", *base, *options, "--recipes", "OUT"])}
    plain = run([*base, *options])  # the step without a recipe
    out["model"], out["clip"], out["base"] = plain["model"], plain["clip"], _figures(plain, None)
    out["recipes"] = {}
    for name in recipe_names():
        gb = int(name[3:])
        out["recipes"][name] = _figures(
            run([*base, f"+memory={name}", *options, "--gpu-memory", str(gb)]), gb
        )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if any(a == "--recipes" or a.startswith("--recipes=") for a in argv):
            import json

            from mova_train.checkpoint_io import write_json_atomic
            from mova_train.errors import ConfigValueError

            target = Path(build_parser().parse_args(argv).recipes)
            if not target.parent.is_dir():  # checked before minutes of planning, not after
                raise ConfigValueError(f"--recipes {target}: folder {target.parent} does not exist")
            write_json_atomic(target, plan_recipes(argv))  # a failed run leaves the old file whole
            plans = json.loads(target.read_text())
            for name in recipe_names():  # largest GPU first
                r = plans["recipes"][name]
                print(f"+memory={name}: {r['total_gb']:.2f} GB per GPU (of {r['gpu_memory_gb']}), "
                      f"{r['pinned_host_gb']:.1f} GB pinned host RAM")  # fmt: skip
            return 0
        report = run(argv)  # parses first: --help loads no torch
    except ValueError as e:  # ConfigValueError, and the model's ConfigError / CheckpointError
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mova_train.plan.report import format_json, format_text

    print(format_json(report) if "--json" in argv else format_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
