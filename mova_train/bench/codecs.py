"""`python -m mova_train.bench codecs`: encode/decode throughput of the video VAE, DAC and UMT5 (prints figures).

Always runs the tiny codecs on CPU (written to a temporary folder and loaded with `load_codecs`, so loading is
exercised too). With a GPU it also runs the real-size codecs with random weights (video VAE and UMT5 in bf16, DAC in
fp32, as the reference runs them) on a 360p clip; `--checkpoint DIR` benchmarks the codecs of a real checkpoint.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from mova_train.bench.common import add_gpu_clip_args, cuda_peak_gib, time_calls, timed
from mova_train.codecs import Codecs, build_codec_modules, load_codecs
from mova_train.codecs.configs import get_codec_config
from mova_train.codecs.dac import AudioVAE
from mova_train.codecs.text_encoder import TextEncoder
from mova_train.codecs.tiny import build_tiny_tokenizer, write_tiny_codecs
from mova_train.codecs.video_vae import VideoVAE

_PROMPT = "A woman speaks to the camera in a quiet room while rain falls on the window behind her."


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    parser.add_argument(
        "--tiny-frames", type=int, default=17, help="frames of the tiny CPU clip (4k+1, default 17)"
    )
    parser.add_argument("--tiny-size", type=int, default=64, help="tiny CPU clip height=width (default 64)")
    parser.add_argument(
        "--tiny-audio-seconds", type=float, default=2.0, help="tiny CPU audio length (default 2)"
    )
    parser.add_argument("--prompts", type=int, default=4, help="prompts per text-encoder batch (default 4)")
    add_gpu_clip_args(parser)
    parser.add_argument(
        "--tiling", action="store_true", help="enable the video VAE's spatial tiling on the GPU run"
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="also benchmark the codecs of this checkpoint folder"
    )


def _run_suite(
    label: str,
    video: VideoVAE,
    audio: AudioVAE,
    text: TextEncoder,
    *,
    frames: int,
    height: int,
    width: int,
    audio_seconds: float,
    num_prompts: int,
    warmup: int,
    repeats: int,
) -> None:
    device = video.device
    g = torch.Generator().manual_seed(0)
    clip = (torch.rand(1, 3, frames, height, width, generator=g) * 2 - 1).to(device)
    latents = video.encode(clip)
    wave = (torch.rand(1, 1, int(audio_seconds * audio.sample_rate), generator=g) * 1.8 - 0.9).to(device)
    audio_latents, _ = audio.encode(wave)
    prompts = [_PROMPT] * num_prompts
    cases = [
        ("video_vae", "encode", f"{frames}x{height}x{width}", lambda: video.encode(clip), frames, "frames/s"),
        (
            "video_vae",
            "decode",
            f"{list(latents.shape[1:])}",
            lambda: video.decode(latents),
            frames,
            "frames/s",
        ),
        (
            "video_vae",
            "condition",
            f"1+{frames - 1} grey",
            lambda: video.encode_condition(clip[:, :, 0], frames),
            frames,
            "frames/s",
        ),  # fmt: skip
        (
            "audio_vae",
            "encode",
            f"{audio_seconds:g} s",
            lambda: audio.encode(wave),
            audio_seconds,
            "audio s/s",
        ),
        (
            "audio_vae",
            "decode",
            f"{list(audio_latents.shape[1:])}",
            lambda: audio.decode(audio_latents),
            audio_seconds,
            "audio s/s",
        ),  # fmt: skip
        (
            "text_encoder",
            "encode",
            f"{num_prompts} prompts",
            lambda: text.encode(prompts),
            num_prompts,
            "prompts/s",
        ),
    ]
    print(f"\n== {label} ==")
    print(f"{'codec':<13}{'op':<11}{'input':<26}{'s/call':>10}{'throughput':>22}{'peak GiB':>10}")
    for codec, op, shape, fn, amount, unit in cases:
        seconds = time_calls(fn, repeats, warmup, device, reset_peak=True)
        peak = cuda_peak_gib(device)
        rate = f"{amount / seconds:,.2f} {unit}"
        print(
            f"{codec:<13}{op:<11}{shape:<26}{seconds:>10.3f}{rate:>22}{(f'{peak:.1f}' if peak else '-'):>10}"
        )


def _randomise_(module: nn.Module, seed: int) -> None:
    """Fill a materialised module with harmless random values: norms/Snake α = 1, biases = 0, weights ~ N(0, 1/fan_in)."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("alpha", "gamma") or "norm" in name:
                p.fill_(1.0)
            elif leaf == "bias" or p.ndim < 2:
                p.zero_()
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)


def _random_real_size(config_name: str, device: torch.device) -> tuple[VideoVAE, AudioVAE, TextEncoder]:
    modules = build_codec_modules(config_name, device="meta")
    dtypes = {"video_vae": torch.bfloat16, "audio_vae": torch.float32, "text_encoder": torch.bfloat16}
    for i, (name, module) in enumerate(modules.items()):
        module.to(dtypes[name]).to_empty(device=device)
        _randomise_(module, seed=i)
        module.eval().requires_grad_(False)
    umt5 = modules["text_encoder"]
    umt5.encoder.embed_tokens.weight = umt5.shared.weight  # to_empty materialises the two names separately
    video = VideoVAE(modules["video_vae"], get_codec_config(config_name, "video_vae"))
    # No released tokenizer offline: the tiny one produces ids; the cost is the 5.7B-parameter encoder anyway.
    text = TextEncoder(umt5, build_tiny_tokenizer())
    return video, AudioVAE(modules["audio_vae"]), text


def _from_codecs(codecs: Codecs) -> tuple[VideoVAE, AudioVAE, TextEncoder]:
    return codecs.video_vae, codecs.audio_vae, codecs.text_encoder


def run_codecs_bench(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}; CPU threads {torch.get_num_threads()}; CUDA {torch.cuda.is_available()}"
    )
    with tempfile.TemporaryDirectory(prefix="mova_tiny_codecs_") as tmp:
        write_tiny_codecs(Path(tmp), seed=0)
        codecs, load_s = timed(lambda: load_codecs(tmp))
        print(f"tiny codecs loaded in {load_s:.2f} s (identity {codecs.identity[:16]}...)")
        _run_suite(
            "tiny codecs, CPU, fp32",
            *_from_codecs(codecs),
            frames=args.tiny_frames,
            height=args.tiny_size,
            width=args.tiny_size,
            audio_seconds=args.tiny_audio_seconds,
            num_prompts=args.prompts,
            warmup=args.warmup,
            repeats=args.repeats,
        )
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    full_size_clip = dict(
        frames=args.frames,
        height=args.height,
        width=args.width,
        audio_seconds=args.frames / 24.0,
        num_prompts=args.prompts,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    if args.checkpoint is not None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        codecs = load_codecs(args.checkpoint, device=device, dtype=dtype)
        video = codecs.video_vae
        if args.tiling:
            video.enable_tiling()
        _run_suite(
            f"checkpoint {args.checkpoint}, {device.type}, {dtype}",
            *_from_codecs(codecs),
            **full_size_clip,
        )
        del codecs, video
    if device.type != "cuda":
        print("\nno GPU: skipped the real-size measurement (run on a CUDA machine for 360p figures)")
        return 0
    if args.cpu_only:
        return 0
    video, audio, text = _random_real_size(args.gpu_config, device)
    if args.tiling:
        video.enable_tiling()
    _run_suite(
        f"{args.gpu_config} codecs (random weights), {torch.cuda.get_device_name(device)}, "
        f"VAE/UMT5 bf16, DAC fp32{', tiled' if args.tiling else ''}",
        video,
        audio,
        text,
        **full_size_clip,
    )
    return 0
