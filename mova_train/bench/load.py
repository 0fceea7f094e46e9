"""`python -m mova_train.bench load`: peak host memory per rank when 2 ranks load a mid-size base under ZeRO-3.

A checkpoint in the released layout is written with random weights (the tiny architecture, widened and deepened
until its safetensors reach `--size-gb`), then 2 ranks (`torch.distributed.run`, gloo, CPU) load it under ZeRO-3
with the project's `launch/deepspeed/zero3.json`, once per loader:

- `full` (what every start did before rank-local loading): each rank loads the whole base (`load_mova` on CPU),
  then DeepSpeed partitions it (`zero.Init(module=...)`, as `deepspeed.initialize` does for such a model);
- `rank-local` (what the trainer does now, `training.backend.load_base`): built under `zero.Init`, each rank
  reads only its partition of every tensor.

Each rank reports its peak resident memory (VmHWM) above what it held just before loading, against the checkpoint
size; rank-local loading should stay near 1/2 of it (the goal: at most 0.6x), the full load near 1x or more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LOADERS = ("full", "rank-local")


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size-gb", type=float, default=1.2, help="checkpoint size to write, in GB (default 1.2)"
    )
    parser.add_argument(
        "--loader",
        choices=(*LOADERS, "both"),
        default="both",
        help="which loader(s) to measure (default both)",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="an existing checkpoint to load instead of writing one"
    )


def _config_for_size(size_bytes: float):
    """The tiny architecture widened (video 512, audio 256) with as many video layers as reach `size_bytes` in fp32."""
    from mova_train.models import build_mova, get_model_config

    tiny = get_model_config("tiny")
    for layers in range(2, 400, 2):
        video = dataclasses.replace(tiny.video_dit, dim=512, ffn_dim=2048, num_heads=16, num_layers=layers)
        audio = dataclasses.replace(tiny.audio_dit, dim=256, ffn_dim=1024, num_heads=8, num_layers=4)
        bridge = dataclasses.replace(
            tiny.dual_tower_bridge,
            visual_layers=layers,
            audio_layers=4,
            visual_hidden_dim=512,
            audio_hidden_dim=256,
        )
        config = dataclasses.replace(
            tiny, video_dit=video, audio_dit=audio, dual_tower_bridge=bridge, name="bench"
        )
        numel = sum(p.numel() for p in build_mova(config, device="meta").parameters())
        if numel * 4 >= size_bytes:
            return config
    raise ValueError(f"--size-gb {size_bytes / 1e9:g} is too large for this benchmark")


def _write_checkpoint(out: Path, size_bytes: float) -> None:
    from mova_train.models import build_mova
    from mova_train.models.checkpoint import save_mova

    model = build_mova(_config_for_size(size_bytes), device="cpu", seed=0)
    save_mova(model, out)


def _weights_bytes(checkpoint: Path) -> int:
    from mova_train.names import COMPONENTS

    return sum(p.stat().st_size for c in COMPONENTS for p in (checkpoint / c).glob("*.safetensors"))


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rank_main(checkpoint: Path, loader: str, out: Path) -> None:
    """One rank: load under ZeRO-3 with `loader`, write its memory figures to `out/rank<r>.json`."""
    import gc

    import deepspeed
    import torch

    from mova_train.config import PROJECT_ROOT
    from mova_train.models.checkpoint import load_mova
    from mova_train.names import COMPONENTS
    from mova_train.training.backend import load_base
    from mova_train.training.config import read_deepspeed_json

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    json_path = PROJECT_ROOT / "launch" / "deepspeed" / "zero3.json"
    ds_config = read_deepspeed_json(json_path, where=str(json_path))
    ds_config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=1.0)
    ds_config["bf16"] = {"enabled": False}
    torch.distributed.barrier()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current resident size
    before = _status("VmRSS")
    if loader == "full":
        model = load_mova(checkpoint, components=COMPONENTS, dtype=torch.float32, device="cpu")
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    else:
        model = load_base(checkpoint, COMPONENTS, torch.float32, torch.device("cpu"), ds_config)
    gc.collect()
    local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    record = {"before": before, "peak": _status("VmHWM"), "after": _status("VmRSS"), "partition_bytes": local}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()


def _measure(checkpoint: Path, loader: str, tmp: Path) -> list[dict]:
    out = tmp / f"out-{loader}"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mova_train.bench.load", str(checkpoint), loader, str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the 2-rank {loader} load failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def run_load_bench(args: argparse.Namespace) -> int:
    if not Path("/proc/self/clear_refs").exists():
        raise ValueError("this benchmark reads /proc/self/status and resets its peak: Linux only")
    if args.size_gb <= 0:
        raise ValueError("--size-gb must be positive")
    loaders = LOADERS if args.loader == "both" else (args.loader,)
    with tempfile.TemporaryDirectory(prefix="mova-bench-load-") as tmp:
        tmp = Path(tmp)
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
        else:
            checkpoint = tmp / "checkpoint"
            print(
                f"writing a {args.size_gb:g} GB checkpoint (random weights, released layout) ...", flush=True
            )
            _write_checkpoint(checkpoint, args.size_gb * 1e9)
        size = _weights_bytes(checkpoint)
        gib = 1 << 30
        print(f"checkpoint: {size / gib:.2f} GiB of safetensors; 2 ranks, gloo, ZeRO-3 (CPU)")
        for loader in loaders:
            for rank, r in enumerate(_measure(checkpoint, loader, tmp)):
                grown = r["peak"] - r["before"]
                print(
                    f"  {loader:10s} rank {rank}: peak RSS {grown / gib:.2f} GiB above the {r['before'] / gib:.2f} GiB "
                    f"before loading = {grown / size:.2f}x the checkpoint (absolute peak {r['peak'] / gib:.2f} GiB; "
                    f"holds a {r['partition_bytes'] / gib:.2f} GiB partition, {r['after'] / gib:.2f} GiB after loading)"
                )
    return 0


if __name__ == "__main__":  # one rank, started by `_measure` under torch.distributed.run
    _rank_main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
