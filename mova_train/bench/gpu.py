"""`python -m mova_train.bench gpu`: the one-shot GPU benchmark (issue 13), about 8 minutes on one H200.

1. Kernel rates at the real shapes: attention [1, 43120, 40, 128] with the kernel `model.attention=auto` picks, and
   the matmuls [43120 x 5120] x [5120 x 5120] and x [5120 x 13824] (CUDA events, warm-up, median).
2. Training-step time of the voice LoRA step (video_dit_2 + audio tower + bridge, random weights built on the GPU,
   bf16, activation checkpointing, the trainer's objective and AdamW) at three shallow depths, fitted and
   extrapolated to the full 40 + 30 layers; then, if the budget and memory allow, measured at full depth.

The extrapolation model: a shallow model at V video layers has A = round(V * 30 / 40) audio layers and, as the
bridge pairs each audio block with a video block ("full" strategy), min(V, A) bridge pairs. Step time is fitted as
t = a + b * F, F the step's analytic model FLOPs (`mova_train.models.flops`), by least squares, and evaluated at the
full model's F. F is affine in each tower's and the bridge's layer counts, so with the default depths 4/8/12
(3/6/9 audio layers and bridge pairs, each a fixed fraction of 40/30/30) this is exactly t = a' + b' * V at V = 40:
`a'` the depth-independent cost (patch embeddings, heads, objective, optimizer), `b'` one video layer with its 0.75
audio layer and 0.75 bridge pair. FLOPs only weight the towers against each other when depths are not proportional.

`--dry-run` runs the same code on the CPU with the tiny config (fp32, tiny shapes, depths 1/2/3, one timed step).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch

from mova_train.bench.common import build_lora_bench_step, check_steps, clip_tokens
from mova_train.models import get_model_config
from mova_train.models.config import MovaConfig
from mova_train.models.flops import step_flops
from mova_train.models.layers import attention, available_attention_kernels, set_attention_backend
from mova_train.names import LOW_NOISE_EXPERT, SHARED_COMPONENTS

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16
REFERENCE_SAMPLES_PER_GPU_HOUR = 40.0  # the reference trainer at 360p: 8xH100, 22.2 s/step, CP 4 x DP 2
LORA_PRESET = "voice"  # the LoRA of +experiment=voice_lora (configs/lora/voice.yaml)
COMPONENTS = (LOW_NOISE_EXPERT, *SHARED_COMPONENTS)  # one expert per step, as a voice LoRA step


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same code on CPU with the tiny config, tiny shapes, fp32, depths 1/2/3, 1 timed step",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON line on stdout (the text on stderr)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="wall-clock budget; the full-depth run only fits in it"
    )
    parser.add_argument("--depths", default=None, help="video layers of the shallow runs (default 4,8,12)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per depth (default 2; dry run 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per depth (default 3; dry run 1)"
    )
    parser.add_argument(
        "--kernel-iters",
        type=int,
        default=None,
        help="timed calls per kernel (median; default 10, dry run 3)",
    )
    parser.add_argument("--attention", default="auto", help="model.attention kernel (default auto)")
    parser.add_argument("--no-full", action="store_true", help="skip the full-depth confirmation")
    parser.add_argument("--frames", type=int, default=193, help="pixel frames (4k+1, default 193)")
    parser.add_argument("--height", type=int, default=352, help="height in pixels (default 352)")
    parser.add_argument("--width", type=int, default=640, help="width in pixels (default 640)")


# ---- the extrapolation -----------------------------------------------------------------------------------------


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b * x; needs two or more distinct xs."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"a line fit needs two or more distinct x values, got {xs}")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def depth_config(config: MovaConfig, video_layers: int) -> MovaConfig:
    """`config` cut to `video_layers` video blocks and round(video_layers * A / V) audio blocks (at least 1)."""
    v, a = config.video_dit.num_layers, config.audio_dit.num_layers
    audio_layers = max(1, round(video_layers * a / v))
    return dataclasses.replace(
        config,
        video_dit=dataclasses.replace(config.video_dit, num_layers=video_layers),
        audio_dit=dataclasses.replace(config.audio_dit, num_layers=audio_layers),
        dual_tower_bridge=dataclasses.replace(
            config.dual_tower_bridge, visual_layers=video_layers, audio_layers=audio_layers
        ),
    )


def model_flops(config: MovaConfig, video_tokens: int, audio_tokens: int) -> float:
    """Model FLOPs of one LoRA training step (frozen base; recompute not counted)."""
    flops = step_flops(
        config, video_tokens=video_tokens, audio_tokens=audio_tokens, text_tokens=config.text_len
    )
    return flops.train_step(weight_grads=False, recompute=True)[0]


def extrapolate(
    config: MovaConfig, depths: list[int], values: list[float], video_tokens: int, audio_tokens: int
) -> tuple[float, float, float]:
    """(a, b, value at full depth) of the fit value = a + b * model FLOPs over the shallow `depths`."""
    xs = [model_flops(depth_config(config, d), video_tokens, audio_tokens) for d in depths]
    a, b = fit_line(xs, values)
    return a, b, a + b * model_flops(config, video_tokens, audio_tokens)


def per_video_layer_s(
    config: MovaConfig, b: float, depth: int, video_tokens: int, audio_tokens: int
) -> float:
    """Seconds the fit adds per video layer (with its share of audio layers and bridge pairs) from `depth` to the
    full model; the same for every `depth` of a proportional cut."""
    full = config.video_dit.num_layers
    shallow = model_flops(depth_config(config, depth), video_tokens, audio_tokens)
    return b * (model_flops(config, video_tokens, audio_tokens) - shallow) / (full - depth)


# ---- timing ------------------------------------------------------------------------------------------------------


def time_kernel(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call: CUDA events around each call on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _attention_rates(shape: list[int], dtype: torch.dtype, device: torch.device, iters: int) -> list[dict]:
    b, length, heads, head_dim = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(b, length, heads, head_dim, device=device, dtype=dtype, generator=g).requires_grad_(True)
        for _ in range(3)
    )
    grad = torch.randn(b, length, heads * head_dim, device=device, dtype=dtype, generator=g)
    fwd_flops = 4.0 * b * length * length * heads * head_dim  # QK^T and PV
    with torch.no_grad():
        fwd_s = time_kernel(lambda: attention(q, k, v), iters, 2, device)
    step_s = time_kernel(lambda: attention(q, k, v).backward(grad), iters, 2, device)
    # FlashAttention's convention: backward = 2.5 x forward (five matmuls against two)
    return [
        {"name": "attention forward", "shape": shape, "s": fwd_s, "flops": fwd_flops},
        {"name": "attention fwd+bwd", "shape": shape, "s": step_s, "flops": 3.5 * fwd_flops},
    ]


def _matmul_rate(shape: list[int], dtype: torch.dtype, device: torch.device, iters: int) -> dict:
    m, k, n = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)  # [tokens, in]
    w = torch.randn(k, n, device=device, dtype=dtype, generator=g)  # [in, out]
    s = time_kernel(lambda: x @ w, iters, 2, device)
    return {"name": "matmul", "shape": shape, "s": s, "flops": 2.0 * m * k * n}


def kernel_rates(shapes: dict, dtype: torch.dtype, device: torch.device, iters: int) -> list[dict]:
    """TFLOP/s of attention (forward; forward+backward) and of the two matmuls at `shapes`."""
    rows = _attention_rates(shapes["attention"], dtype, device, iters)
    rows += [_matmul_rate(shape, dtype, device, iters) for shape in shapes["matmuls"]]
    for row in rows:
        row["tflops"] = row["flops"] / row["s"] / 1e12
    return rows


# ---- training steps ----------------------------------------------------------------------------------------------


def time_training(
    config: MovaConfig,
    clip: tuple[int, int, int],
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    steps: int,
) -> dict:
    """Build the model at `config`'s depth with random weights on `device`, apply the voice LoRA, and time
    `warmup` + `steps` optimizer steps of the trainer's objective. Returns seconds (median), peak GB, build s."""
    t_build = time.perf_counter()
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step, _, _, _ = build_lora_bench_step(config, COMPONENTS, LORA_PRESET, device, dtype, clip)
    _sync(device)
    build_s = time.perf_counter() - t_build

    for i in range(warmup):
        step(i)
    _sync(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(warmup + i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if on_cuda else None
    return {"s": statistics.median(times), "peak_gb": peak_gb, "build_s": build_s}


# ---- the command -------------------------------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    """Release the last model's memory before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _settings(args: argparse.Namespace) -> dict:
    """Device, dtype, config, shapes and step counts of a GPU run or of the CPU dry run."""
    if args.dry_run:
        config = get_model_config("tiny")
        frames, height, width = 17, 64, 96
        default_depths, default_steps, device, dtype = "1,2,3", 1, torch.device("cpu"), torch.float32
        default_warmup, default_iters = 1, 3
    else:
        if not torch.cuda.is_available():
            raise ValueError("needs a CUDA GPU and found none (--dry-run runs the same code on the CPU)")
        config = get_model_config("mova_360p")
        frames, height, width = args.frames, args.height, args.width
        default_depths, default_steps, device, dtype = "4,8,12", 3, torch.device("cuda"), torch.bfloat16
        default_warmup, default_iters = 2, 10
    _, _, lv, la = clip_tokens(config, frames, height, width)
    v = config.video_dit
    try:
        depths = [int(d) for d in (args.depths or default_depths).split(",")]
    except ValueError:
        raise ValueError(f"--depths must be comma-separated ints, got {args.depths!r}") from None
    full = v.num_layers
    if len(set(depths)) < 2 or any(not 1 <= d < full for d in depths):
        raise ValueError(
            f"--depths needs two or more distinct video layer counts in 1..{full - 1}, got {depths}"
        )
    warmup = default_warmup if args.warmup is None else args.warmup
    kernel_iters = default_iters if args.kernel_iters is None else args.kernel_iters
    steps = default_steps if args.steps is None else args.steps
    check_steps(steps, warmup)
    if not args.budget_s >= 0:
        raise ValueError(f"--budget-s must be >= 0 seconds, got {args.budget_s}")
    if kernel_iters < 1:
        raise ValueError(f"--kernel-iters must be >= 1, got {kernel_iters}")
    return {
        "config": config,
        "device": device,
        "dtype": dtype,
        "clip": (frames, height, width),
        "video_tokens": lv,
        "audio_tokens": la,
        "depths": depths,
        "warmup": warmup,
        "steps": steps,
        "kernel_iters": kernel_iters,
        "shapes": {
            "attention": [1, lv, v.num_heads, v.head_dim],
            "matmuls": [[lv, v.dim, v.dim], [lv, v.dim, v.ffn_dim]],
        },
    }


def run_gpu_bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    st = _settings(args)
    out = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    config, device, dtype = st["config"], st["device"], st["dtype"]
    dtype_name = str(dtype).removeprefix("torch.")
    kernel = set_attention_backend(args.attention, device)
    usable = available_attention_kernels(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, tiny config)"
    say(
        f"gpu bench: {name}, torch {torch.__version__}, {dtype_name}, attention kernel {kernel} "
        f"(model.attention={args.attention}; usable here: {', '.join(usable)})"
    )

    kernels = kernel_rates(st["shapes"], dtype, device, st["kernel_iters"])
    for row in kernels:
        shape = row["shape"]
        label = (
            f"{shape}"
            if row["name"].startswith("attention")
            else f"[{shape[0]} x {shape[1]}] x [{shape[1]} x {shape[2]}]"
        )
        extra = f" ({kernel})" if row["name"].startswith("attention") else ""
        say(
            f"[kernel] {row['name']:17s} {label} {dtype_name}{extra}: {row['s'] * 1e3:.3f} ms, "
            f"{row['tflops']:.3f} TFLOP/s"
        )
    matmul_peak = max(r["tflops"] for r in kernels if r["name"] == "matmul")

    lv, la = st["video_tokens"], st["audio_tokens"]
    depth_rows = []
    for d in st["depths"]:
        cfg = depth_config(config, d)
        r = time_training(cfg, st["clip"], device, dtype, st["warmup"], st["steps"])
        _free(device)
        r.update(
            video_layers=d,
            audio_layers=cfg.audio_dit.num_layers,
            bridge_pairs=len(cfg.dual_tower_bridge.interaction_layers),
            flops=model_flops(cfg, lv, la),
        )
        depth_rows.append(r)
        peak = "n/a (CPU)" if r["peak_gb"] is None else f"{r['peak_gb']:.1f} GB"
        say(
            f"[depth] {d} video + {r['audio_layers']} audio layers, {r['bridge_pairs']} bridge pairs: "
            f"{r['s']:.3f} s/step (median of {st['steps']}), {r['flops'] / r['s'] / 1e12:.3f} TFLOP/s, "
            f"peak {peak}, built in {r['build_s']:.1f} s"
        )

    depths = [r["video_layers"] for r in depth_rows]
    a, b, predicted = extrapolate(config, depths, [r["s"] for r in depth_rows], lv, la)
    full_flops = model_flops(config, lv, la)
    v_full, a_full = config.video_dit.num_layers, config.audio_dit.num_layers
    deepest = max(depths)
    per_layer = per_video_layer_s(config, b, deepest, lv, la)
    say(
        f"[fit] t = a + b * F (F = model FLOPs of the step), least squares over depths {depths}: "
        f"{predicted - per_layer * v_full:.4f} s fixed + {per_layer:.4f} s per video layer with its share of "
        "audio layers and bridge pairs; "
        f"at {v_full} video + {a_full} audio layers ({full_flops:.3e} FLOPs): {predicted:.3f} s/step"
        + ("" if b > 0 else " (slope not positive: the shallow timings are too noisy to extrapolate)")
    )
    peaks = [r["peak_gb"] for r in depth_rows]
    peak_pred = None if None in peaks else extrapolate(config, depths, peaks, lv, la)[2]

    measured, full_peak, skipped = None, None, None
    elapsed = time.perf_counter() - started
    deepest_row = max(depth_rows, key=lambda r: r["video_layers"])
    est_build = deepest_row["build_s"] * v_full / deepest_row["video_layers"]
    # never below the deepest shallow step: a noisy fit can extrapolate to less (even below zero)
    est_s = est_build + (st["warmup"] + st["steps"]) * max(predicted, deepest_row["s"])
    if args.no_full:
        skipped = "--no-full"
    elif elapsed + est_s > args.budget_s:
        skipped = f"estimated {est_s:.0f} s, {args.budget_s - elapsed:.0f} s of the {args.budget_s:.0f} s budget left"
    elif (
        peak_pred is not None
        and peak_pred > 0.95 * torch.cuda.get_device_properties(device).total_memory / 1e9
    ):
        skipped = f"estimated peak {peak_pred:.0f} GB does not fit the GPU"
    else:
        try:
            r = time_training(config, st["clip"], device, dtype, st["warmup"], st["steps"])
            measured, full_peak = r["s"], r["peak_gb"]
        except torch.cuda.OutOfMemoryError:
            skipped = "out of GPU memory"
        _free(device)
    step_s = measured if measured is not None else predicted
    tflops = full_flops / step_s / 1e12
    result = {
        "device": name,
        "attention_kernel": kernel,
        "dtype": dtype_name,
        "video_tokens": lv,
        "audio_tokens": la,
        "kernels": kernels,
        "matmul_peak_tflops": matmul_peak,
        "depths": depth_rows,
        "fit_a_s": a,
        "fit_b_s_per_flop": b,
        "fit_s_per_video_layer": per_layer,
        "s_per_step_extrapolated": predicted,
        "s_per_step_measured": measured,
        "full_depth_skipped": skipped,
        "model_flops_per_step": full_flops,
        "tflops": tflops,
        "mfu_989": tflops / PEAK_TFLOPS,
        "mfu_matmul_peak": tflops / matmul_peak,
        "peak_gb": full_peak if full_peak is not None else peak_pred,
        "peak_gb_measured": full_peak is not None,
        "samples_per_gpu_hour": 3600.0 / step_s,
        "reference_samples_per_gpu_hour": REFERENCE_SAMPLES_PER_GPU_HOUR,
        "total_s": time.perf_counter() - started,
    }
    which = "measured" if measured is not None else "extrapolated"
    say(
        f"[result] s/step: {predicted:.3f} extrapolated, "
        + (
            f"{measured:.3f} measured at full depth (extrapolation {predicted / measured - 1:+.1%})"
            if measured is not None
            else f"full depth not run ({skipped})"
        )
    )
    say(
        f"[result] TFLOP/s: {tflops:.3f} ({which}; {full_flops:.3e} model FLOPs per step, recompute not counted)"
    )
    say(
        f"[result] MFU: {result['mfu_989']:.1%} of {PEAK_TFLOPS:.0f} TFLOP/s, "
        f"{result['mfu_matmul_peak']:.1%} of the measured matmul peak {matmul_peak:.3f} TFLOP/s"
    )
    if result["peak_gb"] is None:
        say("[result] peak GB: n/a (CPU; torch.cuda.max_memory_allocated on a GPU)")
    else:
        how = "measured at full depth" if full_peak is not None else "extrapolated"
        say(f"[result] peak GB: {result['peak_gb']:.1f} ({how}, torch.cuda.max_memory_allocated)")
    say(
        f"[result] samples per GPU-hour: {result['samples_per_gpu_hour']:.1f} ({which}; reference "
        f"{REFERENCE_SAMPLES_PER_GPU_HOUR:.0f}, {result['samples_per_gpu_hour'] / REFERENCE_SAMPLES_PER_GPU_HOUR:.2f}x)"
    )
    say(f"[result] attention kernel: {kernel}")
    say(f"[result] total {result['total_s']:.1f} s")
    if args.json:
        print(json.dumps(result), flush=True)
    return 0
