"""`python -m mova_train.bench sampling`: sampler time and peak memory, both experts resident vs `--offload-experts`.

    python -m mova_train.bench sampling [--checkpoint DIR] [--frames 17] [--size 32x64] [--steps 4]

Each mode runs in a fresh process so its peak RSS is its own. Without --checkpoint a tiny checkpoint is written to a
temporary folder. Also prints the weights-only memory of the released 360p/720p architecture in each mode (from a
meta-device build; no weights needed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mova_train.bench.common import peak_rss_bytes
from mova_train.models import COMPONENTS, EXPERTS, build_mova
from mova_train.models.tiny import write_tiny_checkpoint
from mova_train.sampling.inputs import parse_size
from mova_train.sampling.pipeline import load_pipeline
from mova_train.sampling.sampler import generate

MODES = ("resident", "offload")


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) if module is not None else 0


def _worker(args) -> dict:
    torch.set_num_threads(max(1, args.threads))
    height, width = parse_size(args.size)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    started = time.perf_counter()
    pipeline = load_pipeline(
        args.checkpoint, offload_experts=args.worker == "offload", device=device, dtype=dtype
    )
    loaded = time.perf_counter()
    peak_weights = 0

    def record(module, inputs):
        nonlocal peak_weights
        resident = sum(_param_bytes(getattr(pipeline.model, c, None)) for c in COMPONENTS)
        peak_weights = max(peak_weights, resident)

    handle = pipeline.model.register_forward_pre_hook(record)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generate(
        pipeline,
        None,
        ["a bell rings in a quiet room"],
        image=None,
        num_frames=args.frames,
        height=height,
        width=width,
        steps=args.steps,
        cfg_scale=args.cfg,
        seed=0,
        progress=False,
    )
    handle.remove()
    done = time.perf_counter()
    return {
        "mode": args.worker,
        "load_s": loaded - started,
        "sample_s": done - loaded,
        "expert_loads": pipeline.num_expert_loads,
        "peak_resident_diffusion_weights_bytes": peak_weights,
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else None,
    }


def _release_weights(dtype_bytes: int = 2) -> dict[str, float]:
    """GB of diffusion weights resident in each mode at the released size (bf16), from a meta build."""
    model = build_mova("mova_360p", device="meta")
    sizes = {
        c: sum(p.numel() for p in getattr(model, c).parameters()) * dtype_bytes for c in model.components
    }
    shared = sum(v for c, v in sizes.items() if c not in EXPERTS)
    return {
        "resident": (shared + sum(sizes[e] for e in EXPERTS)) / 1e9,
        "offload": (shared + max(sizes[e] for e in EXPERTS)) / 1e9,
    }


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="checkpoint folder (default: a temporary tiny checkpoint)")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", default="32x64", help="HEIGHTxWIDTH (default 32x64)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)


def run_sampling_bench(args: argparse.Namespace) -> int:
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(write_tiny_checkpoint(Path(tmp) / "tiny"))
        common = ["--checkpoint", checkpoint, "--frames", str(args.frames), "--size", args.size]
        common += ["--steps", str(args.steps), "--cfg", str(args.cfg), "--device", args.device]
        common += ["--dtype", args.dtype, "--threads", str(args.threads)]
        print(
            f"sampler bench: {args.frames} frames {args.size}, {args.steps} steps, cfg {args.cfg}, {args.device}"
        )
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, "-m", "mova_train.bench", "sampling", *common, "--worker", mode],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            cuda = r["cuda_max_allocated_bytes"]
            print(
                f"  {mode:8s} load {r['load_s']:6.2f} s  sample {r['sample_s']:6.2f} s  expert loads "
                f"{r['expert_loads']}  peak diffusion weights {r['peak_resident_diffusion_weights_bytes'] / 1e6:8.2f} MB"
                f"  peak RSS {r['peak_rss_bytes'] / 1e6:8.1f} MB"
                + (f"  CUDA max allocated {cuda / 1e9:.2f} GB" if cuda is not None else "")
            )
    release = _release_weights()
    print(
        "  released architecture, bf16 diffusion weights resident: "
        f"{release['resident']:.1f} GB both experts, {release['offload']:.1f} GB with --offload-experts "
        "(plus the codecs, spec §15: UMT5 ~11.4 GB bf16, DAC ~1.5 GB fp32, video VAE ~0.25 GB; and activations)"
    )
    return 0
