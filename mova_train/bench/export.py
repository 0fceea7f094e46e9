"""`python -m mova_train.bench export`: peak memory of `export --format merged` against the size of the base shard.

A tiny checkpoint gets a base shard grown with filler tensors to `--shard-mb` (in tensors of `--tensor-mb`), an
adapter is trained-shaped on it, and the merge runs in a fresh process that reports its peak resident memory above
what it held before the merge. Written tensor by tensor, the merge should need about one tensor, not one shard.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys
from mova_train.lora.export import export_merged, load_adapter_source
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
source = load_adapter_source(sys.argv[1])
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS")
export_merged(source, __import__("pathlib").Path(sys.argv[3]), checkpoint=sys.argv[2])
print(json.dumps({"before": before, "after": status("VmHWM")}))
"""


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard-mb", type=int, default=1024, help="size of the grown base shard (default 1024)"
    )
    parser.add_argument("--tensor-mb", type=int, default=64, help="size of each filler tensor (default 64)")


def run_export_bench(args: argparse.Namespace) -> int:
    import torch

    from mova_train.checkpoint_io import read_safetensors_header, write_safetensors_streaming
    from mova_train.lora import LoraConfig, apply_lora, randomize_lora, save_adapters
    from mova_train.models.checkpoint import load_mova
    from mova_train.models.tiny import write_tiny_checkpoint

    if args.shard_mb <= 0 or args.tensor_mb <= 0 or args.tensor_mb > args.shard_mb:
        raise ValueError("--shard-mb and --tensor-mb must be positive, --tensor-mb at most --shard-mb")
    with tempfile.TemporaryDirectory(prefix="mova-bench-export-") as tmp:
        tmp = Path(tmp)
        ckpt = write_tiny_checkpoint(tmp / "base", seed=0)
        cfg = LoraConfig(rank=4, alpha=8.0, targets={"audio_dit": ["self_attn", "ffn"]})
        model = load_mova(ckpt, components=("audio_dit",))
        apply_lora(model, cfg)
        randomize_lora(model, seed=0)
        save_adapters(tmp / "adapter", model, cfg, metadata={"step": "1"})
        del model
        # grow the audio tower's shard: its own tensors plus fillers, written one at a time
        shard = ckpt / "audio_dit" / "diffusion_pytorch_model.safetensors"
        header = read_safetensors_header(shard)
        from safetensors import safe_open

        n_fill = args.shard_mb // args.tensor_mb
        numel = args.tensor_mb * (1 << 20) // 2
        with safe_open(str(shard), framework="pt") as f:
            own = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        specs = {k: (v.dtype, list(v.shape)) for k, v in own.items()}
        specs.update({f"filler.{i:04d}": (torch.bfloat16, [numel]) for i in range(n_fill)})

        def tensor_for(name: str) -> torch.Tensor:
            if name in own:
                return own[name]
            return torch.full((numel,), float(int(name[-4:]) % 7), dtype=torch.bfloat16)

        write_safetensors_streaming(shard, specs, tensor_for, header.entries.get("__metadata__"))
        size = shard.stat().st_size
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp / "adapter"), str(ckpt), str(tmp / "merged")],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rss = json.loads(out.stdout.strip().splitlines()[-1])
        grown = rss["after"] - rss["before"]
        mib = 1 << 20
        print(
            f"export merged: base shard {size / mib:.0f} MiB in tensors of {args.tensor_mb} MiB; "
            f"peak memory during the merge {grown / mib:.0f} MiB above the process before it "
            f"({grown / size:.2f}x the shard, {grown / (args.tensor_mb * mib):.1f}x one tensor)"
        )
    return 0
