"""Helpers every benchmark shares: timing a call, peak memory, and the options of the full-size GPU clip."""

from __future__ import annotations

import argparse
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading includes it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], steps: int, warmup: int, device: torch.device, *, reset_peak: bool = False
) -> float:
    """Seconds per call of `fn`: `warmup` untimed calls, then the mean of `steps` timed ones. With `reset_peak`, the
    CUDA peak-memory counter is reset after the warm-up, so `cuda_peak_gib` reports the timed calls alone."""
    for _ in range(warmup):
        fn()
    if reset_peak and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / max(steps, 1)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """(fn(), seconds it took) for one call."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def cuda_peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated on `device` since the last reset, in GiB; None on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux VmHWM; ru_maxrss elsewhere)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def check_steps(steps: int, warmup: int) -> None:
    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")


def check_clip_shape(frames: int, height: int, width: int) -> None:
    """A clip the video VAE (4x time, 8x space) and the patch size (2) divide: frames 4k+1, sizes multiples of 16."""
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise ValueError(
            f"--frames must be 4k+1 and --height/--width multiples of 16, got {frames}, {height}x{width}"
        )


def add_gpu_clip_args(parser: argparse.ArgumentParser) -> None:
    """--cpu-only, --gpu-config, --frames, --height, --width: the full-size measurement run when CUDA is present."""
    parser.add_argument("--cpu-only", action="store_true", help="skip the full-size GPU measurement")
    parser.add_argument(
        "--gpu-config",
        default="mova_360p",
        choices=("mova_360p", "mova_720p"),
        help="architecture for the GPU run (default mova_360p)",
    )
    parser.add_argument(
        "--frames", type=int, default=193, help="pixel frames of the GPU clip (4k+1, default 193)"
    )
    parser.add_argument("--height", type=int, default=352, help="GPU clip height in pixels (default 352)")
    parser.add_argument("--width", type=int, default=640, help="GPU clip width in pixels (default 640)")


def clip_tokens(config, frames: int, height: int, width: int) -> tuple[tuple[int, ...], int, int, int]:
    """(video latent shape [B, 16, T, h, w], audio latent length, video tokens, audio tokens) of one clip."""
    check_clip_shape(frames, height, width)
    t, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    audio_len = math.ceil(48000 * frames / 24 / 960)
    pt, ph, pw = config.video_dit.patch_size
    return (1, config.video_latent_dim, t, h, w), audio_len, (t // pt) * (h // ph) * (w // pw), audio_len


def build_lora_bench_step(config, components, lora_preset: str, device, dtype, clip: tuple[int, int, int]):
    """The benchmarks' training setup: `components` of `config` with random weights on `device` in `dtype`, frozen,
    the LoRA preset on them, activation checkpointing, the trainer's optimizer and objective (one expert), random
    latents of one `clip` (frames, height, width). Returns (step, model, video tokens, audio tokens), where `step(i)`
    is one optimizer step of the trainer's math: fresh noise and timesteps, the forward under bf16 autocast on CUDA,
    the loss, backward, clipping at 1.0, AdamW."""
    from mova_train.lora import apply_lora, lora_config_from_name
    from mova_train.models import FlowMatchScheduler, build_mova, set_activation_checkpointing
    from mova_train.names import EXPERTS
    from mova_train.training.config import ObjectiveConfig, OptimConfig
    from mova_train.training.objective import FlowMatchingObjective
    from mova_train.training.optim import build_optimizer, set_step_hyperparams

    model = build_mova(config, components=components, device=device, dtype=dtype, seed=0)
    model.requires_grad_(False)
    lora_cfg = lora_config_from_name(lora_preset)
    lora_cfg.targets = {c: p for c, p in lora_cfg.targets.items() if c in components}
    torch.manual_seed(0)
    apply_lora(model, lora_cfg)
    set_activation_checkpointing(model, True)
    model.train()
    optim_cfg = OptimConfig(warmup_steps=0, schedule="constant")
    optimizer = build_optimizer(model, optim_cfg)
    (expert,) = [c for c in components if c in EXPERTS]
    objective = FlowMatchingObjective(
        ObjectiveConfig(expert=f"only:{expert}"), FlowMatchScheduler.from_config(config.scheduler),
        config.boundary_timestep, seed=0,
    )  # fmt: skip
    video_shape, audio_len, video_tokens, audio_tokens = clip_tokens(config, *clip)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(video_shape, generator=g).to(device)  # [B, 16, T, h, w]
    first = torch.randn(video_shape, generator=g).to(device)
    audio = torch.randn(1, config.audio_latent_dim, audio_len, generator=g).to(device)  # [B, Ca, L]
    text = torch.randn(1, config.text_len, config.text_dim, generator=g).to(device)  # [B, 512, Dt]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    on_cuda = torch.device(device).type == "cuda"

    def step(i: int) -> None:
        set_step_hyperparams(optimizer, optim_cfg, i, 10**6, set(components))
        inputs = objective.prepare(video, first, audio, text, micro_step=i, generator=g)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=on_cuda):
            pv, pa = model(
                inputs.noisy_video.to(dtype), inputs.video_cond.to(dtype), inputs.noisy_audio.to(dtype),
                inputs.text.to(dtype), inputs.timestep_video, inputs.timestep_audio, expert=inputs.expert,
            )  # fmt: skip
        loss, _, _ = objective.loss(pv, pa, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model, video_tokens, audio_tokens
