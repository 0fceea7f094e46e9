"""Helpers every benchmark shares: timing a call, peak memory, and the options of the full-size GPU clip."""

from __future__ import annotations

import argparse
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


def lora_train_step(
    model, objective, optimizer, optim_cfg, latents, generator, *, dtype, active
) -> Callable[[int], None]:
    """`step(i)`: one optimizer step of the trainer's math on fixed latents (video, first frame, audio, text) for the
    benchmarks: fresh noise and timesteps (`objective.prepare`), the forward in `dtype` under bf16 autocast on CUDA,
    the loss, backward, clipping at 1.0 and the optimizer's step, with `active` the components whose groups step."""
    from mova_train.training.optim import set_step_hyperparams

    params = [p for group in optimizer.param_groups for p in group["params"]]
    video, first, audio, text = latents
    on_cuda = video.device.type == "cuda"

    def step(i: int) -> None:
        set_step_hyperparams(optimizer, optim_cfg, i, 10**6, set(active))
        inputs = objective.prepare(video, first, audio, text, micro_step=i, generator=generator)
        with torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            pv, pa = model(
                inputs.noisy_video.to(dtype), inputs.video_cond.to(dtype), inputs.noisy_audio.to(dtype),
                inputs.text.to(dtype), inputs.timestep_video, inputs.timestep_audio, expert=inputs.expert,
            )  # fmt: skip
        loss, _, _ = objective.loss(pv, pa, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
