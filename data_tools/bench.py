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
from data_tools.common import DataToolsError
from data_tools.encode import EncodeOptions, encode, encode_clip
from data_tools.plan import plan
from data_tools.scan import scan
from data_tools.synth import synthesize
from data_tools.verify import verify
from mova_train.data.config import DataConfig
from mova_train.data.loader import build_loader


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
    from mova_train.models.checkpoint import read_mova_config
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
        figures.update(loader_checksum_cost(shards, text_len=read_mova_config(checkpoint).text_len))
        figures["clips"] = float(len(kept))
        figures["frames_per_clip"] = float(frames)
    return figures


def loader_checksum_cost(shards: Path, *, text_len: int, rounds: int = 7) -> dict[str, float]:
    """The training loader's epoch time over `shards` without and with sha256 verification against the manifest,
    median of `rounds` alternating rounds. A shard is hashed once per process (the next one in a background
    thread while the current one is read), so the cost is paid in the first epoch ("first") and not after
    ("later"); a run of E epochs pays first/E of it."""
    from mova_train.bench.common import timed  # as in bench(): kept out of `python -m data_tools --help`
    from mova_train.data.shards import forget_verified

    def loader(verify: bool):
        cfg = DataConfig(
            shards=str(shards), batch_size=1, shuffle_buffer=0, resample=False, verify_checksums=verify
        )
        return build_loader(
            cfg, rank=0, world_size=1, seed=0, text_len=text_len, expected_codec_identity=None
        )

    def epoch(it) -> float:
        return timed(lambda: sum(len(b) for b in it))[1]

    def first_epoch(it) -> float:
        forget_verified()
        return epoch(it)

    off, first, later = [], [], []
    plain, checked = loader(False), loader(True)
    epoch(plain)  # warm the page cache and the decoders
    for _ in range(rounds):  # each figure sums 5 epochs: single tiny epochs are too short to time
        off.append(sum(epoch(plain) for _ in range(5)))
        first.append(sum(first_epoch(checked) for _ in range(5)))
        later.append(sum(epoch(checked) for _ in range(5)))
    med = sorted(off)[rounds // 2] / 5, sorted(first)[rounds // 2] / 5, sorted(later)[rounds // 2] / 5
    num = sum(len(b) for b in plain)
    return {
        "loader_off_samples_per_s": num / med[0],
        "checksum_cost_first_epoch_pct": 100 * (med[1] / med[0] - 1),
        "checksum_cost_later_epochs_pct": 100 * (med[2] / med[0] - 1),
    }


def write_8k_source(path: Path, *, seconds: float = 1.0, fps: float = 30.0) -> Path:
    """A 7680x4320 H.264 + AAC source with moving content and a tone, encoded frame by frame (this process never
    holds more than one 8K frame)."""
    import av

    height, width, rate = 4320, 7680, 48_000
    n = round(seconds * fps)
    yy, xx = np.mgrid[0:height:8, 0:width:8]  # a coarse pattern, upscaled: cheap to make, not flat to encode
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=round(fps))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "30"}
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "mono"
        for i in range(n):
            small = ((xx + yy + 40 * i) % 256).astype(np.uint8)
            rgb = np.repeat(np.repeat(np.stack([small, small[::-1], 255 - small], -1), 8, 0), 8, 1)
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        t = np.arange(round(seconds * rate)) / rate
        tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for i0 in range(0, tone.size, 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, i0 : i0 + 1024], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return path


def prepare_8k_peak_rss(checkpoint: str | None = None, frames: int = 17) -> dict[str, float]:
    """Peak resident memory of `python -m data_tools prepare` on one 8K 30 fps source (a child process, so the
    figure is prepare's own: scan, plan, decode, resize, codecs, shard writing)."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="data_tools_8k_") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "raw").mkdir()
        write_8k_source(tmp / "raw" / "source_8k.mp4")
        (tmp / "raw" / "source_8k.txt").write_text("an 8K test pattern with a tone\n", encoding="utf-8")
        if checkpoint is None:
            from mova_train.models.tiny import write_tiny_checkpoint

            checkpoint = str(write_tiny_checkpoint(tmp / "ckpt", seed=0))
        cmd = [sys.executable, "-m", "data_tools", "prepare", str(tmp / "raw"), "--checkpoint", checkpoint,
               "--out", str(tmp / "shards"), "--frames", str(frames), "--buckets", "64x112"]  # fmt: skip
        # a wrapper process whose only child is prepare, so the peak is prepare's and nothing else's
        wrapper = (
            "import resource, subprocess, sys; proc = subprocess.run(sys.argv[1:]); "
            "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(proc.returncode)"
        )
        proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataToolsError(f"prepare on the 8K source failed: {proc.stderr[-2000:]}")
        peak_kib = int(proc.stdout.split("PEAK_KIB", 1)[1].split()[0])  # Linux reports KiB
    return {"prepare_8k_peak_rss_gb": peak_kib * 1024 / 1e9}


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
    parser.add_argument(
        "--memory-8k", action="store_true",
        help="also measure the peak RAM of `prepare` on an 8K 30 fps source (about a minute more)",
    )  # fmt: skip


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
        ("training loader (no sha256)", "samples/s", "loader_off_samples_per_s"),
        ("sha256 check cost, first epoch", "%", "checksum_cost_first_epoch_pct"),
        ("sha256 check cost, later epochs", "%", "checksum_cost_later_epochs_pct"),
        ("codec load", "s", "codec_load_s"),
        ("scan", "s", "scan_s"),
        ("plan", "s", "plan_s"),
        ("encode command, end to end", "s", "encode_command_s"),
    ]
    for label, unit, key in rows:
        print(f"  {label:36s} {figures[key]:10.1f} {unit}")
    if args.memory_8k:
        peak = prepare_8k_peak_rss(args.checkpoint)["prepare_8k_peak_rss_gb"]
        print(f"  {'prepare, one 8K 30 fps source, peak':36s} {peak:10.2f} GB RAM (target < 2)")
    return 0
