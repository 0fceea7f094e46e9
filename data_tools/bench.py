"""`data_tools bench`: throughput figures of the data path on the synthetic dataset (CPU unless --device says
otherwise): video decode frames/s, audio decode+resample seconds/s, clip encode clips/min with the tiny codecs,
and shard read samples/s. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from data_tools.align import decode_audio, decode_frames, frame_times, load_clip, resample_mono
from data_tools.encode import EncodeOptions, encode, encode_clip
from data_tools.plan import plan
from data_tools.scan import scan
from data_tools.synth import synthesize
from data_tools.verify import verify


def bench(
    *,
    input_dir: str | None = None,
    checkpoint: str | None = None,
    clips: int = 4,
    seconds: float = 3.0,
    frames: int = 17,
    buckets: str = "64x112,112x64,64x64",
    device: str = "cpu",
) -> dict[str, float]:
    # Imported here on purpose: `python -m data_tools` imports every command module to build its --help, and the
    # codecs (and the model package) take seconds to import.
    from mova_train.bench.common import timed
    from mova_train.codecs import load_codecs
    from mova_train.models.tiny import write_tiny_checkpoint

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mova-data-bench-") as tmp:
        tmp = Path(tmp)
        if input_dir is None:
            input_dir = str(tmp / "synth")
            _, t = timed(lambda: synthesize(input_dir, num_clips=clips, seconds=seconds, seed=0))
            figures["synth_s"] = t
        if checkpoint is None:
            checkpoint = str(write_tiny_checkpoint(tmp / "ckpt", seed=0))
        sources, figures["scan_s"] = timed(lambda: scan(input_dir))
        usable = [s for s in sources if s["status"] == "ok"]

        num_frames = 0

        def decode_all():
            nonlocal num_frames
            for s in usable:
                times = frame_times(s["path"])
                decode_frames(s["path"], np.arange(len(times)), s["height"], s["width"])
                num_frames += len(times)

        _, t = timed(decode_all)
        figures["decode_frames_per_s"] = num_frames / t

        audio_seconds = 0.0

        def audio_all():
            nonlocal audio_seconds
            for s in usable:
                w = decode_audio(s["path"])
                resample_mono(w.samples, w.sample_rate, 48000)
                audio_seconds += w.samples.shape[1] / w.sample_rate

        _, t = timed(audio_all)
        figures["audio_seconds_per_s"] = audio_seconds / t

        rows, figures["plan_s"] = timed(lambda: plan(sources, num_frames=frames, fps=24.0, buckets=buckets))
        kept = [r for r in rows if r["status"] == "kept"]

        codecs, figures["codec_load_s"] = timed(lambda: load_codecs(checkpoint, device=device))
        aligned, t_align = timed(lambda: [load_clip(r) for r in kept])
        figures["align_clips_per_min"] = 60 * len(kept) / t_align
        with torch.inference_mode():
            _, t_codec = timed(
                lambda: [encode_clip(codecs, c, r["caption"], torch.bfloat16) for c, r in zip(aligned, kept)]
            )
        figures["codec_clips_per_min"] = 60 * len(kept) / t_codec
        figures["encode_clips_per_min"] = 60 * len(kept) / (t_align + t_codec)

        shards = tmp / "shards"
        opts = EncodeOptions(checkpoint=checkpoint, out=str(shards), shard_size_mb=0.25, device=device)
        _, figures["encode_command_s"] = timed(lambda: encode(rows, opts, sources=sources))
        result, t = timed(lambda: verify(shards))
        figures["shard_read_samples_per_s"] = result.num_samples / t
        figures["clips"] = float(len(kept))
        figures["frames_per_clip"] = float(frames)
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", default=None, help="video folder (default: a fresh synthetic dataset)")
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint for the codecs (default: a tiny random one)"
    )
    parser.add_argument("--clips", type=int, default=4, help="synthetic videos to generate (default 4)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="length of each synthetic video (default 3)"
    )
    parser.add_argument("--frames", type=int, default=17, help="frames per clip (default 17)")
    parser.add_argument("--buckets", default="64x112,112x64,64x64", help="clip sizes (default small buckets)")
    parser.add_argument("--device", default="cpu", help="device of the codecs (default cpu)")


def run(args: argparse.Namespace) -> int:
    figures = bench(
        input_dir=args.input,
        checkpoint=args.checkpoint,
        clips=args.clips,
        seconds=args.seconds,
        frames=args.frames,
        buckets=args.buckets,
        device=args.device,
    )
    print(
        f"data_tools bench: {int(figures['clips'])} clips of {int(figures['frames_per_clip'])} frames "
        f"({args.buckets}), codecs on {args.device}"
    )
    rows = [
        ("video decode (decord)", "frames/s", "decode_frames_per_s"),
        ("audio decode + resample to 48 kHz", "audio s/s", "audio_seconds_per_s"),
        ("decode + align + resize per clip", "clips/min", "align_clips_per_min"),
        ("codecs (video VAE x2, DAC, UMT5)", "clips/min", "codec_clips_per_min"),
        ("encode total (align + codecs)", "clips/min", "encode_clips_per_min"),
        ("shard read + decode + validate", "samples/s", "shard_read_samples_per_s"),
        ("codec load", "s", "codec_load_s"),
        ("scan", "s", "scan_s"),
        ("plan", "s", "plan_s"),
        ("encode command, end to end", "s", "encode_command_s"),
    ]
    for label, unit, key in rows:
        print(f"  {label:36s} {figures[key]:10.1f} {unit}")
    return 0
