"""`python -m mova_train.bench model`: time and memory of one dual-tower forward+backward step.

Always runs the tiny config on CPU; with a GPU it also runs one full-size expert + audio tower + bridge (random
weights, bf16, activation checkpointing) at 360p (43,120 video + 403 audio tokens) and reports the achieved
TFLOP/s from the analytic count in `mova_train.models.flops`. The base weights are frozen by default, as in LoRA
training, and the video input requires grad so the backward pass runs through every block.
"""

from __future__ import annotations

import argparse
import math

import torch

from mova_train.bench.common import (
    add_gpu_clip_args,
    check_clip_shape,
    check_steps,
    peak_rss_bytes,
    time_calls,
)
from mova_train.models.config import get_model_config, num_tokens
from mova_train.models.flops import step_flops
from mova_train.models.mova import build_mova, set_activation_checkpointing
from mova_train.names import HIGH_NOISE_EXPERT, SHARED_COMPONENTS

BENCH_COMPONENTS = (HIGH_NOISE_EXPERT, *SHARED_COMPONENTS)


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default 1)")
    parser.add_argument(
        "--weight-grads",
        action="store_true",
        help="also compute gradients of all base weights (full fine-tuning); default: frozen (LoRA)",
    )
    add_gpu_clip_args(parser)
    parser.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="disable activation checkpointing on the GPU run (needs far more memory)",
    )


def _inputs(
    config, *, frames: int, height: int, width: int, device, requires_grad: bool, seed: int = 0
) -> dict:
    """Random inputs of one clip; `frames` must be 4k+1 and height/width multiples of 16 (VAE 8 x patch 2)."""
    check_clip_shape(frames, height, width)
    g = torch.Generator(device="cpu").manual_seed(seed)
    t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    num_audio = math.ceil(48000 * frames / 24 / 960)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    video = randn(1, config.video_latent_dim, t, h, w).requires_grad_(requires_grad)
    return {
        "video_latents": video,
        "video_cond": randn(1, config.video_cond_dim, t, h, w),
        "audio_latents": randn(1, config.audio_latent_dim, num_audio),
        "text": randn(1, config.text_len, config.text_dim),
        "timestep_video": torch.tensor([950.0], device=device),
    }


def _measure(model, inputs: dict, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) per step."""

    def forward():
        with torch.no_grad():
            model(**inputs, expert=HIGH_NOISE_EXPERT)

    def train_step():
        pred_v, pred_a = model(**inputs, expert=HIGH_NOISE_EXPERT)
        loss = pred_v.float().square().mean() + pred_a.float().square().mean()
        loss.backward()
        inputs["video_latents"].grad = None
        model.zero_grad(set_to_none=True)

    return time_calls(forward, steps, warmup, device), time_calls(train_step, steps, warmup, device)


def _rate(flops_per_s: float) -> str:
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:8.2f} TFLOP/s"
    return f"{flops_per_s / 1e9:8.2f} GFLOP/s"


def _report(label: str, config, inputs: dict, fwd_s: float, step_s: float, args, recompute: bool) -> None:
    v_shape = inputs["video_latents"].shape
    lv, la = num_tokens(
        config,
        num_frames=(v_shape[2] - 1) * 4 + 1,
        height=v_shape[3] * 8,
        width=v_shape[4] * 8,
        num_audio_samples=inputs["audio_latents"].shape[2] * 960,
    )
    flops = step_flops(config, video_tokens=lv, audio_tokens=la, text_tokens=inputs["text"].shape[1])
    model_flops, hw_flops = flops.train_step(weight_grads=args.weight_grads, recompute=recompute)
    print(f"[{label}] video tokens {lv:,}, audio tokens {la:,}, text tokens {inputs['text'].shape[1]}")
    print(f"[{label}] forward            {fwd_s * 1e3:10.1f} ms   {_rate(flops.forward / fwd_s)}")
    print(
        f"[{label}] forward+backward   {step_s * 1e3:10.1f} ms   {_rate(model_flops / step_s)} model"
        f" ({_rate(hw_flops / step_s).strip()} incl. recompute)   {(lv + la) / step_s:,.0f} tokens/s"
    )
    print(
        f"[{label}] FLOPs per step: forward {flops.forward:.3e} (attention {flops.attention:.3e}), "
        f"train {model_flops:.3e}"
    )


def run_model_bench(args: argparse.Namespace) -> int:
    check_steps(args.steps, args.warmup)
    grads = "all weights" if args.weight_grads else "frozen weights (LoRA-like), input grads"

    # Tiny config on CPU: a 17-frame 64x96 clip.
    cpu = torch.device("cpu")
    config = get_model_config("tiny")
    model = build_mova(config, components=BENCH_COMPONENTS, device=cpu, seed=0).requires_grad_(
        args.weight_grads
    )
    inputs = _inputs(config, frames=17, height=64, width=96, device=cpu, requires_grad=True)
    fwd_s, step_s = _measure(model, inputs, args.steps, args.warmup, cpu)
    print(f"model bench: tiny config on CPU, fp32, {torch.get_num_threads()} threads, {grads}")
    _report("tiny/cpu", config, inputs, fwd_s, step_s, args, recompute=False)
    peak_mb = peak_rss_bytes() / 2**20
    print(f"[tiny/cpu] peak process RSS {peak_mb:.0f} MB")
    del model, inputs

    if args.cpu_only:
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: skipping the full-size measurement")
        return 0

    # Full size on GPU: one expert + audio tower + bridge, bf16, random weights allocated directly on the GPU.
    gpu = torch.device("cuda")
    config = get_model_config(args.gpu_config)
    torch.cuda.reset_peak_memory_stats(gpu)
    model = build_mova(config, components=BENCH_COMPONENTS, device=gpu, dtype=torch.bfloat16, seed=0)
    model.requires_grad_(args.weight_grads)
    recompute = not args.no_checkpointing
    set_activation_checkpointing(model, recompute)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    inputs = _inputs(
        config, frames=args.frames, height=args.height, width=args.width, device=gpu, requires_grad=True
    )
    torch.cuda.reset_peak_memory_stats(gpu)
    fwd_s, step_s = _measure(model, inputs, args.steps, args.warmup, gpu)
    peak_gb = torch.cuda.max_memory_allocated(gpu) / 2**30
    print(
        f"model bench: {args.gpu_config} (1 expert + audio + bridge) on {torch.cuda.get_device_name(gpu)}, bf16, "
        f"activation checkpointing {'on' if recompute else 'off'}, {grads}"
    )
    _report(args.gpu_config, config, inputs, fwd_s, step_s, args, recompute=recompute)
    print(f"[{args.gpu_config}] weights {weights_gb:.1f} GiB, peak allocated {peak_gb:.1f} GiB")
    return 0
