"""Readiness check: `python -m mova_train.cli.doctor [--checkpoint DIR] [--shards DIR]`.

Says what will not work (environment, checkpoint folder, shards, and the two against each other) before a user
spends GPU time. Exit code 0 when nothing failed, 1 otherwise; warnings do not fail.

The checks import torch and the project's packages inside the functions on purpose: the doctor must start (and
`--help` must answer) on a broken environment, whose import failures it reports as checks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mova_train.names import COMPONENT_WEIGHTS, COMPONENTS, MODEL_INDEX_NAME

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"
# Free disk we want for a run directory: adapters are small, but optimizer state and renders add up.
MIN_FREE_DISK_GB = 5.0


@dataclass
class Check:
    status: str
    area: str
    message: str


def check_environment(run_dir: Path) -> list[Check]:
    import torch

    out = [Check(INFO, "env", f"python {sys.version.split()[0]}, torch {torch.__version__}")]
    for name in (
        "accelerate",
        "deepspeed",
        "peft",
        "webdataset",
        "wandb",
        "hydra",
        "decord",
        "av",
        "diffusers",
    ):
        try:
            mod = importlib.import_module(name)
            out.append(Check(OK, "env", f"{name} {getattr(mod, '__version__', '?')}"))
        except Exception as e:  # a broken install raises anything from ImportError to OSError
            out.append(Check(FAIL, "env", f"{name} cannot be imported: {type(e).__name__}: {e}"))
    if torch.cuda.is_available():
        cuda = torch.version.cuda
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
        out.append(Check(OK, "gpu", f"CUDA {cuda}, NCCL {nccl}, {torch.cuda.device_count()} GPU(s)"))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gb = p.total_memory / 2**30
            bf16 = torch.cuda.is_bf16_supported()
            out.append(
                Check(
                    OK if bf16 else WARN,
                    "gpu",
                    f"cuda:{i} {p.name}, {gb:.0f} GiB, bf16 {'yes' if bf16 else 'NO'}",
                )
            )
            out.append(Check(INFO, "gpu", f"cuda:{i}: {memory_advice(p.total_memory / 1e9)}"))
    else:
        out.append(
            Check(WARN, "gpu", "no CUDA GPU: only the tiny model is practical (CPU, gloo backend, fp32)")
        )
    probe = run_dir if run_dir.exists() else next((p for p in run_dir.parents if p.exists()), Path("."))
    free_gb = shutil.disk_usage(probe).free / 2**30
    status = OK if free_gb >= MIN_FREE_DISK_GB else WARN
    out.append(
        Check(status, "disk", f"{free_gb:.1f} GiB free at {probe} (want >= {MIN_FREE_DISK_GB:.0f} GiB)")
    )
    if not os.access(probe, os.W_OK):
        out.append(Check(FAIL, "disk", f"{probe} is not writable"))
    return out


CONTEXT_MARGIN_GB = (
    3.0  # CUDA context, NCCL buffers, allocator fragmentation: what the planner's tensor bytes lack
)


def memory_advice(gpu_gb: float, plans: Path | None = None) -> str:
    """The memory recipe for one GPU of `gpu_gb` GB (1e9 bytes), from the planner's figures for the recipes
    (configs/memory/plans.json, written by `python -m mova_train.plan --recipes`): the largest recipe whose planned
    total plus the CUDA context fits."""
    import json

    from mova_train.config import PROJECT_ROOT

    plans = plans or PROJECT_ROOT / "configs" / "memory" / "plans.json"
    data = json.loads(Path(plans).read_text())
    clip = data["clip"]
    where = f"{clip['frames']} frames at {clip['height']}x{clip['width']}, {' '.join(data['command'].split()[3:4])}"
    recipes = sorted(data["recipes"].items(), key=lambda kv: -kv[1]["gpu_memory_gb"])
    for name, r in recipes:
        if r["total_gb"] + CONTEXT_MARGIN_GB <= gpu_gb:
            return (
                f"+memory={name}: planned {r['total_gb']:.1f} GB per GPU and {r['pinned_host_gb']:.0f} GB pinned host "
                f"RAM ({where}); several GPUs: launch/accelerate/zero3.yaml; `python -m mova_train.plan` for yours"
            )
    name, smallest = recipes[-1]
    return (
        f"smaller than every memory recipe (+memory={name} plans {smallest['total_gb']:.1f} GB for {where}): "
        "train over several GPUs (ZeRO-3, sequence parallel), with fewer frames, or the tiny config; "
        "`python -m mova_train.plan` says what fits"
    )


def check_checkpoint(checkpoint: Path) -> tuple[list[Check], str | None]:
    """Check the folder layout, every config and weight header, and strict key/shape agreement with our model."""
    from mova_train.checkpoint_io import CheckpointError, read_component_header, read_json

    out: list[Check] = []
    if not checkpoint.is_dir():
        return [Check(FAIL, "checkpoint", f"{checkpoint} is not a folder")], None
    try:
        index = read_json(checkpoint / MODEL_INDEX_NAME)
        out.append(
            Check(OK, "checkpoint", f"{MODEL_INDEX_NAME}: boundary_ratio {index.get('boundary_ratio')}")
        )
    except CheckpointError as e:
        return [Check(FAIL, "checkpoint", str(e))], None
    expected = _expected_shapes(checkpoint, out)
    for component, weights in COMPONENT_WEIGHTS.items():
        folder = checkpoint / component
        if not folder.is_dir():
            out.append(Check(FAIL, "checkpoint", f"missing component folder {folder}"))
            continue
        try:
            header = read_component_header(folder, weights_name=weights)
        except CheckpointError as e:
            out += [Check(FAIL, "checkpoint", m) for m in _file_problems(folder, weights) or [str(e)]]
            continue
        n = sum(_numel(shape) for shape, _ in header.values())
        dtypes = sorted({d for _, d in header.values()})
        msg = f"{component}: {len(header)} tensors, {human_count(n)} params, {'/'.join(dtypes)}"
        if component in expected:
            want = expected[component]
            found = {k: shape for k, (shape, _) in header.items()}
            bad = sorted(set(want) ^ set(found)) + sorted(
                k for k in set(want) & set(found) if want[k] != found[k]
            )
            if bad:
                out.append(Check(FAIL, "checkpoint", f"{msg}; does not match its config: {bad[:5]}"))
                continue
        out.append(Check(OK, "checkpoint", msg))
    identity = None
    try:
        from mova_train.codecs import codec_identity

        identity = codec_identity(checkpoint)
        out.append(Check(OK, "checkpoint", f"codec identity {identity[:16]}…"))
    except Exception as e:  # noqa: BLE001 - report any failure of the codec folders as a check
        out.append(Check(FAIL, "checkpoint", f"codec identity cannot be computed: {e}"))
    return out, identity


def _file_problems(folder: Path, weights_name: str) -> list[str]:
    """One message per unreadable weight file of a component (a download with three truncated shards gives three),
    so every file to fetch again is named at once."""
    from mova_train.checkpoint_io import CheckpointError, list_weight_files, read_safetensors_header

    try:
        names = list_weight_files(folder, weights_name=weights_name)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for name in names:
        try:
            read_safetensors_header(folder / name)
        except CheckpointError as e:
            problems.append(str(e))
    return problems


def human_count(n: int) -> str:
    """A parameter count in the unit that keeps it readable: 950, 340K, 1.2M, 14.3B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def _expected_shapes(checkpoint: Path, out: list[Check]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Build the diffusion components from their config.json on `meta` and list their parameter shapes."""
    try:
        from mova_train.models import build_mova, read_mova_config
    except ImportError as e:
        out.append(Check(WARN, "checkpoint", f"model code unavailable, keys not checked: {e}"))
        return {}
    present = tuple(c for c in COMPONENTS if (checkpoint / c).is_dir())
    try:
        config = read_mova_config(checkpoint)
        model = build_mova(config, components=present, device="meta")
    except ValueError as e:
        out.append(Check(FAIL, "checkpoint", f"config.json cannot be built: {e}"))
        return {}
    return {
        c: {k: tuple(v.shape) for k, v in getattr(model, c).state_dict().items()}
        for c in present
        if getattr(model, c) is not None
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def check_shards(shards: Path, codec_identity: str | None, *, deep: bool) -> list[Check]:
    from mova_train.checkpoint_io import sha256_file
    from mova_train.data.contract import ShardFormatError, load_manifest

    out: list[Check] = []
    try:
        manifest = load_manifest(shards)
    except ShardFormatError as e:
        return [Check(FAIL, "shards", str(e))]
    buckets = ", ".join(f"{b}: {n}" for b, n in sorted(manifest.buckets.items()))
    out.append(
        Check(
            OK,
            "shards",
            f"{manifest.num_samples} clips in {len(manifest.shards)} shards, "
            f"{manifest.total_seconds / 3600:.2f} h; buckets {buckets or '-'}",
        )
    )
    for info in manifest.shards:
        path = shards / info.name
        if not path.is_file():
            out.append(Check(FAIL, "shards", f"missing shard {path} (listed in manifest.json)"))
        elif path.stat().st_size != info.num_bytes:
            out.append(
                Check(
                    FAIL, "shards", f"{path} has {path.stat().st_size} bytes, manifest says {info.num_bytes}"
                )
            )
        elif deep and sha256_file(path) != info.sha256:
            out.append(Check(FAIL, "shards", f"{path} checksum differs from manifest.json (corrupt copy?)"))
    if codec_identity is not None:
        if manifest.codec_identity == codec_identity:
            out.append(Check(OK, "match", "shards were encoded with this checkpoint's codecs"))
        else:
            out.append(
                Check(
                    FAIL,
                    "match",
                    f"shards encoded by codecs {manifest.codec_identity[:16]}…, checkpoint has {codec_identity[:16]}…: "
                    "re-encode with `python -m data_tools prepare ... --checkpoint` of this checkpoint",
                )
            )
    return out


def run_checks(
    checkpoint: Path | None, shards: Path | None, run_dir: Path, *, deep: bool = False
) -> list[Check]:
    checks = check_environment(run_dir)
    identity = None
    if checkpoint is not None:
        found, identity = check_checkpoint(checkpoint)
        checks += found
    if shards is not None:
        checks += check_shards(shards, identity, deep=deep)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mova_train.cli.doctor", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--checkpoint", type=Path, help="MOVA checkpoint folder (model_index.json inside)")
    parser.add_argument(
        "--shards", type=Path, help="shard folder written by data_tools (manifest.json inside)"
    )
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs"), help="where runs will be written (disk check)"
    )
    parser.add_argument(
        "--deep", action="store_true", help="also verify every shard's sha256 (reads all shards)"
    )
    args = parser.parse_args(argv)
    checks = run_checks(args.checkpoint, args.shards, args.run_dir, deep=args.deep)
    width = max(len(c.area) for c in checks)
    for c in checks:
        print(f"[{c.status:>4}] {c.area:<{width}}  {c.message}")
    failed = sum(c.status == FAIL for c in checks)
    warned = sum(c.status == WARN for c in checks)
    print(f"\n{failed} problem(s), {warned} warning(s)" + ("" if failed else " — ready"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
