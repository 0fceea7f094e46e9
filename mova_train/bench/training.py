"""`python -m mova_train.bench train`: training-step time, samples/s, tokens/s and peak memory.

CPU: the real trainer (`Trainer`, one process, no DeepSpeed) on a tiny checkpoint with random latent shards,
written to a temporary folder. GPU (when CUDA is available): the full-size architecture with random weights at
360p x 193 frames, one expert per step (video_dit_2 + audio tower + bridge, as a voice LoRA step), bf16, activation
checkpointing, the trainer's objective and masked AdamW over the LoRA parameters; achieved TFLOP/s from the
analytic count of `mova_train.models.flops` (frozen base: no weight gradients; recompute counted as hardware FLOPs).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mova_train.bench.common import (
    add_gpu_clip_args,
    build_lora_bench_step,
    check_steps,
    cuda_peak_gib,
    sync,
)
from mova_train.config import compose_config
from mova_train.models import get_model_config
from mova_train.models.flops import step_flops
from mova_train.models.tiny import write_tiny_checkpoint
from mova_train.names import LOW_NOISE_EXPERT, SHARED_COMPONENTS
from mova_train.training.synthetic import write_random_shards_for
from mova_train.training.trainer import Trainer, to_train_config, validate_config


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    add_gpu_clip_args(parser)
    parser.add_argument("--lora", default="voice", help="LoRA preset bundle of configs/lora/ (default voice)")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="tiny checkpoint to use on CPU (default: write one to a temp folder)",
    )


def _summary(
    label: str, times: list[float], samples_per_step: int, tokens_per_step: int, mem_gb: float
) -> None:
    step = statistics.median(times)
    print(
        f"[{label}] step {step * 1e3:.1f} ms (median of {len(times)}, min {min(times) * 1e3:.1f}), "
        f"{samples_per_step / step:.2f} samples/s, {tokens_per_step / step:,.0f} tokens/s, peak memory {mem_gb:.2f} GiB"
    )


def run_cpu_bench(args: argparse.Namespace) -> None:
    """The full trainer, one process on CPU, tiny checkpoint, 17 frames at 64x96."""
    with tempfile.TemporaryDirectory(prefix="mova-train-bench-") as tmp:
        root = Path(tmp)
        ckpt = (
            Path(args.checkpoint) if args.checkpoint else write_tiny_checkpoint(root / "checkpoint", seed=0)
        )
        shards = write_random_shards_for(
            ckpt, root / "shards", num_clips=4, num_shards=2, num_frames=17, height=64, width=96
        )
        total = args.warmup + args.steps
        cfg = compose_config(
            [
                "+experiment=tiny_demo",
                f"model.checkpoint={ckpt}",
                f"data.shards={shards}",
                f"trainer.run_dir={root / 'run'}",
                f"trainer.max_steps={total}",
                f"trainer.save_every={total + 1}",
                "trainer.num_threads=null",
                "tracking.mode=disabled",
                "tracking.progress_bar=false",
            ]
        )
        trainer = Trainer(validate_config(to_train_config(cfg)))
        trainer.setup()
        rows = []
        write = trainer.log_step
        trainer.log_step = lambda row: (rows.append(dict(row)), write(row))
        trainer.train()
    timed = rows[args.warmup :]
    tokens = statistics.median(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    print(
        f"train bench: tiny config on CPU, fp32, {torch.get_num_threads()} threads, LoRA preset 'tiny', batch 1"
    )
    _summary("tiny/cpu", [r["step_time_s"] for r in timed], 1, round(tokens), max(r["mem_gb"] for r in timed))


def run_gpu_bench(args: argparse.Namespace, device: str = "cuda", config_name: str | None = None) -> None:
    """Full size, random weights, one expert per step; the trainer's objective and optimizer.

    `device`/`config_name` exist so the same path can be smoke-checked on CPU with the tiny config."""
    gpu = torch.device(device)
    config_name = config_name or args.gpu_config
    config = get_model_config(config_name)
    on_cuda = gpu.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    components = (LOW_NOISE_EXPERT, *SHARED_COMPONENTS)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(gpu)
    clip = (args.frames, args.height, args.width)
    step, model, video_tokens, audio_len = build_lora_bench_step(
        config, components, args.lora, gpu, dtype, clip
    )
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30

    for i in range(args.warmup):
        step(i)
    sync(gpu)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(gpu)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        step(args.warmup + i)
        sync(gpu)
        times.append(time.perf_counter() - start)
    peak = cuda_peak_gib(gpu) if on_cuda else float("nan")
    flops = step_flops(config, video_tokens=video_tokens, audio_tokens=audio_len, text_tokens=config.text_len)
    model_flops, hw_flops = flops.train_step(weight_grads=False, recompute=True)
    step_s = statistics.median(times)
    print(
        f"train bench: {config_name} random weights, video_dit_2 + audio_dit + bridge (one expert per step), "
        f"LoRA '{args.lora}', {dtype} weights, activation checkpointing, {args.frames} frames "
        f"{args.height}x{args.width} on {torch.cuda.get_device_name(gpu) if on_cuda else 'CPU'}; "
        f"weights {weights_gb:.1f} GiB"
    )
    _summary(config_name, times, 1, video_tokens + audio_len, peak)
    print(
        f"[{config_name}] {video_tokens} video + {audio_len} audio tokens; achieved {model_flops / step_s / 1e12:.3f} "
        f"TFLOP/s model ({hw_flops / step_s / 1e12:.1f} TFLOP/s with recompute)"
    )


def run_train_bench(args: argparse.Namespace) -> int:
    check_steps(args.steps, args.warmup)
    run_cpu_bench(args)
    if args.cpu_only:
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: skipping the full-size measurement")
        return 0
    run_gpu_bench(args)
    return 0
