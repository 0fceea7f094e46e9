"""`python -m mova_train.bench data`: read throughput of the shard loader, samples/s and MB/s (prints figures only).

python -m mova_train.bench data data/shards --batch-size 2 --num-workers 4
python -m mova_train.bench data --synthetic 32        # 360p-sized random latents in a temp folder
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mova_train.data.config import DataConfig
from mova_train.data.loader import build_loader
from mova_train.data.synthetic import make_synthetic_sample, write_shard_set


def _batch_bytes(batch) -> int:
    tensors = (batch.video, batch.first_frame, batch.audio, batch.text)
    return sum(t.numel() * t.element_size() for t in tensors)


def run_loader_bench(
    shards_dir: str | Path,
    *,
    batch_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 16,
    max_batches: int = 200,
    seconds: float = 30.0,
    validate: bool = True,
    text_len: int = 512,
    print_fn=print,
) -> dict:
    """Stream batches (resampled, so it never runs dry) for up to `max_batches` or `seconds`; print and return
    samples/s, batches/s, MB/s of batch tensors, time to the first batch and the loader's stats."""
    cfg = DataConfig(
        shards=str(shards_dir),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        resample=True,
        validate=validate,
    )
    loader = build_loader(cfg, rank=0, world_size=1, seed=0, text_len=text_len, expected_codec_identity=None)
    start = time.perf_counter()
    first = None
    num_batches = num_samples = num_bytes = 0
    iterator = iter(loader)
    for batch in iterator:
        now = time.perf_counter()
        if first is None:
            first = now - start
        num_batches += 1
        num_samples += len(batch)
        num_bytes += _batch_bytes(batch)
        if num_batches >= max_batches or now - start >= seconds:
            break
    del iterator  # stops the worker processes
    elapsed = time.perf_counter() - start
    steady = max(elapsed - (first or 0.0), 1e-9)
    result = {
        "shards": str(shards_dir),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "validate": validate,
        "batches": num_batches,
        "samples": num_samples,
        "seconds": elapsed,
        "first_batch_s": first,
        "samples_per_s": num_samples / elapsed if elapsed > 0 else 0.0,
        "steady_samples_per_s": (num_samples - batch_size) / steady if num_batches > 1 else None,
        "mb_per_s": num_bytes / 1e6 / elapsed if elapsed > 0 else 0.0,
        "mb_per_sample": num_bytes / 1e6 / max(num_samples, 1),
        "stats": loader.stats,
    }
    steady_text = (
        f", steady {result['steady_samples_per_s']:.1f} samples/s" if result["steady_samples_per_s"] else ""
    )
    print_fn(
        f"loader bench: {num_samples} samples in {num_batches} batches, {elapsed:.2f} s "
        f"(batch {batch_size}, {num_workers} workers, validate={validate}): "
        f"{result['samples_per_s']:.1f} samples/s{steady_text}, {result['mb_per_s']:.1f} MB/s, "
        f"{result['mb_per_sample']:.2f} MB/sample, first batch after {first or 0.0:.2f} s"
    )
    return result


def write_bench_shards(out_dir: str | Path, num_samples: int, *, samples_per_shard: int = 8) -> None:
    """360p-sized random latents (bf16): video/first_frame [16, 49, 44, 80], audio [128, 403], text [~100, 4096]."""
    g = torch.Generator().manual_seed(0)
    samples = [
        make_synthetic_sample(
            f"bench_{i:05d}",
            bucket="352x640",
            num_frames=193,
            num_tokens=64 + i % 64,
            text_dim=4096,
            audio_channels=128,
            dtype=torch.bfloat16,
            generator=g,
        )
        for i in range(num_samples)
    ]
    shards = [samples[i : i + samples_per_shard] for i in range(0, len(samples), samples_per_shard)]
    write_shard_set(out_dir, shards)


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="?", help="shard folder with manifest.json, or a shard URL list")
    parser.add_argument(
        "--synthetic", type=int, metavar="N", help="benchmark N random 360p-sized samples instead"
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--shuffle-buffer", type=int, default=16)
    parser.add_argument("--max-batches", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0, help="stop after this many seconds")
    parser.add_argument("--no-validate", action="store_true", help="skip per-sample validation")


def run_data_bench(args: argparse.Namespace) -> int:
    if (args.shards is None) == (args.synthetic is None):
        raise ValueError("give a shard folder or --synthetic N (one of them)")
    if args.synthetic is not None and args.synthetic < 1:
        raise ValueError("--synthetic needs N >= 1")
    options = dict(
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        shuffle_buffer=args.shuffle_buffer,
        max_batches=args.max_batches,
        seconds=args.seconds,
        validate=not args.no_validate,
    )
    try:
        if args.synthetic is not None:
            with tempfile.TemporaryDirectory(prefix="mova-loader-bench-") as tmp:
                write_bench_shards(tmp, args.synthetic)
                run_loader_bench(tmp, **options)
        else:
            run_loader_bench(args.shards, **options)
    except ValueError as e:
        # config and data errors (LoaderError, ShardFormatError, ...) are ValueErrors; print their first line only
        raise ValueError(str(e).splitlines()[0]) from None
    return 0
